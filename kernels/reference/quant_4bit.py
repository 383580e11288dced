"""Pure-PyTorch reference for the 4-bit block formats (NF4, FP4) and bitsandbytes' 8-bit dynamic map.

These functions define the numerics; the Triton kernels in ``kernels/quant_4bit.py`` must match them
bit for bit, and they match bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` byte for byte:

* blocks of ``blocksize`` values over the row-major flattened tensor; the last block may be partial;
* absmax[b] = max |w| over block b (fp32; an all-zero full block keeps absmax 0, the partial tail
  block stores max(absmax, 1e-38), as bitsandbytes does);
* full blocks are scaled with ``w * (1 / absmax)``, the partial tail block with ``w / absmax`` (this is
  what bitsandbytes does, and the two differ in the last bit), then clamped to [-1, 1];
* nearest code by comparing against the 15 midpoints of the sorted code table (a value exactly on a
  midpoint takes the lower code, like ``torch.bucketize``); FP4's table is not sorted, so the sorted
  position maps back to the 4-bit pattern;
* element 2i goes to the high nibble of byte i, element 2i+1 to the low nibble; an odd element count
  pads one scaled value 0.0 (NF4 pattern 7, FP4 pattern 0), as bitsandbytes does.

Double quantization (bitsandbytes' ``compress_statistics=True``): offset = mean(absmax);
(absmax - offset) is quantized in blocks of 256 with the signed 8-bit dynamic map with the arithmetic of
bitsandbytes' pure-PyTorch ``quantize_blockwise`` (block scaling as above, nearest code by midpoints, ties
to the lower index), bit for bit; the nested absmax is fp32. Note: bitsandbytes' native CPU library
quantizes this 8-bit step through a table lookup that picks the second-nearest code for values close to a
midpoint or to zero; we keep the exact nearest code (tests check that every difference is such a case).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bitsandbytes' bias) listed by bit pattern, normalised by 12.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
)
FP4_CODE = FP4_CODE / FP4_CODE.abs().max()

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015): 7 exponent levels, linear fraction."""
    values: list[float] = []
    for i in range(7):
        fraction_items = 2**i + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


DYNAMIC_MAP = _dynamic_map()
DYNAMIC_MIDPOINTS = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2  # 255 fp32 midpoints of the sorted map


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry code table of ``quant_type`` ("nf4" or "fp4"), indexed by 4-bit pattern."""
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_CODE
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def byte_table(quant_type: str) -> torch.Tensor:
    """[256, 2] fp32: the two codes a packed byte holds (element 2i in the high nibble, 2i+1 in the low one)."""
    code = code_table(quant_type)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def quantize_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(15 fp32 midpoints of the sorted code table, sorted position -> 4-bit pattern)."""
    code = code_table(quant_type)
    order = torch.argsort(code, stable=True)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order.to(torch.uint8)


def num_blocks(n: int, blocksize: int) -> int:
    return math.ceil(n / blocksize)


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1] (bitsandbytes' exact arithmetic)."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1) if full else flat.new_zeros(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().amax().clamp(min=1e-38)  # bitsandbytes stores the tail's clamped absmax
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_max, -1, 1)])
    return absmax, scaled


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (flat) -> bytes, element 2i in the high nibble; an odd length pads nibble 0."""
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return (q[0::2] << 4) | q[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` 4-bit codes as int64."""
    packed = packed.reshape(-1)
    out = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return out[:n].long()


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to packed 4-bit codes.

    Returns:
        (packed uint8 [ceil(numel / 2)], absmax fp32 [ceil(numel / blocksize)]).
    """
    flat = w.reshape(-1).float()
    absmax, scaled = _scale_blocks(flat, blocksize)
    if scaled.numel() % 2:  # an odd count pads one scaled 0.0, quantized like any value (as bitsandbytes)
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    midpoints, order = quantize_bounds(quant_type)
    q = torch.bucketize(scaled, midpoints.to(flat.device))
    q = order.to(flat.device)[q]
    return pack_nibbles(q.to(torch.uint8)), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int = 64,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """code[nibble] * absmax[block] in fp32, cast to ``dtype``, reshaped to ``shape``."""
    n = math.prod(shape)
    # one lookup per byte: a 256 x 2 table (high nibble, low nibble) of fp32 codes, 2.5x faster than unpacking
    values = F.embedding(packed.reshape(-1).int(), byte_table(quant_type).to(packed.device)).reshape(-1)[:n]
    absmax = absmax.float()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out.to(dtype).reshape(shape)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit quantization of a flat fp32 tensor with the dynamic map, per block of ``blocksize``.

    bitsandbytes' generic ``quantize_blockwise`` arithmetic, to the bit: the same block scaling as the 4-bit
    formats (full blocks ``x * (1 / absmax)``, the partial tail ``x / absmax`` with its absmax stored clamped
    to 1e-38), clamp to [-1, 1], then the nearest code by the 255 midpoints of the sorted map (a value on a
    midpoint takes the lower code). An all-zero block gets code 127 (the map's 0.0); it dequantizes to 0.

    Returns:
        (codes uint8 [numel], absmax fp32 [ceil(numel / blocksize)]).
    """
    flat = x.reshape(-1).float()
    absmax, scaled = _scale_blocks(flat, blocksize)
    q = torch.bucketize(scaled, DYNAMIC_MIDPOINTS.to(flat.device), out_int32=True)
    return q.to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """DYNAMIC_MAP[q] * absmax[block] in fp32."""
    code = DYNAMIC_MAP.to(q.device)
    block = torch.arange(q.numel(), device=q.device) // blocksize
    return code[q.reshape(-1).long()] * absmax[block]


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' double quantization of the fp32 absmax vector.

    Returns:
        (qabsmax uint8 [nblocks], nested_absmax fp32 [ceil(nblocks / 256)], offset fp32 0-dim).
    """
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return qabsmax, nested_absmax, offset


def double_dequantize(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """absmax = DYNAMIC_MAP[qabsmax] * nested_absmax[block of 256] + offset, in fp32."""
    return dequantize_blockwise_8bit(qabsmax, nested_absmax, NESTED_BLOCKSIZE) + offset
