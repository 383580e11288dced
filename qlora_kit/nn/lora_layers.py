"""LoRA wrappers over any base layer: float or quantized (QLoRA).

A wrapper keeps the original layer as ``base_layer`` (PEFT's naming, so state-dict paths match PEFT)
and adds named adapters: y = base(x) + s * B(A(dropout(x))), s = alpha / r (alpha / sqrt(r) with
rsLoRA). Supported bases: nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d
(PEFT has no LoRA for transposed convolutions), nn.Embedding, and the quantized layers of
``qlora_kit/nn/quantized.py``.

Adapter tensors and their PEFT key names (per adapter ``name``):
    linear-like   lora_A.<name>.weight [r, in]          lora_B.<name>.weight [out, r]
    conv          lora_A.<name>.weight [r, in, *k]      lora_B.<name>.weight [out, r / groups, 1, ...]
    conv-transp.  lora_A.<name>.weight [in, r, *k]      lora_B.<name>.weight [out, r, 1, ...]
    embedding     lora_embedding_A.<name> [r, num]      lora_embedding_B.<name> [dim, r]
    DoRA          lora_magnitude_vector.<name>.weight   [out] (conv: [1, out, 1, ...])

Every kind also has a 2-D view, (output channels x reduction), in which the update is s * B2d @ A2d;
merging, PiSSA, LoftQ and DoRA norms are written once on that view, in :class:`LoraLayer`
(``lora_base.py``). This file holds the per-kind wrappers and picks one for a layer.

On CUDA a linear-like layer with one active adapter runs the fused Triton kernel
(``kernels/lora.py``): the low-rank update is added in the epilogue of the base matmul, for float and
weight-only quantized bases (NF4, FP4, int8, fp8, int4; not W8A8 / fp8-dynamic layers). Elsewhere the
forward is the plain PyTorch composition (the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import use_triton
from .geometry import CONV1D, CONV_TRANSPOSE, from_2d, geometry_of, shape_2d, to_2d
from .lora_base import LoraFactor, LoraLayer  # noqa: F401  (LoraFactor: public here, as before)
from .quantized import QuantizedLayer, float_layer_like  # noqa: F401  (float_layer_like: public here, as before)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# LoRA kind of each layer geometry: Conv1D is linear-like (its forward is x W^T + b on the 2-D view)
_KIND_OF_GEOMETRY = {
    "linear": "linear",
    "conv1d": "linear",
    "conv": "conv",
    "conv_transpose": "conv_transpose",
    "embedding": "embedding",
}


def lora_kind(module: nn.Module) -> str | None:
    """The LoRA kind of a supported base layer ("linear", "conv", "conv_transpose", "embedding"), else None.

    Every layer with a geometry (``geometry.py``): Linear, transformers Conv1D, Conv1d/2d/3d,
    ConvTranspose1d/2d/3d, Embedding, their subclasses and the quantized layers.
    """
    geom = geometry_of(module)
    return None if geom is None else _KIND_OF_GEOMETRY[geom.name]


def _is_conv1d_layout(base: nn.Module) -> bool:
    """transformers' Conv1D (float or quantized) stores its weight as (in, out)."""
    return geometry_of(base) is CONV1D


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear, transformers' Conv1D, QuantLinear and QuantConv1D."""

    kind = "linear"

    def _dims(self):
        fan_out, fan_in = shape_2d(self.base_layer, self._base_shape())
        return fan_in, fan_out

    def _factor_shapes(self, r):
        fan_in, fan_out = self._dims()
        return (r, fan_in), (fan_out, r)

    def _lora_forward(self, name, x, *args, **kwargs):
        return F.linear(F.linear(x, self._a(name)), self._b(name))

    def _fused_forward(self, x, live):
        if not self.fuse or len(live) != 1 or live[0] in self.lora_magnitude_vector or not use_triton(x):
            return None
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None
        from .fake_quant import is_fake_quant

        if is_fake_quant(self.base_layer):  # QAT base: its forward fake-quantizes the weight, the kernel would not
            return None
        from ..ops_lora import LoraMeta, lora_linear

        name, base = live[0], self.base_layer
        dropout = self.lora_dropout[name]
        if isinstance(base, QuantizedLayer):
            weight = self._packed_base(base)
            if weight is None:
                return None
            x_c = x.to(base.compute_dtype)
        else:
            w = base.weight
            if w.requires_grad or not w.is_floating_point():
                return None
            weight = w.t() if _is_conv1d_layout(base) else w
            x_c = x
        bias = base.bias
        x_d = dropout(x_c) if isinstance(dropout, nn.Dropout) and self.training and dropout.p > 0 else None
        meta = LoraMeta(scale=self.scaling[name], dropout=x_d is not None)
        y = lora_linear(x_c, weight, bias, self._a(name), self._b(name), meta, x_dropped=x_d)
        return y.to(x.dtype)

    @staticmethod
    def _packed_base(base: QuantizedLayer):
        """The quantized weight as the fused kernel's weight object, or None when the kernel cannot take it.

        Weight-only formats only: a layer that also quantizes its activations (W8A8 / fp8 dynamic,
        ``quant_config.activation``) computes something else, so it keeps its own forward. int4 groups
        narrower than 32 columns do not fit the kernel's tiles.
        """
        if getattr(base.quant_config, "activation", None) is not None:
            return None
        kernel_weight = getattr(base.qweight, "kernel_weight", None)  # each format owns its kernel view
        return kernel_weight() if callable(kernel_weight) else None


