"""Quantization-aware training: ``prepare_qat`` -> train -> ``convert_qat``.

``prepare_qat`` swaps the chosen layers for fake-quant layers (``qlora_kit/nn/fake_quant.py``): the float
weights keep training while every forward sees them quantized with the core format's own functions
(straight-through gradients; optionally LSQ-learned int4 scales and zero points). ``convert_qat`` turns
each fake-quant layer into the core's quantized layer holding exactly the weight the fake-quant forward
used, so on the CPU path the converted model's outputs equal the fake-quant outputs bit for bit (the
fused CUDA kernels accumulate in a different order).

QAT + LoRA: fake-quant layers are float layers to LoRA, so ``add_lora`` wraps them (their weight is
then frozen, and only the adapters train against the quantized base); ``convert_qat`` converts the base
inside each LoRA wrapper and keeps the adapters.

Example:
    >>> model = qlora_kit.prepare_qat(model, qlora_kit.Int4WeightConfig(group_size=128))
    >>> ...  # train as usual
    >>> model = qlora_kit.convert_qat(model)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .configs import Int4WeightConfig
from .formats.base import check_finite, get_format
from .kernels.reference import quant_int as _qi
from .nn.fake_quant import fake_class_for, is_fake_quant, quantized_class_of, to_fake_quant
from .nn.quantized import QuantizedLayer
from .registry import format_for_config, weight_config_classes

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class QATConfig:
    """What the fake-quant layers simulate.

    Args:
        weight: a core format config (``Int4WeightConfig``, ``NF4Config``, ``FP4Config``, ``Int8WeightConfig``,
            ``FP8WeightConfig``); its compute dtype is the dtype the fake-quant layers compute in.
        learnable_scales: learn the int4 per-group scale and zero point (LSQ / LSQ+); ``weight`` must be
            an ``Int4WeightConfig``.

    Example:
        >>> QATConfig(Int4WeightConfig(group_size=64, compute_dtype=torch.float32), learnable_scales=True)
    """

    weight: object = Int4WeightConfig(group_size=128, compute_dtype=torch.float32)
    learnable_scales: bool = False

    def __post_init__(self):
        weight_only = weight_config_classes(weight_only=True)
        if type(self.weight) not in weight_only:
            known = ", ".join(c.__name__ for c in weight_only)
            raise ValueError(f"QATConfig.weight must be a format config ({known}), got {type(self.weight).__name__}")
        if not isinstance(self.learnable_scales, bool):
            raise ValueError(f"QATConfig.learnable_scales must be True or False, got {self.learnable_scales!r}")
        if self.learnable_scales and not isinstance(self.weight, Int4WeightConfig):
            raise ValueError(
                "QATConfig.learnable_scales needs weight=Int4WeightConfig(...); other formats have "
                "no learnable scale here"
            )


def prepare_qat(model: nn.Module, config, *, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap the chosen layers of ``model`` for fake-quant layers, in place.

    Args:
        model: a float model (possibly with LoRA adapters: the base layers inside the wrappers are swapped).
        config: a :class:`QATConfig`, or a core format config (shorthand for ``QATConfig(weight=config)``).
        filter_fn: ``filter_fn(module, fqn) -> bool``; default ``qlora_kit.default_filter`` (output heads, the
            first / last convolution of image models and embeddings stay float).

    Returns:
        The same model. Parameters are shared with the original layers, so an optimiser built before
        or after this call trains the same tensors (plus the new scales when ``learnable_scales``).

    Raises:
        TypeError: ``config`` is neither a QATConfig nor a format config.
        ValueError: a chosen weight holds NaN/Inf.
    """
    from .api import default_filter

    if not isinstance(config, QATConfig):
        if format_for_config(config) is None:
            raise TypeError(f"prepare_qat() needs a QATConfig or a format config, got {type(config).__name__}")
        config = QATConfig(weight=config)
    fmt_name = format_for_config(config.weight).name
    keep = filter_fn or default_filter(model)
    targets = []
    for fqn, module in model.named_modules():
        if not fqn or is_fake_quant(module) or isinstance(module, QuantizedLayer) or fake_class_for(module) is None:
            continue
        if keep(module, fqn) and not any(fqn.startswith(t + ".") for t, _ in targets):
            targets.append((fqn, module))
    for fqn, module in targets:
        check_finite(module.weight.detach(), f"{fqn}.weight")
        model.set_submodule(
            fqn, to_fake_quant(module, fmt_name, config.weight, learnable_scales=config.learnable_scales)
        )
    return model


@torch.no_grad()
def _convert_one(module) -> QuantizedLayer:
    cls = quantized_class_of(module)
    if module.learnable:
        scale, zero = module.effective_params()
        w2d = module._to_2d(module.weight.detach()).float()
        g = module.qat_config.group_size
        packed = _qi.int4_quantize_with_params(w2d, scale, zero, g)
        qweight = get_format("int4").from_parts(packed, scale, zero, tuple(w2d.shape), g)
        layer = cls.empty_like_float(module, module.qat_config, qweight.metadata())
        layer.qweight = qweight
    else:
        layer = cls.from_float(module, module.qat_config, module.qat_format)
    layer.out_dtype = module.out_dtype
    return layer.to(module.weight.device)


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every fake-quant layer with the core quantized layer it simulates, in place.

    The quantized weight is exactly the one the fake-quant forward used (same functions, same parameters),
    so outputs match the fake-quant model bit for bit on the CPU path.

    Returns:
        The same model. Learned scales are stored (bf16) in the int4 weights; LoRA adapters stay.

    Raises:
        ValueError: the model holds no fake-quant layer (call ``prepare_qat`` first).
    """
    found = [(fqn, m) for fqn, m in model.named_modules() if is_fake_quant(m)]
    if not found:
        raise ValueError("convert_qat() found no fake-quant layer; call qlora_kit.prepare_qat(model, config) first")
    for fqn, module in found:
        model.set_submodule(fqn, _convert_one(module))
    return model
