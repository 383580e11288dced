"""MXFP4 quantize / dequantize kernels (OCP Microscaling; numerics and layout in ``kernels/reference/mxfp4.py``).

Math, per row and block of 32 columns (bit-exact with the reference):
    E   = 0 if max|v| is 0 or an fp32 subnormal, else clamp(exponent_bits(max|v|) - 127 - 2, -127, 127) + 127
    X   = 2**(E - 127);  element = E2M1(v / X): nearest of 0, .5, 1, 1.5, 2, 3, 4, 6, ties to the even pattern,
          saturating at 6, sign bit of v kept
    byte i of a row = element 2i | element 2i+1 << 4
A program owns BLOCK_R rows x NB blocks; it loads the even and odd columns apart (the two nibbles of each byte),
so a block's maximum is the larger of its even and odd maxima.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference.mxfp4 import BLOCK, padded_k

__all__ = ["dequantize_mxfp4", "e2m1_value", "quantize_mxfp4"]


@triton.jit
def _e2m1_code(scaled):
    # 3-bit magnitude pattern: count the thresholds passed; at a tie the even pattern wins (>= when the upper
    # pattern is even: 0.75, 1.75, 3.5; > when it is odd: 0.25, 1.25, 2.5, 5.0)
    a = tl.abs(scaled)
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a >= 1.75).to(tl.int32)
    idx += (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    sign = (scaled.to(tl.int32, bitcast=True) >> 31) & 1
    return idx | (sign << 3)


@triton.jit
def e2m1_value(code):
    """4-bit E2M1 pattern (int32) -> fp32 value: 0.5 * m for exponent 0, else 2**(e - 1) * (1 + m / 2)."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0)))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _pow2(exp):
    # 2**exp for integer exp in [-127, 127], from the fp32 exponent bits (exact); 2**-127 is subnormal: 2**-126 / 2
    bits = (tl.maximum(exp, -126) + 127) << 23
    return bits.to(tl.float32, bitcast=True) * tl.where(exp < -126, 0.5, 1.0)


@triton.jit
def _quantize_kernel(w_ptr, packed_ptr, scales_ptr, R, K, stride_w, k_bytes, nblocks,
                     BLOCK_R: tl.constexpr, NB: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * NB * 16 + tl.arange(0, NB * 16)  # byte index within the row
    r_ok = (rows < R)[:, None]
    w_row = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    v0 = tl.load(w_row + 2 * j[None, :], mask=r_ok & (2 * j < K)[None, :], other=0.0).to(tl.float32)
    v1 = tl.load(w_row + 2 * j[None, :] + 1, mask=r_ok & (2 * j + 1 < K)[None, :], other=0.0).to(tl.float32)
    amax = tl.maximum(
        tl.max(tl.reshape(tl.abs(v0), (BLOCK_R, NB, 16)), 2), tl.max(tl.reshape(tl.abs(v1), (BLOCK_R, NB, 16)), 2)
    )
    ebits = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    shared = tl.where(ebits == 0, -127, tl.maximum(ebits - 129, -127))  # floor(log2 amax) - 2
    inv = tl.reshape(tl.broadcast_to(_pow2(-shared)[:, :, None], (BLOCK_R, NB, 16)), (BLOCK_R, NB * 16))
    byte = _e2m1_code(v0 * inv) | (_e2m1_code(v1 * inv) << 4)
    tl.store(packed_ptr + rows.to(tl.int64)[:, None] * k_bytes + j[None, :], byte.to(tl.uint8),
             mask=r_ok & (j < k_bytes)[None, :])  # fmt: skip
    b = tl.program_id(1) * NB + tl.arange(0, NB)
    tl.store(scales_ptr + rows.to(tl.int64)[:, None] * nblocks + b[None, :], (shared + 127).to(tl.uint8),
             mask=r_ok & (b < nblocks)[None, :])  # fmt: skip


@triton.jit
def _dequantize_kernel(packed_ptr, scales_ptr, out_ptr, R, K, k_bytes, nblocks, stride_o,
                       BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    r_ok = (rows < R)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    byte = tl.load(packed_ptr + rows64 * k_bytes + j[None, :], mask=r_ok & (j < k_bytes)[None, :], other=0)
    byte = byte.to(tl.int32)
    e = tl.load(scales_ptr + rows64 * nblocks + (j // 16)[None, :], mask=r_ok & (j < k_bytes)[None, :], other=127)
    scale = _pow2(e.to(tl.int32) - 127)
    out = out_ptr + rows64 * stride_o + 2 * j[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(out, (e2m1_value(byte & 15) * scale).to(ty), mask=r_ok & (2 * j < K)[None, :])
    tl.store(out + 1, (e2m1_value(byte >> 4) * scale).to(ty), mask=r_ok & (2 * j + 1 < K)[None, :])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, ceil(K/32)*16), scales uint8 (N, ceil(K/32))) of a 2-D float matrix; as the reference."""
    w = w.contiguous()
    r, k = w.shape
    nblocks = padded_k(k) // BLOCK
    packed = torch.empty(r, nblocks * BLOCK // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(r, nblocks, dtype=torch.uint8, device=w.device)
    block_r, nb = 16, 4
    grid = (triton.cdiv(r, block_r), triton.cdiv(nblocks, nb))
    _quantize_kernel[grid](w, packed, scales, r, k, w.stride(0), packed.shape[1], nblocks, BLOCK_R=block_r, NB=nb)
    return packed, scales


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, k: int, dtype: torch.dtype, out=None) -> torch.Tensor:
    """The (N, K) matrix in ``dtype`` (into ``out`` when given: the matmuls' "dequant" path reuses a buffer).

    The elements times a power of two are exact in fp32; one rounding to ``dtype`` (bf16 / fp16 overflow or
    underflow as the reference's cast does)."""
    r = packed.shape[0]
    out = torch.empty(r, k, dtype=dtype, device=packed.device) if out is None else out
    block_r, block_j = 16, 64
    grid = (triton.cdiv(r, block_r), triton.cdiv(packed.shape[1], block_j))
    _dequantize_kernel[grid](packed, scales, out, r, k, packed.shape[1], scales.shape[1], out.stride(0),
                             BLOCK_R=block_r, BLOCK_J=block_j)  # fmt: skip
    return out
