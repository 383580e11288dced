"""``quantize(model, config)``: swap the layers of any nn.Module for quantized ones, in place.

Example:
    >>> import qlora_kit
    >>> model = qlora_kit.quantize(model, qlora_kit.NF4Config(blocksize=64, double_quant=True))
    >>> qlora_kit.memory_footprint(model)
    {'nf4': 1234567, 'float': 89012}
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import validate
from .configs import WeightConfig
from .formats.base import check_finite
from .nn.quantized import QuantizedLayer, quantized_class_for
from .registry import format_for_config, quantize_handler, register_quantize_handler

FilterFn = Callable[[nn.Module, str], bool]

# names of output heads that stay in high precision by default
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head", "output", "embed_out", "decoder")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
_IMAGE_CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def _module_by_identity(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def output_head(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` when the model has one (transformers' output head), else None."""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        head = get_out()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def default_filter(model: nn.Module) -> FilterFn:
    """The filter ``quantize`` uses when none is given.

    Quantized: every nn.Linear, transformers Conv1D, nn.Conv1d/Conv2d/ConvTranspose2d. Kept in high
    precision: output heads (``model.get_output_embeddings()`` and modules named lm_head, classifier,
    score, ...), the first and the last convolution of image models (any model with a Conv2d or
    ConvTranspose2d), and embeddings (usually tied to the head; pass a filter_fn to quantize them).
    """
    keep: set[int] = set()
    head = output_head(model)
    if head is not None:
        keep.add(id(head))
    convs = [m for m in model.modules() if isinstance(m, _CONV_TYPES)]
    if any(isinstance(m, _IMAGE_CONV_TYPES) for m in convs):
        keep.add(id(convs[0]))
        keep.add(id(convs[-1]))

    def fn(module: nn.Module, fqn: str) -> bool:
        if id(module) in keep or isinstance(module, nn.Embedding):
            return False
        return fqn.split(".")[-1] not in _HEAD_NAMES

    return fn


def _check_device(device) -> None:
    """ValueError in one sentence for a device string torch does not know or a CUDA device this machine lacks."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a device torch knows; pass e.g. 'cuda', 'cuda:0' or 'cpu'"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={device!r} but this machine has no CUDA GPU usable by torch; pass device=None or 'cpu'"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device={device!r} but this machine has {count} CUDA GPU(s); pass cuda:0 .. cuda:{count - 1}"
            )


def _cannot_quantize(module: nn.Module) -> str | None:
    """Why a layer the filter picked cannot be quantized, or None when it can (or holds no weight matrix)."""
    w = module._parameters.get("weight")  # the module's own weight, not one forwarded by a wrapper
    if quantized_class_for(module) is not None:
        if w is None or not w.is_floating_point():
            kind = "no weight" if w is None else f"a {type(w).__name__} weight of dtype {w.dtype}"
            return f"{type(module).__name__} with {kind} (already quantized by another library?)"
        return None
    if w is None or w.dim() < 2 or not w.is_floating_point() or type(module).__name__ == "LoraFactor":
        return None
    if isinstance(module, QuantizedLayer) or getattr(module, "_qlora_kit_fake_quant", False):
        return None
    return f"{type(module).__name__} (no quantized version of this layer type)"


def _select_targets(model: nn.Module, keep: FilterFn) -> list[tuple[str, type]]:
    """(name, quantized class) of every layer to swap; a picked layer that cannot be quantized is named in a
    warning (it stays in float), never skipped in silence."""
    targets: list[tuple[str, type]] = []  # names only: a float module must not outlive its swap
    refused: list[str] = []
    inside: list[str] = []  # quantized layers and chosen targets: their children are not layers to swap
    for fqn, module in model.named_modules():
        if not fqn or any(fqn.startswith(t + ".") for t in inside):
            continue
        if isinstance(module, QuantizedLayer):
            inside.append(fqn)
            continue
        if not keep(module, fqn):
            continue
        reason = _cannot_quantize(module)
        if reason is not None:
            refused.append(f"{fqn} ({reason})")
            continue
        cls = quantized_class_for(module)
        if cls is not None:
            targets.append((fqn, cls))
            inside.append(fqn)
    if refused:
        warnings.warn(
            f"quantize() cannot quantize {len(refused)} chosen layer(s), which stay as they are: "
            + "; ".join(refused[:8])
            + (f"; and {len(refused) - 8} more" if len(refused) > 8 else "")
            + ". Exclude them with filter_fn to silence this warning",
            stacklevel=3,
        )
    return targets


def quantize(
    model: nn.Module,
    config,
    *,
    filter_fn: FilterFn | None = None,
    device: str | torch.device | None = None,
    calib_data: Iterable | None = None,
) -> nn.Module:
    """Quantize the weights of ``model`` in place and return it.

    Args:
        model: any nn.Module (transformers model, diffusers UNet, GAN generator, ...).
        config: a format config (``NF4Config``, ``FP4Config``, ``Int8WeightConfig``, ``Int4WeightConfig``,
            ``FP8WeightConfig``) or an algorithm config (see ``qlora_kit.ptq``).
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks the layers to quantize (every subclass of a
            supported layer type counts; a picked layer that cannot be quantized is named in a warning); default
            :func:`default_filter` (output heads, first/last conv of image models and embeddings stay float).
        device: when given (e.g. "cuda"), layers move there and quantize one at a time, so peak device
            memory stays near the quantized size; the rest of the model moves there afterwards.
        calib_data: calibration inputs for calibrated algorithms (GPTQ, AWQ, SmoothQuant).

    Returns:
        The same model object, quantized.

    Raises:
        TypeError: ``config`` is not a quantization config.
        ValueError: a selected weight holds NaN/Inf (the message names it), or ``device`` is unknown or absent.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() needs an nn.Module, got {type(model).__name__}")
    _check_device(device)
    handler = quantize_handler(config)  # TypeError naming the known configs
    return handler(model, config, filter_fn=filter_fn, device=device, calib_data=calib_data)


