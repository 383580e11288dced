"""Pure-PyTorch reference for the fused LoRA linear in ``kernels/lora.py``.

Shapes: x [M, K] (rows are tokens), base weight W [N, K], bias [N], A [r, K], B [N, r], s the LoRA scale.
``x_dropped`` is dropout(x); without dropout it is x itself.

Forward:
    y = x W^T + bias + s * (x_dropped A^T) B^T

Backward (the base weight and bias are frozen):
    G       = dY B                                   [M, r]
    dX      = dY W            (+ s G A when x_dropped is x)
    dX_drop = s G A           (only with dropout; autograd carries it back through the dropout mask)
    dA      = s G^T x_dropped                        [r, K]
    dB      = s dY^T (x_dropped A^T)                 [N, r]

These functions are the CPU path of the LoRA layers and what the Triton kernels are tested against
(in fp64).

Quantized bases of the fused kernel besides NF4 / FP4 (:class:`~.matmul.Packed4bit`) are described by
:class:`PackedInt` (buffers) and :class:`IntQuantMeta` (everything else):
    int8 / fp8   qdata int8 or float8_e4m3fn [N, K], scale fp32 [N]:   W = qdata * scale[:, None]
    int4         qdata = packed uint8 [N, ceil(K / 2)] (column 2j in the high nibble), scale and zero bf16
                 [N, ceil(K / group_size)]:                          W = (q - zero) * scale
(all in fp32, then cast; the layouts of ``qlora_kit/formats/int8.py``, ``fp8.py`` and ``int4.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .matmul import Packed4bit, check_shape_2d, dequantize_channelwise, dequantize_int4, dequantize_packed_4bit

INT_FORMATS = ("int8", "fp8", "int4")
_CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}


@dataclass(frozen=True)
class IntQuantMeta:
    """Static description of an int8 / fp8 per-channel or int4 per-group weight (everything but its buffers).

    Args:
        shape: (N, K) = (output channels, reduction dim) of the 2-D weight.
        fmt: "int8", "fp8" or "int4".
        group_size: int4 only: columns per group, a power of two >= 32 (the fused kernels' tiles need it);
            0 for the per-channel formats.
    """

    shape: tuple[int, int]
    fmt: str
    group_size: int = 0

    def __post_init__(self):
        object.__setattr__(self, "shape", check_shape_2d(self))
        if self.fmt not in INT_FORMATS:
            raise ValueError(f"IntQuantMeta.fmt must be one of {list(INT_FORMATS)}, got {self.fmt!r}")
        g = self.group_size
        if self.fmt == "int4" and (isinstance(g, bool) or not isinstance(g, int) or g < 32 or g & (g - 1)):
            raise ValueError(
                f"IntQuantMeta.group_size must be a power of two >= 32 for int4, got {g!r}; requantize with 32, 64 "
                "or 128 (or leave such layers unfused)"
            )
        if self.fmt != "int4" and g != 0:
            raise ValueError(f"IntQuantMeta.group_size is for int4 only; pass 0 for {self.fmt}, got {g!r}")

    @property
    def ngroups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size) if self.fmt == "int4" else 1


class PackedInt(NamedTuple):
    """The buffers of an int8 / fp8 / int4 weight plus its metadata (see the module docstring for layouts)."""

    qdata: torch.Tensor
    scale: torch.Tensor
    meta: IntQuantMeta
    zero: torch.Tensor | None = None

    def check(self) -> PackedInt:
        """Validate dtypes and shapes against ``meta``; returns self."""
        m = self.meta
        n, k = m.shape
        code_shape = (n, (k + 1) // 2) if m.fmt == "int4" else (n, k)
        want = _CODE_DTYPES[m.fmt]
        if self.qdata.dtype != want or tuple(self.qdata.shape) != code_shape:
            raise ValueError(
                f"{m.fmt} qdata must be {want} of shape {code_shape}, got {self.qdata.dtype} {tuple(self.qdata.shape)}"
            )
        for what, t in (("qdata", self.qdata), ("scale", self.scale), ("zero", self.zero)):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"{m.fmt} {what} must be contiguous (row-major); call .contiguous() on it")
        stats = (n, m.ngroups) if m.fmt == "int4" else (n,)
        if tuple(self.scale.shape) != stats:
            raise ValueError(f"{m.fmt} scale must have shape {stats}, got {tuple(self.scale.shape)}")
        if m.fmt == "int4" and (self.zero is None or tuple(self.zero.shape) != stats):
            got = None if self.zero is None else tuple(self.zero.shape)
            raise ValueError(f"int4 zero must have shape {stats}, got {got}")
        if m.fmt != "int4" and self.zero is not None:
            raise ValueError(f"{m.fmt} weights have no zero point; pass zero=None")
        return self

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The (N, K) weight in ``dtype`` (computed in fp32, then cast), as the format's ``dequantize``."""
        m = self.meta
        if m.fmt == "int4":
            return dequantize_int4(self.qdata, self.scale, self.zero, m.shape[1], m.group_size, dtype)
        return dequantize_channelwise(self.qdata, self.scale, dtype)


@dataclass(frozen=True)
class LoraMeta:
    """The non-tensor inputs of the fused LoRA linear.

    Attributes:
        scale: the LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: True when a separate ``x_dropped`` is passed (dropout active).
    """

    scale: float
    dropout: bool = False


def check_lora_inputs(x, base, lora_a, lora_b, meta: LoraMeta, x_dropped) -> tuple[int, int]:
    """(N, K) of the base weight after checking a fused LoRA linear's inputs (``kernels/lora.py``).

    Raises:
        ValueError: shapes disagree, the base weight requires grad or its buffers do not match its
            metadata, or x_dropped does not match meta.
    """
    if meta.dropout != (x_dropped is not None):
        raise ValueError("fused LoRA: pass x_dropped exactly when meta.dropout is True")
    if isinstance(base, (Packed4bit, PackedInt)):
        base.check()
        n, k = base.meta.shape
    else:
        if base.requires_grad:
            raise ValueError("fused LoRA: the base weight must be frozen (requires_grad=False)")
        n, k = base.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k or tuple(lora_a.shape) != (r, k) or tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"fused LoRA: shapes disagree: input features {x.shape[-1]}, base weight {(n, k)}, "
            f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} (need A [r, {k}] and B [{n}, r])"
        )
    return n, k


