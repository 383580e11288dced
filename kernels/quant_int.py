"""Triton kernels: int8 (per row), int4 (per group) and fp8 e4m3 (per row) weight quantization.

Bit-exact with ``kernels/reference/quant_int.py``, where the formulas are written out. How the kernels
get the same bits as PyTorch:
- round half to even: ``(x + 1.5 * 2**23) - 1.5 * 2**23``, exact for |x| < 2**22 (larger |x| only
  occur where the result is clamped to the code range anyway);
- fp32 divisions use ``tl.math.div_rn`` (IEEE round-to-nearest, like PyTorch; plain ``/`` is approximate
  on GPUs);
- fp32 -> bf16 goes through ``_cast_rne`` (bit arithmetic: Triton's interpreter truncates that cast);
- fp8 e4m3fn is encoded and decoded with integer bit arithmetic (the interpreter's fp8 cast is wrong),
  rounding to nearest even like ``tensor.to(torch.float8_e4m3fn)``, -0.0 and subnormals included.

Kernels:
    _quantize_rowwise_kernel     one program per row: absmax over column tiles, then scale, round, store
                                 (int8 codes or fp8 bytes)
    _dequantize_rowwise_kernel   q * scale[row] over a (row, column tile) grid
    _quantize_int4_kernel        one program per (row, tile of groups): min/max -> scale, zero (or load the
                                 given ones), round, pack two codes per byte
    _dequantize_int4_kernel      one program per (row, tile of groups): unpack, (q - zero) * scale
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .reference import quant_int as ref
from .tiles import cast_rne, int4_pair


@triton.jit
def _rne(x):
    return (x + 12582912.0) - 12582912.0  # 1.5 * 2**23: no fraction bits survive the add


@triton.jit
def _encode_e4m3(v):
    """fp32 with |v| <= 448 -> e4m3fn byte, round to nearest even, sign kept (-0.0 -> 0x80)."""
    sign = (v.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
    a = tl.abs(v)
    exp = ((a.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    normal = exp >= -6
    e = tl.where(normal, exp, -6)
    # multiply by 2**(3 - e) so one unit is one mantissa step (exact: a power of two), then round:
    # normals give 8..16 (16 = carry into the next binade), subnormals (e = -6, step 2**-9) give 0..8
    # (8 = the smallest normal, whose code is also 8)
    step_inv = ((3 - e + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    m = _rne(a * step_inv).to(tl.int32)
    carry = m >= 16
    e = tl.where(carry, e + 1, e)
    m = tl.where(carry, 8, m)
    code = tl.where(normal, ((e + 7) << 3) | (m - 8), m)
    return (code | (sign << 7)).to(tl.uint8)


@triton.jit
def _decode_e4m3(b):
    """e4m3fn byte -> fp32 (exact); 0x7F / 0xFF are NaN."""
    b = b.to(tl.int32)
    e4 = (b >> 3) & 0xF
    m = b & 7
    # normal: (8 + m) * 2**(e4 - 7 - 3); subnormal: m * 2**-9
    pow2 = ((tl.maximum(e4, 1) - 10 + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    mag = tl.where(e4 == 0, m.to(tl.float32) * 0.001953125, (m + 8).to(tl.float32) * pow2)
    nan = tl.full(mag.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    mag = tl.where((e4 == 15) & (m == 7), nan, mag)
    return tl.where((b >> 7) != 0, -mag, mag)


@triton.jit
def _quantize_rowwise_kernel(
    x_ptr,  # fp32 / fp16 / bf16 [rows, cols]
    q_ptr,  # int8 (int8 format) or uint8 (fp8 bytes) [rows, cols]
    scale_ptr,  # fp32 [rows]
    rows,
    cols,
    IS_FP8: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < rows
    start = r.to(tl.int64)[:, None] * cols
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c in range(0, cols, BLOCK_C):
        offs = c + tl.arange(0, BLOCK_C)[None, :]
        x = tl.load(x_ptr + start + offs, mask=r_mask[:, None] & (offs < cols), other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    absmax = tl.max(acc, axis=1)
    if IS_FP8:
        scale = tl.math.div_rn(absmax, 448.0)
    else:
        scale = tl.math.div_rn(absmax, 127.0)
    scale = tl.where(scale == 0, 1.0, scale)  # all-zero (or underflowing) row
    tl.store(scale_ptr + r, scale, mask=r_mask)
    for c in range(0, cols, BLOCK_C):
        offs = c + tl.arange(0, BLOCK_C)[None, :]
        mask = r_mask[:, None] & (offs < cols)
        x = tl.load(x_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale[:, None])
        if IS_FP8:
            q = _encode_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0))
        else:
            q = tl.minimum(tl.maximum(_rne(v), -127.0), 127.0).to(tl.int8)
        tl.store(q_ptr + start + offs, q, mask=mask)


@triton.jit
def _dequantize_rowwise_kernel(
    q_ptr, scale_ptr, out_ptr, rows, cols, IS_FP8: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < rows
    mask = r_mask[:, None] & (c < cols)[None, :]
    offs = r.to(tl.int64)[:, None] * cols + c[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0)
    if IS_FP8:
        v = _decode_e4m3(q)
    else:
        v = q.to(tl.float32)
    out = v * tl.load(scale_ptr + r, mask=r_mask, other=1.0)[:, None]
    tl.store(out_ptr + offs, cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_tile(total_groups, cols, ngroups, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    # GROUPS groups of this program (numbered row-major, like scale and zero) as [GROUPS, GROUP // 2]
    # (even, odd) column pairs: group ids and mask, row and column offsets, and the two column masks
    gid = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    g_mask = gid < total_groups
    row = (gid // ngroups).to(tl.int64)[:, None]
    g = (gid % ngroups)[:, None]
    half = tl.arange(0, GROUP // 2)[None, :]
    c_even = g * GROUP + 2 * half
    m_even = g_mask[:, None] & (c_even < cols)
    m_odd = g_mask[:, None] & (c_even + 1 < cols)
    return gid, g_mask, row, g, half, c_even, m_even, m_odd


@triton.jit
def _quantize_int4_kernel(
    x_ptr,  # fp32 / fp16 / bf16 [rows, cols]
    packed_ptr,  # uint8 [rows, ceil(cols / 2)]
    scale_ptr,  # bf16 [rows, ngroups]: written (RTN) or read (HAS_PARAMS; any float dtype)
    zero_ptr,  # bf16 [rows, ngroups]: same
    total_groups,  # rows * ngroups: groups are numbered row-major, like scale and zero
    cols,
    ngroups,
    GROUP: tl.constexpr,  # columns per group (power of two)
    GROUPS: tl.constexpr,  # groups per program (power of two)
    HAS_PARAMS: tl.constexpr,
):
    gid, g_mask, row, g, half, c_even, m_even, m_odd = _group_tile(total_groups, cols, ngroups, GROUP, GROUPS)
    c_odd = c_even + 1
    x_even = tl.load(x_ptr + row * cols + c_even, mask=m_even, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + row * cols + c_odd, mask=m_odd, other=0.0).to(tl.float32)
    if HAS_PARAMS:
        scale = tl.load(scale_ptr + gid, mask=g_mask, other=1.0).to(tl.float32)
        zero = tl.load(zero_ptr + gid, mask=g_mask, other=0.0).to(tl.float32)
    else:
        # masked-out columns read 0, which min(., 0) / max(., 0) ignore: only real elements count
        mn = tl.minimum(tl.min(tl.minimum(x_even, x_odd), axis=1), 0.0)
        mx = tl.maximum(tl.max(tl.maximum(x_even, x_odd), axis=1), 0.0)
        scale = cast_rne(tl.math.div_rn(mx - mn, 15.0), tl.bfloat16).to(tl.float32)
        scale = tl.where(scale == 0, 1.0, scale)
        zero = tl.minimum(tl.maximum(_rne(tl.math.div_rn(0.0 - mn, scale)), 0.0), 15.0)
        tl.store(scale_ptr + gid, scale.to(tl.bfloat16), mask=g_mask)  # exact: already bf16 values
        tl.store(zero_ptr + gid, zero.to(tl.bfloat16), mask=g_mask)
    # q = clamp(rne(w / s + zf) + zi, 0, 15) with zi = rne(zero), zf = zero - zi (zf = 0 for RTN)
    zi = _rne(zero)[:, None]
    zf = zero[:, None] - zi
    s = scale[:, None]
    q_even = tl.minimum(tl.maximum(_rne(tl.math.div_rn(x_even, s) + zf) + zi, 0.0), 15.0).to(tl.int32)
    q_odd = tl.minimum(tl.maximum(_rne(tl.math.div_rn(x_odd, s) + zf) + zi, 0.0), 15.0).to(tl.int32)
    q_odd = tl.where(m_odd, q_odd, 0)  # an odd column count pads the last low nibble with 0
    byte = ((q_even << 4) | q_odd).to(tl.uint8)
    tl.store(packed_ptr + row * ((cols + 1) // 2) + g * (GROUP // 2) + half, byte, mask=m_even)


@triton.jit
def _dequantize_int4_kernel(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    total_groups,
    cols,
    ngroups,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
):
    gid, g_mask, row, g, half, c_even, m_even, m_odd = _group_tile(total_groups, cols, ngroups, GROUP, GROUPS)
    c_odd = c_even + 1
    byte = tl.load(packed_ptr + row * ((cols + 1) // 2) + g * (GROUP // 2) + half, mask=m_even, other=0)
    scale = tl.load(scale_ptr + gid, mask=g_mask, other=1.0).to(tl.float32)[:, None]
    zero = tl.load(zero_ptr + gid, mask=g_mask, other=0.0).to(tl.float32)[:, None]
    d_even, d_odd = int4_pair(byte.to(tl.int32), zero)
    v_even = d_even * scale
    v_odd = d_odd * scale
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * cols + c_even, cast_rne(v_even, dtype), mask=m_even)
    tl.store(out_ptr + row * cols + c_odd, cast_rne(v_odd, dtype), mask=m_odd)


# ----------------------------------------------------------------------------------------- launchers


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        raise RuntimeError(
            f"the Triton quantization kernels got a {t.device.type} tensor; use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing triton, or QLORA_KIT_BACKEND=reference for the PyTorch path"
        )


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    if w.dtype not in ref.FLOAT_DTYPES:
        raise ValueError(f"the quantization kernels take fp32, fp16 or bf16 weights, got {w.dtype}")
    _check_device(w)
    return w.contiguous()


def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in ref.FLOAT_DTYPES:
        raise ValueError(f"dequantize to fp32, fp16 or bf16, got {dtype}")


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensor's
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_TILE = 4096  # elements per program: few programs keep the interpreter fast, and it suits GPUs


def _row_tiles(rows: int, cols: int) -> tuple[int, int]:
    block_c = min(1024, triton.next_power_of_2(max(cols, 16)))
    block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, _TILE // block_c))
    return block_r, block_c


def _groups_per_program(total_groups: int, group_size: int) -> int:
    return min(triton.next_power_of_2(max(total_groups, 1)), max(1, _TILE // (group_size // 2)))


def _quantize_rowwise(w: torch.Tensor, q_dtype: torch.dtype, is_fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = _check_weight(w)
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=q_dtype, device=w.device)
    scale = torch.ones(rows, dtype=torch.float32, device=w.device)
    if w.numel():
        q_bytes = q.view(torch.uint8) if is_fp8 else q
        block_r, block_c = _row_tiles(rows, cols)
        with _on_device(w):
            _quantize_rowwise_kernel[(triton.cdiv(rows, block_r),)](
                w, q_bytes, scale, rows, cols, IS_FP8=is_fp8, BLOCK_R=block_r, BLOCK_C=block_c
            )
    return q, scale


def _dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, is_fp8: bool) -> torch.Tensor:
    _check_out_dtype(dtype)
    _check_device(q)
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=dtype, device=q.device)
    if q.numel():
        block_r, block_c = _row_tiles(rows, cols)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        with _on_device(q):
            _dequantize_rowwise_kernel[grid](
                q.contiguous(),
                scale.float().contiguous(),
                out,
                rows,
                cols,
                IS_FP8=is_fp8,
                BLOCK_R=block_r,
                BLOCK_C=block_c,
            )
    return out


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`ref.quantize_int8`: (qdata int8 [rows, cols], scale fp32 [rows])."""
    return _quantize_rowwise(w, torch.int8, False)


