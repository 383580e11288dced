"""Shared body of the per-output-channel 8-bit formats (int8 and fp8 e4m3 differ in the code type and the
activation mode they run)."""

from __future__ import annotations

import torch

from .. import ops
from .._dispatch import use_triton
from ..kernels.reference import quant_int as ref
from .base import WeightFormat, check_matrix, refuse_activation, register_frozen


def _impl(t: torch.Tensor):
    """The Triton kernels for CUDA tensors (or when QLORA_KIT_BACKEND=triton), else the reference."""
    if use_triton(t):
        from ..kernels import quant_int

        return quant_int
    return ref


class ChannelwiseWeight(WeightFormat):
    """Codes [rows, cols] of ``code_dtype`` and one fp32 scale per row: W ~= qdata * scale[:, None].

    A subclass sets ``code_dtype``, ``activation`` (the dynamic activation mode its codes run, "int8" / "fp8")
    and ``activation_op`` (that mode's ``qlora_kit.ops`` function); quantize / dequantize are the
    ``quantize_<name>`` / ``dequantize_<name>`` functions of ``kernels/reference/quant_int.py`` (or Triton's).
    """

    code_dtype = torch.int8
    activation = ""
    activation_op = ""

    @classmethod
    def nbytes_for(cls, shape, config) -> int:
        """One byte per weight and an fp32 scale per row."""
        return shape[0] * shape[1] + 4 * shape[0]

    def kernel_weight(self):
        """The codes and row scales as the fused LoRA kernel's ``PackedInt`` operand."""
        from ..kernels.reference.lora import IntQuantMeta, PackedInt

        return PackedInt(self.qdata, self.scale, IntQuantMeta(self.shape, self.name))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> torch.Tensor:
        """y = x W^T + bias: weight-only through ``qlora_kit::matmul_channelwise``, or with ``activation`` equal to
        the format's mode the per-token dynamic op (W8A8 / fp8 rowwise)."""
        if activation is None:
            return ops.call(ops.matmul_channelwise, x, self.qdata, self.scale, bias)
        if activation == self.activation:
            return ops.call(getattr(ops, self.activation_op), x, self.qdata, self.scale, bias)
        refuse_activation(self.name, activation)

    def __init__(self, shape, qdata: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if qdata is None:
            qdata = torch.zeros(self.shape, dtype=self.code_dtype)
        if scale is None:
            scale = torch.ones(self.shape[0], dtype=torch.float32, device=qdata.device)
        expected = (("qdata", qdata, self.code_dtype, self.shape), ("scale", scale, torch.float32, self.shape[:1]))
        for what, t, dtype, shp in expected:
            if t.dtype != dtype or tuple(t.shape) != shp:
                raise ValueError(f"{self.name} {what} must be {dtype} with shape {shp}, got {t.dtype} {tuple(t.shape)}")
        register_frozen(self, "qdata", qdata)
        register_frozen(self, "scale", scale)

    @classmethod
    def from_float(cls, w: torch.Tensor, config=None, *, tensor_name: str = "weight"):
        """Quantize a 2-D float matrix (the config carries nothing the codes need).

        Raises:
            ValueError: ``w`` is not a 2-D float matrix or holds NaN / Inf (the message names ``tensor_name``).
        """
        check_matrix(w, tensor_name)
        qdata, scale = getattr(_impl(w), f"quantize_{cls.name}")(w)
        return cls(w.shape, qdata, scale)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The [rows, cols] matrix in ``dtype`` (qdata * scale in fp32, then cast)."""
        return getattr(_impl(self.qdata), f"dequantize_{self.name}")(self.qdata, self.scale, dtype)
