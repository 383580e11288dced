"""Fake-quant (QAT) layers: float layers whose forward sees their weight quantized and dequantized.

A fake-quant layer is an instance of a subclass of the float layer it replaces (``FakeQuantLinear`` is an
``nn.Linear``), so code that looks for linear layers (LoRA, optimisers, state dicts) keeps working; it
holds the same float weight Parameter, which keeps training. Its forward mirrors the matching
``QuantizedLayer`` forward (``qlora_kit/nn/quantized.py``) operation for operation, with the weight
quantized by the core format's own functions, so the converted layer's output equals the fake-quant
output bit for bit on the CPU path.

Gradients (straight-through estimator): d w_hat / d w = 1. With learnable int4 scales (LSQ, Esser et al.,
2020; zero points as in LSQ+), w_hat = (clamp(round(w / s + z), 0, 15) - z) * s per group and

    inside the range:  dw = g,  ds = g * ((q - z) - w / s),  dz = 0
    clipped:           dw = 0,  ds = g * (q - z),            dz = -g * s

summed over each group and scaled by LSQ's 1 / sqrt(group_size * 15).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.base import get_format
from ..kernels.reference import quant_int as _qi
from .geometry import from_2d, is_transformers_conv1d, to_2d
from .quantized import QUANTIZED_CLASS, QuantConv1D


class _StraightThrough(torch.autograd.Function):
    """Forward: the format's quantize-dequantize of ``w2d``; backward: the identity."""

    @staticmethod
    def forward(ctx, w2d, fmt_name, config, dtype):
        fmt = get_format(fmt_name)
        return fmt.from_float(w2d.detach(), config, tensor_name="weight").dequantize(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def _per_column(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)[:, :cols]


def _group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = t.shape
    ngroups = math.ceil(cols / group_size)
    pad = ngroups * group_size - cols
    if pad:
        t = torch.cat([t, t.new_zeros(rows, pad)], dim=1)
    return t.reshape(rows, ngroups, group_size).sum(2)


class _LearnedInt4(torch.autograd.Function):
    """int4 per group with learnable scale and zero (LSQ / LSQ+ gradients, see the module docstring).

    The forward packs and dequantizes with ``kernels/reference/quant_int`` (the int4 format's numerics)
    using the bf16-rounded parameters the converted ``Int4Weight`` will store.
    """

    @staticmethod
    def forward(ctx, w2d, scale, zero, group_size, dtype):
        s, z = scale.detach().to(torch.bfloat16), zero.detach().to(torch.bfloat16)
        cols = w2d.shape[1]
        packed = _qi.int4_quantize_with_params(w2d.detach().float(), s, z, group_size)
        ctx.save_for_backward(w2d, s, z, packed)
        ctx.group_size = group_size
        return _qi.dequantize_int4(packed, s, z, cols, group_size, dtype)

    @staticmethod
    def backward(ctx, grad):
        w2d, s, z, packed = ctx.saved_tensors
        g = ctx.group_size
        cols = w2d.shape[1]
        sc, zc = _per_column(s, g, cols), _per_column(z, g, cols)
        q = _qi.unpack_int4(packed, cols).float()
        v = w2d.detach().float() / sc + zc
        inside = (v >= 0) & (v <= _qi.INT4_MAX)
        grad = grad.float()
        grad_w = (grad * inside).to(w2d.dtype)
        lsq = 1.0 / math.sqrt(g * _qi.INT4_MAX)
        ds = torch.where(inside, (q - zc) - w2d.detach().float() / sc, q - zc)
        grad_s = _group_sum(grad * ds, g) * lsq
        grad_z = _group_sum(torch.where(inside, torch.zeros_like(grad), -grad * sc), g) * lsq
        return grad_w, grad_s, grad_z, None, None


class FakeQuantMixin:
    """What every fake-quant layer adds to its float class. Set up by :func:`to_fake_quant`."""

    _qlora_kit_fake_quant = True  # read by quantized_class_for: a fake-quant layer converts with convert_qat
    qat_format: str
    qat_config: object
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    float_cls: type

    # layout (float layout <-> the format's 2-D view): the geometry table, as in the quantized layers
    def _to_2d(self, w: torch.Tensor) -> torch.Tensor:
        return to_2d(self, w)

    def _from_2d(self, w2d: torch.Tensor) -> torch.Tensor:
        return from_2d(self, w2d, self.weight.shape)

    @property
    def learnable(self) -> bool:
        return getattr(self, "qat_scale", None) is not None

    def effective_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bf16 (scale, zero) the learnable int4 forward uses and the converted layer stores."""
        return self.qat_scale.detach().to(torch.bfloat16), self.qat_zero.detach().to(torch.bfloat16)

    def fake_weight_2d(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight's 2-D view, quantized and dequantized to ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        w2d = self._to_2d(self.weight)
        if self.learnable:
            return _LearnedInt4.apply(w2d, self.qat_scale, self.qat_zero, self.qat_config.group_size, dtype)
        return _StraightThrough.apply(w2d, self.qat_format, self.qat_config, dtype)

    def fake_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fake-quantized weight in the float layer's layout."""
        return self._from_2d(self.fake_weight_2d(dtype))

    def _bias(self, dtype):
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, fake_quant={self.qat_format}, learnable_scales={self.learnable}"


class FakeQuantLinear(FakeQuantMixin, nn.Linear):
    """``nn.Linear`` whose forward uses its fake-quantized weight (mirrors ``QuantLinear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        return F.linear(x.to(cd), self.fake_weight_2d(cd), self._bias(cd)).to(x.dtype)


class _FakeQuantConvNd(FakeQuantMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        out = self.float_cls._conv_forward(self, x.to(cd), self.fake_weight(cd), self._bias(cd))
        return out.to(x.dtype)


class FakeQuantConv1d(_FakeQuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized weight (mirrors ``QuantConv1d``)."""


class FakeQuantConv2d(_FakeQuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight (mirrors ``QuantConv2d``)."""


class FakeQuantConvTranspose2d(FakeQuantMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a fake-quantized weight (mirrors ``QuantConvTranspose2d``)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        cd = self.compute_dtype
        out = F.conv_transpose2d(
            x.to(cd),
            self.fake_weight(cd),
            self._bias(cd),
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )
        return out.to(x.dtype)


class FakeQuantEmbedding(FakeQuantMixin, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (mirrors ``QuantEmbedding``)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight()
        out = F.embedding(ids, w, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)
        return out.to(self.out_dtype)


_FAKE_CLASS = {
    nn.Linear: FakeQuantLinear,
    nn.Conv1d: FakeQuantConv1d,
    nn.Conv2d: FakeQuantConv2d,
    nn.ConvTranspose2d: FakeQuantConvTranspose2d,
    nn.Embedding: FakeQuantEmbedding,
}
_CONV1D_FAKE: list[type] = []


def _fake_conv1d_class() -> type:
    """``FakeQuantConv1D``: transformers' GPT-2 Conv1D (weight stored (in, out)) with a fake-quantized weight,
    computing ``F.linear`` on the (out, in) view as ``QuantConv1D`` does. Built on first use so that this module
    does not import transformers."""
    if not _CONV1D_FAKE:
        from transformers.pytorch_utils import Conv1D

        def forward(self, x):
            cd = self.compute_dtype
            return F.linear(x.to(cd), self.fake_weight_2d(cd), self._bias(cd)).to(x.dtype)

        cls = type(
            "FakeQuantConv1D",
            (FakeQuantMixin, Conv1D),
            {
                "forward": forward,
                "__module__": __name__,
                "__doc__": "transformers ``Conv1D`` with a fake-quantized weight (mirrors ``QuantConv1D``).",
            },
        )
        _CONV1D_FAKE.append(cls)
    return _CONV1D_FAKE[0]


def fake_class_for(module: nn.Module) -> type | None:
    """The fake-quant class for ``module`` (matched with ``isinstance``: subclasses too), or None when unsupported."""
    if is_fake_quant(module):
        return None
    if is_transformers_conv1d(module):
        return _fake_conv1d_class()
    for float_cls, fake_cls in _FAKE_CLASS.items():
        if isinstance(module, float_cls):
            return fake_cls
    return None


def is_fake_quant(module: nn.Module) -> bool:
    return isinstance(module, FakeQuantMixin)


def quantized_class_of(module: FakeQuantMixin) -> type:
    """The ``QuantizedLayer`` class a fake-quant layer converts to."""
    if module.float_cls is not None and any(c.__name__ == "Conv1D" for c in module.float_cls.__mro__):
        return QuantConv1D
    return next(q for f, q in QUANTIZED_CLASS.items() if issubclass(module.float_cls, f))


def to_fake_quant(module: nn.Module, fmt_name: str, fmt_config, *, learnable_scales: bool = False) -> nn.Module:
    """A fake-quant layer sharing ``module``'s parameters, buffers and attributes (``module`` is left as is).

    Args:
        module: a supported float layer (Linear, transformers Conv1D, Conv1d/2d, ConvTranspose2d, Embedding).
        fmt_name: core format name ("nf4", "fp4", "int8", "int4", "fp8").
        fmt_config: the matching core format config (group size / blocksize, compute dtype).
        learnable_scales: int4 only: learn the per-group scale and zero (initialised by round-to-nearest).
    """
    cls = fake_class_for(module)
    if cls is None:
        raise ValueError(f"fake quantization does not support {type(module).__name__}; exclude it with filter_fn")
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new.float_cls = type(module)
    new.qat_format = fmt_name
    new.qat_config = fmt_config
    new.compute_dtype = fmt_config.compute_dtype
    new.out_dtype = module.weight.dtype
    if learnable_scales:
        if fmt_name != "int4":
            raise ValueError(f"learnable_scales needs the int4 format, got {fmt_name!r}; use Int4WeightConfig")
        scale, zero = _qi.int4_params(new._to_2d(module.weight.detach()), fmt_config.group_size)
        new.qat_scale = nn.Parameter(scale.float())
        new.qat_zero = nn.Parameter(zero.float())
    return new