@register_quantize_handler(WeightConfig)
def quantize_weights(model: nn.Module, config: WeightConfig, *, filter_fn=None, device=None, calib_data=None):
    """Round-to-nearest: every layer ``filter_fn`` picks gets ``config``'s weight format (``calib_data`` unused).

    Every chosen weight is checked before any layer is swapped; with ``device`` the layers move and quantize one at
    a time.
    """
    fmt = format_for_config(config).name
    keep = filter_fn or default_filter(model)
    if quantized_class_for(model) is not None and not isinstance(model, QuantizedLayer):
        raise ValueError(
            f"quantize() swaps the layers inside a model, and got a bare {type(model).__name__}; "
            "wrap it, e.g. quantize(nn.Sequential(layer), config, filter_fn=lambda m, n: True)[0]"
        )
    validate.check_not_requantizing(model, config, keep)  # another config over quantized layers: refused
    targets = _select_targets(model, keep)
    # every weight is checked before any layer is swapped, so a NaN / Inf leaves the model untouched
    for fqn, _ in targets:
        check_finite(model.get_submodule(fqn).weight.detach(), f"{fqn}.weight")
    for fqn, cls in targets:
        module = model.get_submodule(fqn)
        if device is not None:
            module.to(device)
        layer = cls.from_float(module, config, fmt, tensor_name=f"{fqn}.weight")
        layer.train(module.training)
        model.set_submodule(fqn, layer)
        del module  # the float layer (on ``device`` when given) is freed here, one layer at a time
    if device is not None:
        model.to(device)
    return model


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and persistent floating-point buffers (what ``memory_footprint`` counts as weights;
    index buffers such as BERT's position_ids and non-persistent ones such as rotary inv_freq are left out)."""
    weights = list(model.parameters())
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        weights += [b for n, b in module._buffers.items() if b is not None and n not in skip and b.is_floating_point()]
    return list({id(t): t for t in weights}.values())


def memory_footprint(model: nn.Module) -> dict[str, int]:
    """Bytes taken by the model's weights, by kind.

    Returns:
        {format name ("nf4", "fp4", "int8", "int4", "fp8"; only the formats the model holds): bytes of packed
         codes plus their scales; "float" (always present): bytes of every other parameter (biases, norms,
         float layers) and persistent floating-point buffer (e.g. BatchNorm statistics); index buffers
         (BERT's position_ids) and non-persistent ones (rotary inv_freq) are not weights and are not
         counted}.
        Tensors shared between modules are counted once.
    """
    out: dict[str, int] = {}  # formats in the order first met, then "float"
    seen: set[int] = set()
    quantized_tensors: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            kind = module.format_name
            for t in [*module.qweight.parameters(), *module.qweight.buffers()]:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    out[kind] = out.get(kind, 0) + t.numel() * t.element_size()
                quantized_tensors.add(t.data_ptr())
    out["float"] = 0
    for t in weight_tensors(model):
        if t.data_ptr() in seen or t.data_ptr() in quantized_tensors:
            continue
        seen.add(t.data_ptr())
        out["float"] += t.numel() * t.element_size()
    return out
