"""int8 weight-only, symmetric per output channel (W8A16)."""

from __future__ import annotations

import torch
from torch import nn

from .._dispatch import use_triton
from ..configs import Int8DynamicActivationConfig, Int8WeightConfig
from ..kernels.reference import quant_int as ref
from .base import (
    check_matrix,
    config_from_options,
    packed_nbytes,
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
class Int8Weight(nn.Module):
    """int8 codes [rows, cols] and one fp32 scale per row: W ~= qdata * scale[:, None].

    scale = absmax_row / 127 (1.0 for an all-zero row), qdata = clamp(round(W / scale), -127, 127).

    Example:
        >>> q = Int8Weight.from_float(w, Int8WeightConfig(), tensor_name="fc1.weight")
        >>> w_hat = q.dequantize(torch.bfloat16)
    """

    name = "int8"
    listing_order = 2  # position in CLI choices and reports
    configs = (Int8WeightConfig, Int8DynamicActivationConfig)

    @classmethod
    def config_from_options(cls, **options):
        """The weight-only config from recipe / CLI knobs (only ``compute_dtype`` applies)."""
        return config_from_options(cls.configs[0], **options)

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def describe(cls, config) -> str:
        return cls.name

    @classmethod
    def nbytes_for(cls, shape, config) -> int:
        """One byte per weight and an fp32 scale per row."""
        return shape[0] * shape[1] + 4 * shape[0]

    def kernel_weight(self):
        """The codes and row scales as the fused LoRA kernel's ``PackedInt`` operand."""
        from ..kernels.reference.lora import IntQuantMeta, PackedInt

        return PackedInt(self.qdata, self.scale, IntQuantMeta(self.shape, self.name))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> torch.Tensor:
        """y = x W^T + bias: W8A16 through ``qlora_kit::matmul_channelwise``, or with ``activation="int8"`` the
        per-token dynamic W8A8 op."""
        from .. import ops

        if activation is None:
            return ops.matmul_channelwise(x, self.qdata, self.scale, bias)
        if activation == "int8":
            return ops.int8_dynamic_linear(x, self.qdata, self.scale, bias)
        refuse_activation(self.name, activation)

    def __init__(self, shape, qdata: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if qdata is None:
            qdata = torch.zeros(self.shape, dtype=torch.int8)
        if scale is None:
            scale = torch.ones(self.shape[0], dtype=torch.float32, device=qdata.device)
        expected = (("qdata", qdata, torch.int8, self.shape), ("scale", scale, torch.float32, self.shape[:1]))
        for what, t, dtype, shp in expected:
            if t.dtype != dtype or tuple(t.shape) != shp:
                raise ValueError(f"int8 {what} must be {dtype} with shape {shp}, got {t.dtype} {tuple(t.shape)}")
        register_frozen(self, "qdata", qdata)
        register_frozen(self, "scale", scale)

    @classmethod
    def from_float(cls, w: torch.Tensor, config=None, *, tensor_name: str = "weight") -> Int8Weight:
        """Quantize a 2-D float matrix (the config carries nothing int8 needs).

        Raises:
            ValueError: ``w`` is not a 2-D float matrix or holds NaN / Inf (the message names ``tensor_name``).
        """
        check_matrix(w, tensor_name)
        qdata, scale = _impl(w).quantize_int8(w)
        return cls(w.shape, qdata, scale)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The [rows, cols] matrix in ``dtype`` (qdata * scale in fp32, then cast)."""
        return _impl(self.qdata).dequantize_int8(self.qdata, self.scale, dtype)

    def metadata(self) -> dict:
        return {"format": self.name, "shape": list(self.shape)}

    @classmethod
    def from_metadata(cls, meta: dict) -> Int8Weight:
        return cls(meta["shape"])

    @property
    def device(self) -> torch.device:
        """Where the codes live (PEFT reads ``layer.qweight.device`` of layers that have a ``qweight``)."""
        return self.qdata.device

    def nbytes(self) -> int:
        return packed_nbytes(self)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