def dequantize_int8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of :func:`ref.dequantize_int8`."""
    return _dequantize_rowwise(qdata, scale, dtype, False)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`ref.quantize_fp8`: (qdata float8_e4m3fn [rows, cols], scale fp32 [rows])."""
    return _quantize_rowwise(w, torch.float8_e4m3fn, True)


def dequantize_fp8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of :func:`ref.dequantize_fp8`."""
    return _dequantize_rowwise(qdata.view(torch.uint8), scale, dtype, True)


def _launch_int4_quantize(w, packed, scale, zero, group_size: int, has_params: bool) -> None:
    rows, cols = w.shape
    ngroups = triton.cdiv(cols, group_size)
    if not w.numel():
        return
    groups = _groups_per_program(rows * ngroups, group_size)
    with _on_device(w):
        _quantize_int4_kernel[(triton.cdiv(rows * ngroups, groups),)](
            w,
            packed,
            scale,
            zero,
            rows * ngroups,
            cols,
            ngroups,
            GROUP=group_size,
            GROUPS=groups,
            HAS_PARAMS=has_params,
        )


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`ref.quantize_int4`: (packed uint8, scale bf16, zero bf16)."""
    ref.check_group_size(group_size)
    w = _check_weight(w)
    rows, cols = w.shape
    ngroups = triton.cdiv(cols, group_size)
    packed = torch.empty(rows, (cols + 1) // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, ngroups, dtype=torch.bfloat16, device=w.device)
    zero = torch.empty(rows, ngroups, dtype=torch.bfloat16, device=w.device)
    _launch_int4_quantize(w, packed, scale, zero, group_size, False)
    return packed, scale, zero


def int4_quantize_with_params(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Triton version of :func:`ref.int4_quantize_with_params`: packed uint8 [rows, ceil(cols / 2)]."""
    ref.check_group_size(group_size)
    w = _check_weight(w)
    ref.check_int4_params(w.shape, scale, zero, group_size)
    rows, cols = w.shape
    packed = torch.empty(rows, (cols + 1) // 2, dtype=torch.uint8, device=w.device)
    _launch_int4_quantize(w, packed, scale.contiguous(), zero.contiguous(), group_size, True)
    return packed


def launch_dequantize_int4(packed, scale, zero, out: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - zero) * scale into ``out`` [rows, cols] (any float dtype, contiguous), no checks: the
    launcher behind :func:`dequantize_int4` and the int4 matmuls' "dequant" path."""
    rows, cols = out.shape
    ngroups = triton.cdiv(cols, group_size)
    if out.numel():
        groups = _groups_per_program(rows * ngroups, group_size)
        with _on_device(packed):
            _dequantize_int4_kernel[(triton.cdiv(rows * ngroups, groups),)](
                packed.contiguous(),
                scale.contiguous(),
                zero.contiguous(),
                out,
                rows * ngroups,
                cols,
                ngroups,
                GROUP=group_size,
                GROUPS=groups,
            )
    return out


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cols: int, group_size: int,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """Triton version of :func:`ref.dequantize_int4` (same arguments): [rows, cols] in ``dtype``."""
    ref.check_group_size(group_size)
    _check_out_dtype(dtype)
    _check_device(packed)
    out = torch.empty(packed.shape[0], cols, dtype=dtype, device=packed.device)
    return launch_dequantize_int4(packed, scale, zero, out, group_size)