def dense_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The base weight W [N, K] in ``dtype`` for a float tensor, a :class:`Packed4bit` or a :class:`PackedInt`."""
    if isinstance(base, Packed4bit):
        return dequantize_packed_4bit(base, dtype)
    if isinstance(base, PackedInt):
        return base.dequantize(dtype)
    return base.to(dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias + s * (x_dropped A^T) B^T, in the dtype of ``x`` (autograd-capable)."""
    x_dropped = x if x_dropped is None else x_dropped
    base = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    low_rank = F.linear(F.linear(x_dropped, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return base + scale * low_rank


def lora_linear_backward(
    grad_out: torch.Tensor,
    x_dropped: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The backward formulas above.

    Returns:
        (dX, dX_drop, dA, dB); ``dX`` already includes ``s G A`` and ``dX_drop`` is None when ``dropout``
        is False (x_dropped is x).
    """
    g = grad_out @ lora_b.to(grad_out.dtype)
    low = scale * (g @ lora_a.to(grad_out.dtype))
    grad_x = grad_out @ weight.to(grad_out.dtype)
    grad_x_dropped = None
    if dropout:
        grad_x_dropped = low
    else:
        grad_x = grad_x + low
    grad_a = scale * (g.t() @ x_dropped.to(grad_out.dtype))
    grad_b = scale * (grad_out.t() @ (x_dropped.to(grad_out.dtype) @ lora_a.to(grad_out.dtype).t()))
    return grad_x, grad_x_dropped, grad_a, grad_b
