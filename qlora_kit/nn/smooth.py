"""W8A8 layers whose input is divided by a per-channel SmoothQuant scale at run time.

SmoothQuant moves activation outliers into the weights: y = (x / s) (W * s)^T. Where the op producing
``x`` can absorb ``1 / s`` (a norm, a linear), the scale is folded into it and the layer stays a plain
W8A8 layer. Where nothing can (a bare Linear, one fed by a residual sum), the layer divides its input by
``s`` itself before the dynamic per-token int8 quantization, as torchao's SmoothQuant layers do: the
stored weight is ``W * s`` and the ``smooth_scale`` buffer holds ``s`` (saved and loaded with the layer).

``dequantize_weight`` returns the weight of the function the layer computes (``W * s / s``), so LoRA
merges and reports see the real weight; ``set_float_weight`` takes such a weight and multiplies ``s`` back in.
"""

from __future__ import annotations

import torch

from .quantized import LAYER_CLASSES, QuantConv1D, QuantizedLayer, QuantLinear


class _Smoothed:
    """Mixin over QuantLinear / QuantConv1D: ``smooth_scale`` (in_features,) divides the input."""

    smooth_scale: torch.Tensor

    def _init_scale(self, scale: torch.Tensor) -> None:
        self.register_buffer("smooth_scale", scale.detach().float().clone())

    @classmethod
    def empty_like_float(cls, module, quant_config, format_meta: dict):
        layer = super().empty_like_float(module, quant_config, format_meta)
        layer._init_scale(torch.ones(int(format_meta["shape"][1])))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x / self.smooth_scale.to(x.dtype))  # QuantLinear / QuantConv1D's forward

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w2d = self.qweight.dequantize(torch.float32) / self.smooth_scale[None, :]
        return self._from_2d(w2d.to(dtype or self.compute_dtype))

    def set_float_weight(self, w: torch.Tensor) -> None:
        scaled = self._from_2d(self._to_2d(w.detach().float()) * self.smooth_scale.to(w.device)[None, :])
        super().set_float_weight(scaled.to(w.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", smoothed input"


class SmoothQuantLinear(_Smoothed, QuantLinear):
    """W8A8 ``nn.Linear`` with a run-time SmoothQuant input scale."""


class SmoothQuantConv1D(_Smoothed, QuantConv1D):
    """W8A8 transformers ``Conv1D`` with a run-time SmoothQuant input scale."""


LAYER_CLASSES.update({c.__name__: c for c in (SmoothQuantLinear, SmoothQuantConv1D)})


def with_input_scale(layer: QuantizedLayer, scale: torch.Tensor) -> QuantizedLayer:
    """The same quantized ``layer`` (its weight already multiplied by ``scale`` per input channel) as a
    layer that divides its input by ``scale``; shares the packed weight and bias."""
    cls = {QuantLinear: SmoothQuantLinear, QuantConv1D: SmoothQuantConv1D}.get(type(layer))
    if cls is None:
        raise TypeError(f"a run-time SmoothQuant scale needs a QuantLinear or QuantConv1D, got {type(layer).__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)  # nn.Module state: the qweight submodule, the bias, attributes
    new._modules = dict(layer._modules)
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._init_scale(scale.to(next(iter(layer.buffers()), scale).device))
    return new
