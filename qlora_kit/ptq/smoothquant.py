"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then W8A8.

Per input channel ``s = max|x|^a / max|w|^(1-a)``, folded into the op producing the input as in ``fold.py``
(or divided out at run time by the layer itself where nothing can absorb it, ``qlora_kit/nn/smooth.py``),
then int8 weights per channel and int8 activations per token at run time (the core's
``Int8DynamicActivationConfig``). :func:`smooth_activations` runs the migration alone. Linear layers only
(the core's W8A8 covers linear layers); other layers get int8 weight-only quantization, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..configs import COMPUTE_DTYPES, Int8WeightConfig
from ..formats.base import check_finite
from ..registry import register_quantize_handler
from .calibration import Scope, calibrate, calibration_batches
from .checks import check_choice, check_number
from .fold import InputGroup, collect_groups, fold_scale, valid_producers
from .layers import FilterFn, is_linear, select_targets, set_weight_2d, weight_2d


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then W8A8.

    Args:
        alpha: migration strength in [0, 1]: s = max|x|^alpha / max|w|^(1 - alpha) per input channel.
        compute_dtype: dtype the W8A8 layers return and compute their epilogue in.

    Example:
        >>> qlora_kit.quantize(model, SmoothQuantConfig(alpha=0.5), calib_data=batches)
    """

    alpha: float = 0.5
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        check_number(self, "alpha", 0, 1)
        check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self):
        from .. import configs

        cls = getattr(configs, "Int8DynamicActivationConfig", None)
        if cls is None:
            raise RuntimeError(
                "SmoothQuant needs qlora_kit.configs.Int8DynamicActivationConfig (W8A8), which this installation lacks"
            )
        return cls(compute_dtype=self.compute_dtype)


def smooth_activations(
    model: nn.Module, config: SmoothQuantConfig, calib_data: Iterable, *, filter_fn: FilterFn | None = None, device=None
) -> nn.Module:
    """SmoothQuant's migration step alone: per input channel s = max|x|^alpha / max|w|^(1 - alpha) divided out of
    the op producing the input and multiplied into the linears; the float model computes the same function.

    ``quantize(model, SmoothQuantConfig(...), calib_data=...)`` runs this and then makes W8A8 layers; this
    function is for inspecting the migration or pairing it with another activation quantizer.

    Args:
        model: the float model, changed in place.
        config: its ``alpha`` is used.
        calib_data: calibration inputs (see the module docstring).
        filter_fn: which layers count (default: ``qlora_kit.default_filter``).
        device: as in ``quantize``.

    Returns:
        The same model, smoothed.
    """
    return _smoothquant(model, config, filter_fn=filter_fn, device=device, calib_data=calib_data, convert=False)


@register_quantize_handler(SmoothQuantConfig)
def _run_smoothquant(model, config: SmoothQuantConfig, *, filter_fn=None, device=None, calib_data=None):
    return _smoothquant(model, config, filter_fn=filter_fn, device=device, calib_data=calib_data, convert=True)


@torch.no_grad()
def _smoothquant(model, config: SmoothQuantConfig, *, filter_fn, device, calib_data, convert: bool):
    calib_data = calibration_batches(calib_data, "SmoothQuant")
    targets = select_targets(model, filter_fn)
    w8a8 = config.format_config() if convert else None
    weight_only = Int8WeightConfig(compute_dtype=config.compute_dtype)
    for fqn, module in targets:
        check_finite(weight_2d(module).detach(), f"{fqn}.weight")

    def process(scope: Scope) -> None:
        groups = collect_groups(scope, 0, keep_samples=False, convs=False)
        valid_producers(scope, groups)
        at_run_time: dict[str, torch.Tensor] = {}  # layers without a foldable producer: x / s in their forward
        for group in groups:
            w_max = torch.stack([weight_2d(m).detach().float().abs().amax(0) for _, m in group.linears]).amax(0)
            s = group.abs_max.clamp(min=1e-5).pow(config.alpha) / w_max.clamp(min=1e-5).pow(1 - config.alpha)
            s = torch.where(group.abs_max > 0, s, torch.ones_like(s)).clamp(min=1e-5)
            if group.producer is not None:
                fold_scale(group, s)
            elif convert:
                at_run_time.update(_scale_weights_for_run_time(group, s))
            else:
                names = ", ".join(f for f, _ in group.linears)
                warnings.warn(f"SmoothQuant: no op folds the scale of {names}; left unsmoothed", stacklevel=3)
        if not convert:
            return
        # the core's quantize() builds the W8A8 layers (dynamic per-token activations), whatever their form
        from ..api import quantize

        linear_ids = {id(m) for _, m in scope.targets if is_linear(m)}
        other_ids = {id(m) for _, m in scope.targets} - linear_ids
        quantize(scope.module, w8a8, filter_fn=lambda m, fqn: id(m) in linear_ids)
        _apply_run_time_scales(scope, at_run_time)
        if other_ids:
            quantize(scope.module, weight_only, filter_fn=lambda m, fqn: id(m) in other_ids)
            warnings.warn(
                f"SmoothQuant: {len(other_ids)} layer(s) that are not Linear (convolutions, embeddings) got int8 "
                "weight-only quantization without smoothing: W8A8 covers Linear layers only",
                stacklevel=2,
            )

    calibrate(model, targets, calib_data, device, process, "SmoothQuant")
    if device is not None:
        model.to(device)
    return model


def _scale_weights_for_run_time(group: InputGroup, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Multiply the group's weights by ``s`` per input channel; their quantized layers divide the input by
    ``s`` at run time (:func:`_apply_run_time_scales`), so the function is unchanged."""
    out = {}
    for fqn, lin in group.linears:
        set_weight_2d(lin, weight_2d(lin).float() * s[None, :])
        out[fqn] = s
    return out


def _apply_run_time_scales(scope: Scope, scales: dict[str, torch.Tensor]) -> None:
    """Swap each W8A8 layer named in ``scales`` for one that divides its input by the scale."""
    from ..nn.smooth import with_input_scale

    for fqn, s in scales.items():
        rel = fqn[len(scope.prefix) :]
        scope.module.set_submodule(rel, with_input_scale(scope.module.get_submodule(rel), s))
