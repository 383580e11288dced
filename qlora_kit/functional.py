"""Functional quantize / dequantize entry points.

Each call dispatches: CUDA tensors run the Triton kernels, CPU tensors the pure-PyTorch reference
(``QLORA_KIT_BACKEND`` overrides, see ``qlora_kit/_dispatch.py``). Both give the same bits.

Example:
    >>> packed, absmax = quantize_nf4(w, blocksize=64)
    >>> w_hat = dequantize_nf4(packed, absmax, w.shape, blocksize=64, dtype=torch.bfloat16)
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton
from .configs import BLOCKSIZES_4BIT
from .formats.base import check_finite
from .kernels.reference import quant_4bit as _ref


def _impl(t: torch.Tensor):
    if use_triton(t):
        from .kernels import quant_4bit as triton_impl

        return triton_impl
    return _ref


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {list(BLOCKSIZES_4BIT)}, got {blocksize!r}")


def _quantize_4bit(w, blocksize, quant_type, name):
    _check_blocksize(blocksize)
    if not w.is_floating_point():
        raise ValueError(f"{name!r} must be a floating-point tensor, got {w.dtype}")
    check_finite(w, name)
    return _impl(w).quantize_4bit(w, blocksize, quant_type)


def _dequantize_4bit(packed, absmax, shape, blocksize, dtype, quant_type):
    _check_blocksize(blocksize)
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with {(n + 1) // 2} bytes for shape {shape}, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax must hold {-(-n // blocksize)} values for shape {shape} and blocksize {blocksize}")
    return _impl(packed).dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, *, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to NF4, byte-compatible with ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``.

    Args:
        w: float tensor of any shape (blocks run over its row-major flattening).
        blocksize: 32, 64, ..., 4096.
        name: used in error messages.

    Returns:
        (packed uint8 [ceil(numel / 2)], absmax float32 [ceil(numel / blocksize)]).

    Raises:
        ValueError: bad blocksize, non-float input, or NaN/Inf in ``w``.
    """
    return _quantize_4bit(w, blocksize, "nf4", name)


def dequantize_nf4(packed, absmax, shape, blocksize: int = 64, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4`: a tensor of ``shape`` in ``dtype``."""
    return _dequantize_4bit(packed, absmax, shape, blocksize, dtype, "nf4")


def quantize_fp4(w: torch.Tensor, blocksize: int = 64, *, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to FP4 (bitsandbytes' ``quant_type="fp4"``); see :func:`quantize_nf4`."""
    return _quantize_4bit(w, blocksize, "fp4", name)


def dequantize_fp4(packed, absmax, shape, blocksize: int = 64, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_fp4`."""
    return _dequantize_4bit(packed, absmax, shape, blocksize, dtype, "fp4")


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' double quantization of a block-absmax vector.

    offset = mean(absmax); (absmax - offset) in blocks of 256 with the signed 8-bit dynamic map.

    Returns:
        (qabsmax uint8 [n], nested_absmax float32 [ceil(n / 256)], offset float32 0-dim).
    """
    absmax = absmax.float().reshape(-1)
    check_finite(absmax, "absmax")
    return _impl(absmax).double_quantize(absmax)


def double_dequantize(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """absmax (float32) back from :func:`double_quantize`'s output."""
    return _impl(qabsmax).double_dequantize(qabsmax, nested_absmax, offset)