class LoraConv(LoraLayer):
    """LoRA over nn.Conv1d/2d/3d and the quantized convolutions: A is a conv with the base's geometry
    (groups 1), B a 1x1 conv with the base's groups, as PEFT."""

    kind = "conv"

    def _nd(self) -> int:
        return len(self.base_layer.kernel_size)

    def _dims(self):
        return self.base_layer.in_channels, self.base_layer.out_channels

    def _factor_shapes(self, r):
        base = self.base_layer
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // self.groups) + (1,) * self._nd()

    def _channel_view(self, t, like):
        return t.reshape((1, -1) + (1,) * (like.dim() - 2))

    def _lora_forward(self, name, x, *args, **kwargs):
        base, conv = self.base_layer, _CONV[self._nd()]
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        h = conv(x, self._a(name), None, base.stride, padding, base.dilation, 1)
        return conv(h, self._b(name), None, 1, 0, 1, self.groups)


class LoraConvTranspose(LoraLayer):
    """LoRA over nn.ConvTranspose1d/2d/3d and QuantConvTranspose2d (not in PEFT).

    A is a transposed conv with the base's geometry from ``in`` to ``r`` channels (weight [in, r, *k]),
    B a 1x1 conv from ``r`` to ``out`` (weight [out, r, 1, ...]); the update's weight (groups=1) is
    dW[i, o] = sum_j A[i, j] B[o, j].
    """

    kind = "conv_transpose"

    @staticmethod
    def rank_of(lora_a):
        return int(lora_a.shape[1])

    def _nd(self) -> int:
        return len(self.base_layer.kernel_size)

    def _dims(self):
        return self.base_layer.in_channels, self.base_layer.out_channels

    def _factor_shapes(self, r):
        base = self.base_layer
        return (base.in_channels, r, *base.kernel_size), (base.out_channels, r) + (1,) * self._nd()

    def a_2d(self, name):  # A [in, r, *k] is a transposed-conv weight with r output channels
        return to_2d(CONV_TRANSPOSE, self._a(name))

    def _set_a_2d(self, name, a2d):
        a = self._a(name)
        with torch.no_grad():
            a.copy_(from_2d(CONV_TRANSPOSE, a2d, a.shape))

    def _channel_view(self, t, like):
        return t.reshape((1, -1) + (1,) * (like.dim() - 2))

    def _lora_forward(self, name, x, *args, **kwargs):
        base, nd = self.base_layer, self._nd()
        output_size = kwargs.get("output_size", args[0] if args else None)
        output_padding = base.output_padding
        if output_size is not None:
            output_padding = nn.ConvTranspose2d._output_padding(
                base, x, output_size, base.stride, base.padding, base.kernel_size, nd, base.dilation
            )
        h = _CONV_T[nd](x, self._a(name), None, base.stride, base.padding, output_padding, 1, base.dilation)
        return _CONV[nd](h, self._b(name))


class LoraEmbedding(LoraLayer):
    """LoRA over nn.Embedding / QuantEmbedding: out += s * A^T[ids] B^T (PEFT's lora_embedding_A/B)."""

    kind = "embedding"

    def _dims(self):
        return self.base_layer.num_embeddings, self.base_layer.embedding_dim

    def _factor_shapes(self, r):
        num, dim = self._dims()
        return (r, num), (dim, r)

    def _a(self, name):
        return self.lora_embedding_A[name]

    def _b(self, name):
        return self.lora_embedding_B[name]

    # LoRA's output channels are the embedding dims: the transpose of the table's one-row-per-token view
    def _w_to_2d(self, w):  # (num, dim) -> (dim, num)
        return w.t()

    def _w_from_2d(self, w2d):
        return w2d.t()

    def _lora_forward(self, name, ids, *args, **kwargs):
        base = self.base_layer
        h = F.embedding(
            ids,
            self._a(name).t(),
            base.padding_idx,
            None,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return h @ self._b(name).t()


_WRAPPERS = {"linear": LoraLinear, "conv": LoraConv, "conv_transpose": LoraConvTranspose, "embedding": LoraEmbedding}


def lora_wrapper_class(module: nn.Module) -> type[LoraLayer]:
    """The LoRA wrapper class for a supported ``module``."""
    kind = lora_kind(module)
    if kind is None:
        raise ValueError(
            f"LoRA does not support {type(module).__name__}; supported: Linear, transformers Conv1D, Conv1d/2d/3d, "
            "ConvTranspose1d/2d/3d, Embedding and their quantized versions"
        )
    return _WRAPPERS[kind]


def wrap_with_lora(module: nn.Module) -> LoraLayer:
    """A LoRA wrapper (without adapters yet) around a supported ``module``."""
    return lora_wrapper_class(module)(module)
