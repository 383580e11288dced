"""Pure-PyTorch reference for the channel / group weight formats: int8, int4 and fp8 e4m3.

Weights are 2-D (rows = output channels, cols = reduction dim). All arithmetic is fp32 and
``torch.round`` rounds half to even (rne). The Triton kernels in ``kernels/quant_int.py`` match these
functions bit for bit; the CPU path, PTQ algorithms and QAT fake-quant call them directly.

int8 (symmetric, per row):
    scale = absmax_row / 127 (1.0 where that is 0); q = clamp(rne(w / scale), -127, 127);
    w_hat = q * scale.
int4 (asymmetric, per group of ``group_size`` columns; the last group may be partial and only its
real elements count):
    mn = min(group_min, 0), mx = max(group_max, 0); scale = bf16((mx - mn) / 15) (1.0 where that is 0);
    s = fp32(scale); zero = bf16(clamp(rne((0 - mn) / s), 0, 15)); q = clamp(rne(w / s) + zero, 0, 15);
    w_hat = (q - zero) * s. Two codes per byte along a row: column 2j in the high nibble, 2j + 1 in the
    low nibble, an odd last column padded with code 0.
    ``int4_quantize_with_params`` packs with a given scale and zero, which may be fractional (HQQ):
    with zi = rne(zero), zf = zero - zi it computes q = clamp(rne(w / s + zf) + zi, 0, 15): the RTN
    formula above when zero is an integer, and round(w / s + zero) (up to ties) when it is not.
fp8 e4m3fn (per row):
    scale = absmax_row / 448 (1.0 where that is 0); q = e4m3fn(clamp(w / scale, -448, 448)) with
    PyTorch's round-to-nearest-even cast; w_hat = q * scale.

(``0 - mn`` rather than ``-mn`` keeps the zero point +0.0 when mn is -0.0, as the kernel does.)
"""

from __future__ import annotations

import math

import torch

