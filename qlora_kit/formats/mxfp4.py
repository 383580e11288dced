"""MXFP4 weights (OCP Microscaling): FP4 E2M1 elements, one E8M0 power-of-two scale per 32 values along K.

The format gpt-oss ships in; 4.25 bits per weight. Numerics and layout: ``kernels/reference/mxfp4.py``.
This file is the whole format: its config, its weight class and its ``qlora_kit::matmul_mxfp4`` custom op
(Triton kernels on CUDA, ``kernels/matmul_mxfp4.py``; the reference on the CPU).

Example:
    >>> model = qlora_kit.quantize(model, qlora_kit.MXFP4Config())
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._dispatch import call, custom_op, use_cpu_kernels, use_triton
from ..configs import WeightConfig, check_compute_dtype
from ..kernels import cpu
from ..kernels.reference import mxfp4 as ref
from .base import (
    WeightFormat,
    check_matrix,
    refuse_activation,
    register_format,
    register_frozen,
)


@dataclass(frozen=True)
class MXFP4Config(WeightConfig):
    """MXFP4 weight-only (OCP MX: blocks of 32 along the input dimension, E8M0 scales, FP4 E2M1 elements).

    Args:
        compute_dtype: dtype the layer computes in (weights dequantize to it).
    """

    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        check_compute_dtype(type(self).__name__, self.compute_dtype)


def _kernels(t: Tensor):
    """The Triton matmuls for CUDA tensors (or when QLORA_KIT_BACKEND=triton), else None (the reference runs)."""
    if use_triton(t):
        from ..kernels import matmul_mxfp4

        return matmul_mxfp4
    return None


def _codec(t: Tensor):
    """quantize_mxfp4 / dequantize_mxfp4: the Triton kernels where the matmuls run them, else the reference."""
    if use_triton(t):
        from ..kernels import quant_mxfp4

        return quant_mxfp4
    return ref


@custom_op("qlora_kit::matmul_mxfp4")
def matmul_mxfp4(x: Tensor, packed: Tensor, scales: Tensor, bias: Tensor | None, k: int) -> Tensor:
    """y = x W^T + bias for an MXFP4 weight (packed (N, ceil(K/32)*16), scales (N, ceil(K/32)))."""
    y = cpu.matmul_mxfp4(x, packed, scales, k, bias) if use_cpu_kernels(x) else None
    kernels = _kernels(x) if y is None else None
    if kernels is not None:
        return kernels.matmul_mxfp4(x, packed, scales, k, bias)
    return ref.matmul_mxfp4_ref(x, packed, scales, k, bias) if y is None else y


@torch.library.custom_op("qlora_kit::matmul_mxfp4_grad_input", mutates_args=())
def _matmul_mxfp4_grad_input(grad: Tensor, packed: Tensor, scales: Tensor, k: int) -> Tensor:
    kernels = _kernels(grad)
    if kernels is not None:
        return kernels.matmul_mxfp4_grad_input(grad, packed, scales, k)
    return grad @ ref.dequantize_mxfp4(packed, scales, k, grad.dtype)


@matmul_mxfp4.register_fake
def _(x, packed, scales, bias, k):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@_matmul_mxfp4_grad_input.register_fake
def _(grad, packed, scales, k):
    return grad.new_empty((*grad.shape[:-1], k))


def _setup(ctx, inputs, output):
    x, packed, scales, bias, k = inputs
    ctx.save_for_backward(packed, scales)
    ctx.k = k
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    packed, scales = ctx.saved_tensors
    gx = _matmul_mxfp4_grad_input(grad, packed, scales, ctx.k) if ctx.needs_input_grad[0] else None
    gb = grad.reshape(-1, packed.shape[0]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return gx, None, None, gb, None


matmul_mxfp4.register_autograd(_backward, setup_context=_setup)


@register_format
class MXFP4Weight(WeightFormat):
    """MXFP4 weight: frozen ``packed`` uint8 (rows, ceil(cols/32) * 16), ``scales`` E8M0 uint8 (rows, ceil(cols/32)).

    Example:
        >>> q = MXFP4Weight.from_float(w, MXFP4Config(), tensor_name="fc1.weight")
        >>> w_hat = q.dequantize(torch.bfloat16)
    """

    name = "mxfp4"
    listing_order = 5  # after the bitsandbytes / integer formats in CLI choices and reports
    configs = (MXFP4Config,)

    def __init__(self, shape, packed: Tensor | None = None, scales: Tensor | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        rows, cols = self.shape
        blocks = ref.padded_k(cols) // ref.BLOCK
        packed = torch.zeros(rows, blocks * ref.BLOCK // 2, dtype=torch.uint8) if packed is None else packed
        scales = torch.zeros(rows, blocks, dtype=torch.uint8, device=packed.device) if scales is None else scales
        for what, t, shp in (("packed", packed, (rows, blocks * ref.BLOCK // 2)), ("scales", scales, (rows, blocks))):
            if t.dtype != torch.uint8 or tuple(t.shape) != shp:
                raise ValueError(f"mxfp4 {what} must be torch.uint8 with shape {shp}, got {t.dtype} {tuple(t.shape)}")
        register_frozen(self, "packed", packed)
        register_frozen(self, "scales", scales)

    @classmethod
    def describe(cls, config) -> str:
        return "mxfp4 (blocks of 32, E8M0 scales)"

    @classmethod
    def nbytes_for(cls, shape, config) -> int:
        """Two E2M1 codes per byte and one E8M0 byte per block of 32, per row (K padded to whole blocks)."""
        rows, cols = shape
        blocks = ref.padded_k(cols) // ref.BLOCK
        return rows * blocks * (ref.BLOCK // 2 + 1)

    @classmethod
    def from_float(cls, w: Tensor, config=None, *, tensor_name: str = "weight") -> MXFP4Weight:
        """Quantize a 2-D float matrix (OCP MX conversion; the config carries nothing the codes need).

        Raises:
            ValueError: ``w`` is not a 2-D float matrix or holds NaN / Inf (the message names ``tensor_name``).
        """
        check_matrix(w, tensor_name)
        packed, scales = _codec(w).quantize_mxfp4(w.contiguous())
        return cls(w.shape, packed, scales)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The (rows, cols) matrix in ``dtype`` (element * 2**(E - 127) in fp32, then cast)."""
        return _codec(self.packed).dequantize_mxfp4(self.packed, self.scales, self.shape[1], dtype)

    def linear(self, x: Tensor, bias: Tensor | None, activation: str | None = None) -> Tensor:
        """y = x W^T + bias through ``qlora_kit::matmul_mxfp4`` (weight-only)."""
        if activation is not None:
            refuse_activation(self.name, activation)
        return call(matmul_mxfp4, x, self.packed, self.scales, bias, self.shape[1])
