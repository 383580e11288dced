"""Quantized versions of nn.Linear, transformers' Conv1D, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding.

Each holds its weight as a format object (``.qweight``, see ``qlora_kit/formats``) that sees a 2-D
(output channels x rest) view of the weight; the layer's ``geometry`` (``geometry.py``) maps the float layout
to and from that view. Weights are
frozen parameters of the format object; ``.weight`` is a light view that dequantizes when read (see
``weight_view.py``); gradients flow to the input (QLoRA trains adapters on top). Linear-like layers call the
``qlora_kit`` custom ops (fused Triton matmuls on CUDA, PyTorch references on the CPU); convolutions and
embeddings dequantize to ``compute_dtype`` and call the float op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..formats.base import get_format
from .geometry import CONV, CONV1D, CONV_TRANSPOSE, EMBEDDING, LINEAR, Geometry, is_transformers_conv1d

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def _linear(layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b for a layer whose 2-D quantized view is (out, in) (Linear, Conv1D).

    Always through the ``qlora_kit`` custom ops (``qlora_kit/ops.py``): the fused Triton matmuls on CUDA,
    the pure-PyTorch references on the CPU (the same numerics as dequantize-then-``F.linear``), and one
    opaque node per layer for ``torch.compile`` on every device.
    """
    activation = getattr(layer.quant_config, "activation", None)  # W8A8 / fp8 rowwise layers
    dtype = layer.compute_dtype
    x_c = x if x.dtype == dtype else x.to(dtype)  # no .to() call where nothing changes (~40 us each, cold)
    out = ops.quantized_linear(x_c, layer.qweight, layer._bias(dtype), activation=activation)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class QuantizedLayer(nn.Module):
    """Common body: a frozen quantized weight, an optional frozen bias, and a compute dtype."""

    float_cls: type | None = None
    geometry: Geometry = LINEAR
    weight_shape: tuple[int, ...]  # the float layer's weight shape

    def __init__(self, qweight: nn.Module, bias: torch.Tensor | None, quant_config, out_dtype: torch.dtype):
        super().__init__()
        self.qweight = qweight
        self.quant_config = quant_config
        self.compute_dtype = quant_config.compute_dtype
        self.out_dtype = out_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # layout: the float weight <-> the format's 2-D view, from the geometry table
    def _to_2d(self, w: torch.Tensor) -> torch.Tensor:
        return self.geometry.to_2d(w)

    def _from_2d(self, w2d: torch.Tensor) -> torch.Tensor:
        return self.geometry.from_2d(w2d, self.weight_shape)

    @classmethod
    def _mirror(cls, module: nn.Module) -> dict:
        return {}

    @classmethod
    def from_float(cls, module: nn.Module, quant_config, format_name: str, *, tensor_name: str = "weight"):
        """Quantize ``module``'s weight into a new layer of this class."""
        attrs = {**cls._mirror(module), "weight_shape": tuple(module.weight.shape)}
        layer = cls.__new__(cls)
        for k, v in attrs.items():
            object.__setattr__(layer, k, v)
        w2d = layer._to_2d(module.weight.detach())
        qweight = get_format(format_name).from_float(w2d, quant_config, tensor_name=tensor_name)
        bias = getattr(module, "bias", None)
        QuantizedLayer.__init__(layer, qweight, bias, quant_config, module.weight.dtype)
        for k, v in attrs.items():
            setattr(layer, k, v)
        return layer

    @classmethod
    def empty_like_float(cls, module: nn.Module, quant_config, format_meta: dict):
        """A layer with empty buffers shaped for ``format_meta``, ready for ``load_state_dict``."""
        attrs = {**cls._mirror(module), "weight_shape": tuple(module.weight.shape)}
        layer = cls.__new__(cls)
        qweight = get_format(format_meta["format"]).from_metadata(format_meta)
        bias = getattr(module, "bias", None)
        QuantizedLayer.__init__(layer, qweight, bias, quant_config, module.weight.dtype)
        for k, v in attrs.items():
            setattr(layer, k, v)
        return layer

    @property
    def format_name(self) -> str:
        return self.qweight.name

    @property
    def weight(self) -> torch.Tensor:
        """The weight as model code expects it: compute dtype, device and the float layer's shape; its values
        dequantize when read (a :class:`~qlora_kit.nn.weight_view.DequantizedWeight`, no memory of its own)."""
        from .weight_view import DequantizedWeight

        return DequantizedWeight(self)

    def logical_weight_shape(self) -> tuple[int, ...]:
        """The float layer's weight shape (e.g. (in, out) for Conv1D, (out, in / groups, kh, kw) for Conv2d)."""
        return tuple(self.weight_shape)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in the float layer's layout and shape, in ``dtype`` (default: the compute dtype)."""
        return self._from_2d(self.qweight.dequantize(dtype or self.compute_dtype))

    def set_float_weight(self, w: torch.Tensor) -> None:
        """Requantize from a float weight in the float layer's layout (e.g. after merging LoRA)."""
        fmt = type(self.qweight)
        self.qweight = fmt.from_float(self._to_2d(w.detach()), self.quant_config, tensor_name="weight").to(
            self.qweight.packed.device if hasattr(self.qweight, "packed") else w.device
        )

    def _bias(self, dtype):
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"format={self.format_name}, compute_dtype={self.compute_dtype}, bias={self.bias is not None}"