INT8_MAX = 127.0
INT4_MAX = 15.0
FP8_MAX = 448.0
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_group_size(group_size: int) -> int:
    """int4 groups are a power of two from 2 to 4096 columns (the Triton tiles need it)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size > 4096:
        raise ValueError(f"int4 group_size must be a power of two from 2 to 4096, got {group_size!r}")
    if group_size & (group_size - 1):
        raise ValueError(f"int4 group_size must be a power of two from 2 to 4096, got {group_size}")
    return group_size


def _row_absmax(wf: torch.Tensor) -> torch.Tensor:
    if wf.shape[1] == 0:
        return wf.new_zeros(wf.shape[0])
    return wf.abs().amax(dim=1)


def _row_scale(wf: torch.Tensor, qmax: float) -> torch.Tensor:
    scale = _row_absmax(wf) / qmax
    # 0 for all-zero rows (and for rows so tiny that absmax / qmax underflows): any scale is exact there
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8.

    Args:
        w: float matrix [rows, cols] (fp32, fp16 or bf16).

    Returns:
        (qdata int8 [rows, cols], scale fp32 [rows]).
    """
    wf = w.float().contiguous()  # codes come out row-major even for a transposed view (Conv1D)
    scale = _row_scale(wf, INT8_MAX)
    q = torch.clamp(torch.round(wf / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """qdata * scale[:, None] in fp32, then cast to ``dtype``."""
    return (qdata.float() * scale.float()[:, None]).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [rows, cols] -> uint8 [rows, ceil(cols / 2)], column 2j in the high nibble."""
    q = q.to(torch.uint8)
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes [rows, cols]."""
    q = torch.stack([packed >> 4, packed & 0xF], dim=2).reshape(packed.shape[0], 2 * packed.shape[1])
    return q[:, :cols]


def _per_column(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)[:, :cols]


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int4 codes as fp32 0..15 for broadcastable per-element scale and zero (GPTQ quantizes column by column).

    q = clamp(rne(w / s + zf) + zi, 0, 15) with zi = rne(zero), zf = zero - zi: for integer zeros exactly
    clamp(rne(w / s) + zero, 0, 15) (no extra rounding of the sum), for fractional ones round(w / s + zero).
    """
    z = zero.float()
    zi = torch.round(z)
    return torch.clamp(torch.round(w.float() / scale.float() + (z - zi)) + zi, 0, INT4_MAX)


def int4_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest (scale, zero) per group, both bf16 [rows, ceil(cols / group_size)]."""
    check_group_size(group_size)
    wf = w.float().contiguous()  # codes come out row-major even for a transposed view (Conv1D)
    rows, cols = wf.shape
    ngroups = math.ceil(cols / group_size)
    pad = ngroups * group_size - cols
    if pad:  # zero padding: min(., 0) and max(., 0) already include 0, so only real elements count
        wf = torch.cat([wf, wf.new_zeros(rows, pad)], dim=1)
    groups = wf.reshape(rows, ngroups, group_size)
    mn = groups.amin(dim=2).clamp(max=0)
    mx = groups.amax(dim=2).clamp(min=0)
    scale = ((mx - mn) / INT4_MAX).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round((0.0 - mn) / scale.float()), 0, INT4_MAX).to(torch.bfloat16)
    return scale, zero


def check_int4_params(shape, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> None:
    """Raise ValueError unless ``group_size`` is valid and scale / zero fit a weight of ``shape`` (rows, cols)
    with nonzero, finite scales (what packing with given parameters needs)."""
    check_group_size(group_size)
    rows, cols = shape
    expected = (rows, math.ceil(cols / group_size))
    if tuple(scale.shape) != expected or tuple(zero.shape) != expected:
        raise ValueError(
            f"int4 scale and zero must have shape {expected} for a {tuple(shape)} weight with "
            f"group_size={group_size}, got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    if scale.numel() and not bool(((scale != 0) & torch.isfinite(scale)).all()):
        raise ValueError("int4 scales must be nonzero and finite; replace zero scales with 1.0 before packing")


def int4_quantize_with_params(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Pack ``w`` with a given per-group scale and zero point (RTN, HQQ, GPTQ all end here).

    Args:
        w: float matrix [rows, cols].
        scale: [rows, ceil(cols / group_size)], nonzero and finite (any float dtype; read as fp32).
        zero: same shape; integer-valued for RTN / GPTQ, may be fractional (HQQ).
        group_size: columns per group.

    Returns:
        packed uint8 [rows, ceil(cols / 2)], q = clamp(rne(w / s + zf) + zi, 0, 15) with
        zi = rne(zero), zf = zero - zi.

    Raises:
        ValueError: a bad group size, mismatched shapes, or a zero / non-finite scale.
    """
    check_int4_params(w.shape, scale, zero, group_size)
    cols = w.shape[1]
    q = int4_codes(w, _per_column(scale, group_size, cols), _per_column(zero, group_size, cols))
    return pack_int4(q.to(torch.uint8))


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest int4 per group of columns.

    Returns:
        (packed uint8 [rows, ceil(cols / 2)], scale bf16 [rows, ngroups], zero bf16 [rows, ngroups]).
    """
    scale, zero = int4_params(w, group_size)
    return int4_quantize_with_params(w, scale, zero, group_size), scale, zero


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    cols: int,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(q - zero) * scale in fp32, then cast to ``dtype``: [rows, cols]."""
    q = unpack_int4(packed, cols).float()
    return ((q - _per_column(zero, group_size, cols)) * _per_column(scale, group_size, cols)).to(dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 e4m3fn.

    Returns:
        (qdata float8_e4m3fn [rows, cols], scale fp32 [rows]).
    """
    wf = w.float().contiguous()  # codes come out row-major even for a transposed view (Conv1D)
    scale = _row_scale(wf, FP8_MAX)
    # |w / scale| <= 448 up to one rounding; the clamp only guards that last ulp
    q = torch.clamp(wf / scale[:, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """qdata * scale[:, None] in fp32, then cast to ``dtype``."""
    return (qdata.float() * scale.float()[:, None]).to(dtype)
