"""Triton kernels: NF4 / FP4 block quantization and the 8-bit dynamic map used for double quantization.

Bit-exact with ``kernels/reference/quant_4bit.py`` (and so with bitsandbytes); the math is spelled out
there. Layout: blocks of ``blocksize`` over the flattened tensor, one fp32 absmax per block, element 2i in
the high nibble of byte i.

Kernels:
    _quantize_4bit_kernel    one program per block: absmax, scale, nearest code via 15 midpoints, pack
    _dequantize_4bit_kernel  one program per chunk of packed bytes: unpack, code lookup, * absmax, cast
    _quantize_8bit_kernel    one program per 256-block: absmax, scale as bitsandbytes, binary search over
                             the 255 midpoints of the dynamic map (ties to the lower index)
    _dequantize_8bit_kernel  code[q] * absmax[block]
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import quant_4bit as ref
from .tiles import cast_rne


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,  # flat input, fp32/fp16/bf16
    packed_ptr,  # uint8 [ceil(n / 2)]
    absmax_ptr,  # fp32 [nblocks]
    mid_ptr,  # fp32 [15] midpoints of the sorted code table
    order_ptr,  # uint8 [16] sorted position -> 4-bit pattern
    n,
    BLOCKSIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCKSIZE
    half = tl.arange(0, BLOCKSIZE // 2)
    offs_even = start + 2 * half
    offs_odd = offs_even + 1
    # out-of-range elements read as 0: they leave absmax alone and quantize like bitsandbytes' padding
    x_even = tl.load(x_ptr + offs_even, mask=offs_even < n, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + offs_odd, mask=offs_odd < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=0), tl.max(tl.abs(x_odd), axis=0))
    safe = tl.maximum(absmax, tl.full([], 1e-38, tl.float32))  # fp32: Triton 3.6 types the subnormal literal fp64
    # full blocks: x * (1 / absmax); the partial tail block: x / absmax and its absmax stored clamped
    # (bitsandbytes' arithmetic, kept to the bit)
    is_full = start + BLOCKSIZE <= n
    tl.store(absmax_ptr + pid, tl.where(is_full, absmax, safe))
    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)  # an fp32 one: Triton 3.6 types a bare 1.0 as fp64
    s_even = tl.where(is_full, x_even * inv, tl.math.div_rn(x_even, safe))
    s_odd = tl.where(is_full, x_odd * inv, tl.math.div_rn(x_odd, safe))
    s_even = tl.minimum(tl.maximum(s_even, -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(s_odd, -1.0), 1.0)
    # sorted position = number of midpoints strictly below the value (torch.bucketize, right=False)
    q_even = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    q_odd = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    for i in tl.static_range(15):
        mid = tl.load(mid_ptr + i)
        q_even += (s_even > mid).to(tl.int32)
        q_odd += (s_odd > mid).to(tl.int32)
    q_even = tl.load(order_ptr + q_even).to(tl.int32)
    q_odd = tl.load(order_ptr + q_odd).to(tl.int32)
    byte = ((q_even << 4) | q_odd).to(tl.uint8)
    byte_offs = pid * (BLOCKSIZE // 2) + half
    tl.store(packed_ptr + byte_offs, byte, mask=byte_offs < (n + 1) // 2)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,  # uint8 [ceil(n / 2)]
    absmax_ptr,  # fp32 [nblocks]
    code_ptr,  # fp32 [16]
    out_ptr,  # flat output [n]
    n,
    blocksize,
    BLOCK: tl.constexpr,  # bytes per program
):
    pid = tl.program_id(0).to(tl.int64)
    byte_offs = pid * BLOCK + tl.arange(0, BLOCK)
    byte = tl.load(packed_ptr + byte_offs, mask=byte_offs < (n + 1) // 2, other=0).to(tl.int32)
    i_even = 2 * byte_offs
    i_odd = i_even + 1
    m_even = i_even < n
    m_odd = i_odd < n
    a_even = tl.load(absmax_ptr + i_even // blocksize, mask=m_even, other=0.0)
    a_odd = tl.load(absmax_ptr + i_odd // blocksize, mask=m_odd, other=0.0)
    v_even = tl.load(code_ptr + (byte >> 4)) * a_even
    v_odd = tl.load(code_ptr + (byte & 0xF)) * a_odd
    tl.store(out_ptr + i_even, cast_rne(v_even, out_ptr.dtype.element_ty), mask=m_even)
    tl.store(out_ptr + i_odd, cast_rne(v_odd, out_ptr.dtype.element_ty), mask=m_odd)


@triton.jit
def _quantize_8bit_kernel(
    x_ptr,  # fp32 [n]
    q_ptr,  # uint8 [n]
    absmax_ptr,  # fp32 [nblocks]
    mid_ptr,  # fp32 [255] midpoints of the sorted dynamic map
    n,
    BLOCKSIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCKSIZE
    offs = start + tl.arange(0, BLOCKSIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    absmax = tl.max(tl.abs(x), axis=0)
    safe = tl.maximum(absmax, tl.full([], 1e-38, tl.float32))  # fp32: Triton 3.6 types the subnormal literal fp64
    # the 4-bit kernel's block scaling (bitsandbytes' arithmetic): full blocks x * (1 / absmax), the tail
    # x / absmax with its absmax stored clamped
    is_full = start + BLOCKSIZE <= n
    tl.store(absmax_ptr + pid, tl.where(is_full, absmax, safe))
    s = tl.where(is_full, x * tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe), tl.math.div_rn(x, safe))
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    # number of midpoints strictly below s (torch.bucketize, right=False): binary search over 255 midpoints
    idx = tl.zeros([BLOCKSIZE], dtype=tl.int32)
    for step_log in tl.static_range(8):
        cand = idx + (128 >> step_log)
        below = tl.load(mid_ptr + tl.minimum(cand, 255) - 1) < s
        idx = tl.where((cand <= 255) & below, cand, idx)
    tl.store(q_ptr + offs, idx.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_8bit_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    a = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.load(code_ptr + q) * a, mask=mask)


# ----------------------------------------------------------------------------------------- launchers


def _tables(quant_type: str, device: torch.device):
    midpoints, order = ref.quantize_bounds(quant_type)
    return midpoints.to(device), order.to(device), ref.code_table(quant_type).to(device)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`ref.quantize_4bit` (same contract, same bytes)."""
    if blocksize not in ref.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ref.BLOCKSIZES}, got {blocksize}")
    flat = w.contiguous().reshape(-1)
    n = flat.numel()
    nb = math.ceil(n / blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=w.device)
    if n == 0:
        return packed, absmax
    midpoints, order, _ = _tables(quant_type, w.device)
    _quantize_4bit_kernel[(nb,)](flat, packed, absmax, midpoints, order, n, BLOCKSIZE=blocksize)
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64, quant_type: str = "nf4",
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """Triton version of :func:`ref.dequantize_4bit` (same arguments)."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    if n == 0:
        return out.reshape(shape)
    block = 256
    grid = (triton.cdiv((n + 1) // 2, block),)
    code = ref.code_table(quant_type).to(packed.device)
    _dequantize_4bit_kernel[grid](packed.reshape(-1), absmax.float().contiguous(), code, out, n, blocksize, BLOCK=block)
    return out.reshape(shape)


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = ref.NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`ref.quantize_blockwise_8bit`."""
    flat = x.reshape(-1).float().contiguous()
    n = flat.numel()
    nb = math.ceil(n / blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    if n:
        mids = ref.DYNAMIC_MIDPOINTS.to(x.device)
        _quantize_8bit_kernel[(nb,)](flat, q, absmax, mids, n, BLOCKSIZE=blocksize)
    return q, absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, blocksize: int = ref.NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Triton version of :func:`ref.dequantize_blockwise_8bit`."""
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if n:
        block = 256
        code = ref.DYNAMIC_MAP.to(q.device)
        _dequantize_8bit_kernel[(triton.cdiv(n, block),)](q.reshape(-1), absmax, code, out, n, blocksize, BLOCK=block)
    return out


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`ref.double_quantize` (the mean is a torch reduction in both)."""
    offset = absmax.mean()
    qabsmax, nested = quantize_blockwise_8bit(absmax - offset, ref.NESTED_BLOCKSIZE)
    return qabsmax, nested, offset


def double_dequantize(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`ref.double_dequantize` (the offset is added by torch, so no FMA fuses it)."""
    return dequantize_blockwise_8bit(qabsmax, nested_absmax, ref.NESTED_BLOCKSIZE) + offset
