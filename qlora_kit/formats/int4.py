"""int4 weight-only, asymmetric per group of input channels (W4A16), with bf16 scales and zero points."""

from __future__ import annotations

import math

import torch

from .. import ops
from .._dispatch import use_triton
from ..configs import Int4WeightConfig
from ..kernels.reference import quant_int as ref
from .base import (
    WeightFormat,
    check_matrix,
    refuse_activation,
    register_format,
    register_frozen,
)


def _impl(t: torch.Tensor):
    """The Triton kernels for CUDA tensors (or when QLORA_KIT_BACKEND=triton), else the reference."""
    if use_triton(t):
        from ..kernels import quant_int

        return quant_int
    return ref


@register_format
class Int4Weight(WeightFormat):
    """Packed 4-bit codes with a bf16 scale and zero point per (row, group of columns).

    Frozen parameters: ``packed`` uint8 [rows, ceil(cols / 2)] (column 2j in the high nibble, 2j + 1 in the low one),
    ``scale`` and ``zero`` bf16 [rows, ceil(cols / group_size)]; W ~= (q - zero) * scale in fp32.
    Round-to-nearest zeros are integers 0..15; HQQ may store fractional ones.

    Example:
        >>> q = Int4Weight.from_float(w, Int4WeightConfig(group_size=64), tensor_name="fc1.weight")
        >>> w_hat = q.dequantize(torch.bfloat16)
    """

    name = "int4"
    listing_order = 3  # position in CLI choices and reports
    configs = (Int4WeightConfig,)
    meta_fields = ("group_size",)

    @classmethod
    def describe(cls, config) -> str:
        return f"int4 (groups of {config.group_size})"

    @classmethod
    def nbytes_for(cls, shape, config) -> int:
        """Two codes per byte per row, a bf16 scale and zero per group."""
        rows, cols = shape
        return rows * ((cols + 1) // 2) + 4 * rows * math.ceil(cols / config.group_size)

    def kernel_weight(self):
        """The codes, scales and zeros as the fused LoRA kernel's ``PackedInt`` operand (None for groups narrower
        than 32 columns, which do not fit the kernel's tiles)."""
        from ..kernels.reference.lora import IntQuantMeta, PackedInt

        if self.group_size < 32:
            return None
        return PackedInt(self.packed, self.scale, IntQuantMeta(self.shape, "int4", self.group_size), zero=self.zero)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> torch.Tensor:
        """y = x W^T + bias through the ``qlora_kit::matmul_int4`` custom op (weight-only)."""
        if activation is not None:
            refuse_activation(self.name, activation)
        return ops.call(ops.matmul_int4, x, self.packed, self.scale, self.zero, bias, self.group_size)

    def __init__(
        self,
        shape,
        group_size: int,
        packed: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
    ):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.group_size = ref.check_group_size(int(group_size))
        rows, cols = self.shape
        groups = (rows, math.ceil(cols / self.group_size))
        if packed is None:
            packed = torch.zeros(rows, (cols + 1) // 2, dtype=torch.uint8)
        device = packed.device
        scale = torch.ones(groups, dtype=torch.bfloat16, device=device) if scale is None else scale
        zero = torch.zeros(groups, dtype=torch.bfloat16, device=device) if zero is None else zero
        for what, t, dtype, shp in (
            ("packed", packed, torch.uint8, (rows, (cols + 1) // 2)),
            ("scale", scale, torch.bfloat16, groups),
            ("zero", zero, torch.bfloat16, groups),
        ):
            if t.dtype != dtype or tuple(t.shape) != shp:
                raise ValueError(f"int4 {what} must be {dtype} with shape {shp}, got {t.dtype} {tuple(t.shape)}")
        register_frozen(self, "packed", packed)
        register_frozen(self, "scale", scale)
        register_frozen(self, "zero", zero)

    @classmethod
    def from_float(cls, w: torch.Tensor, config, *, tensor_name: str = "weight") -> Int4Weight:
        """Round-to-nearest int4 with ``config.group_size`` columns per group.

        Raises:
            ValueError: ``w`` is not a 2-D float matrix or holds NaN / Inf (the message names ``tensor_name``).
        """
        check_matrix(w, tensor_name)
        packed, scale, zero = _impl(w).quantize_int4(w, config.group_size)
        return cls(w.shape, config.group_size, packed, scale, zero)

    @classmethod
    def from_params(
        cls, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, *, tensor_name: str = "weight"
    ) -> Int4Weight:
        """Pack ``w`` with a scale and zero point chosen elsewhere (HQQ, GPTQ); stored as bf16.

        q = clamp(round(w / scale + frac(zero)) + int(zero), 0, 15); see kernels/reference/quant_int.py.
        """
        check_matrix(w, tensor_name)
        scale = scale.to(torch.bfloat16)
        zero = zero.to(torch.bfloat16)
        packed = _impl(w).int4_quantize_with_params(w, scale, zero, group_size)
        return cls(w.shape, group_size, packed, scale, zero)

    @classmethod
    def from_parts(cls, packed, scale, zero, shape, group_size: int) -> Int4Weight:
        """Wrap already packed codes with their bf16 scale and zero."""
        return cls(shape, group_size, packed, scale, zero)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The [rows, cols] matrix in ``dtype`` ((q - zero) * scale in fp32, then cast)."""
        return _impl(self.packed).dequantize_int4(
            self.packed, self.scale, self.zero, self.shape[1], self.group_size, dtype
        )