class QuantLinear(QuantizedLayer):
    """Quantized ``nn.Linear``: y = x W^T + b with W (out_features, in_features) stored quantized."""

    float_cls = nn.Linear

    @classmethod
    def _mirror(cls, module):
        return {"in_features": module.in_features, "out_features": module.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x)


class QuantConv1D(QuantizedLayer):
    """Quantized transformers ``Conv1D`` (GPT-2): weight (nx, nf) stored transposed as (nf, nx)."""

    geometry = CONV1D

    @classmethod
    def _mirror(cls, module):
        nx = module.weight.shape[0]
        return {"nf": module.nf, "nx": nx, "in_features": nx, "out_features": module.nf}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x)


class _QuantConvNd(QuantizedLayer):
    """Shared by Conv1d / Conv2d: weight (out, in / groups, *kernel) seen as (out, rest)."""

    geometry = CONV

    @classmethod
    def _mirror(cls, module):
        attrs = {k: getattr(module, k) for k in _CONV_ATTRS}
        attrs["_reversed_padding_repeated_twice"] = getattr(module, "_reversed_padding_repeated_twice", None)
        return attrs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight()
        out = self.float_cls._conv_forward(self, x.to(self.compute_dtype), w, self._bias(self.compute_dtype))
        return out.to(x.dtype)


class QuantConv1d(_QuantConvNd):
    """Quantized ``nn.Conv1d``."""

    float_cls = nn.Conv1d


class QuantConv2d(_QuantConvNd):
    """Quantized ``nn.Conv2d``."""

    float_cls = nn.Conv2d


class QuantConvTranspose2d(QuantizedLayer):
    """Quantized ``nn.ConvTranspose2d``: weight (in, out / groups, kh, kw) seen as (out / groups, in * kh * kw)."""

    float_cls = nn.ConvTranspose2d
    geometry = CONV_TRANSPOSE

    @classmethod
    def _mirror(cls, module):
        attrs = {k: getattr(module, k) for k in _CONV_ATTRS}
        attrs["output_padding"] = module.output_padding
        return attrs

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = nn.ConvTranspose2d._output_padding(
            self, x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        w = self.dequantize_weight()
        out = F.conv_transpose2d(
            x.to(self.compute_dtype),
            w,
            self._bias(self.compute_dtype),
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )
        return out.to(x.dtype)


class QuantEmbedding(QuantizedLayer):
    """Quantized ``nn.Embedding``: the table (num_embeddings, embedding_dim), one row per token."""

    float_cls = nn.Embedding
    geometry = EMBEDDING

    @classmethod
    def _mirror(cls, module):
        return {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
            "max_norm": module.max_norm,
            "norm_type": module.norm_type,
            "scale_grad_by_freq": module.scale_grad_by_freq,
            "sparse": module.sparse,
        }

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight()  # a fresh copy: max_norm renormalises its looked-up rows, never the codes
        out = F.embedding(ids, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
        return out.to(self.out_dtype)


QUANTIZED_CLASS = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Embedding: QuantEmbedding,
}
LAYER_CLASSES = {c.__name__: c for c in (*QUANTIZED_CLASS.values(), QuantConv1D)}


def quantized_class_for(module: nn.Module) -> type[QuantizedLayer] | None:
    """The quantized class replacing ``module``, or None when its type is not supported.

    Matched with ``isinstance``: subclasses (Falcon's ``FalconLinear``, a user's ``nn.Linear`` subclass) are
    quantized like their base class. Quantized and fake-quant (QAT) layers are not matched again.
    """
    if isinstance(module, QuantizedLayer) or getattr(module, "_qlora_kit_fake_quant", False):
        return None
    if is_transformers_conv1d(module):
        return QuantConv1D
    for float_cls, quantized_cls in QUANTIZED_CLASS.items():
        if isinstance(module, float_cls):
            return quantized_cls
    return None


def float_layer_like(base: QuantizedLayer, weight: torch.Tensor) -> nn.Module:
    """A float layer of the kind ``base`` replaces, holding ``weight`` (float layout) and base's bias: the inverse
    of :func:`quantized_class_for` (LoRA merges without requantizing, ``hf.py`` dequantizes models with it)."""
    bias = base.bias
    with torch.device("meta"):
        if isinstance(base, (QuantLinear,)):
            layer = nn.Linear(base.in_features, base.out_features, bias=bias is not None)
        elif isinstance(base, QuantConv1D):
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(base.nf, base.nx)
        elif isinstance(base, QuantEmbedding):
            layer = nn.Embedding(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx)
        else:
            cls = base.float_cls
            kwargs = dict(
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                groups=base.groups,
                bias=bias is not None,
                padding_mode=base.padding_mode,
            )
            if isinstance(base, QuantConvTranspose2d):
                kwargs["output_padding"] = base.output_padding
            layer = cls(base.in_channels, base.out_channels, base.kernel_size, **kwargs)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if getattr(layer, "bias", None) is not None or bias is not None:
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return layer


from . import smooth as _smooth  # noqa: E402, F401  (registers the SmoothQuant layers in LAYER_CLASSES)
