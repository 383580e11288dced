"""LoRA / QLoRA on any backbone: configure, attach, merge, switch, save and load adapters.

The model is changed in place: each targeted layer is replaced by a LoRA wrapper that keeps the
original as ``base_layer`` (``qlora_kit/nn/lora_layers.py``), so parameter paths match PEFT's.
Adapters are saved in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<path>.lora_A.weight``) and, for diffusers models, also in the LoRA file that
``pipeline.load_lora_weights`` reads (``pytorch_lora_weights.safetensors``, keys ``unet.<path>...``).

Example:
    >>> model = qlora_kit.quantize(model, qlora_kit.NF4Config())
    >>> model = qlora_kit.prepare_for_kbit_training(model)
    >>> model = qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=16, alpha=32, dropout=0.05))
    >>> ...  # train
    >>> qlora_kit.save_adapter(model, "out/adapter")
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import validate
from .lora_config import LoraConfig
from .nn.lora_layers import LoraLayer, lora_kind, wrap_with_lora
from .nn.quantized import QuantizedLayer

_LINEAR_KINDS = ("linear",)


# ----- finding layers ------------------------------------------------------------------------------------
def name_matches(spec, name: str) -> bool:
    """Whether module path ``name`` is selected by ``spec`` (a regex over the whole path, or names)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _output_head_ids(model: nn.Module) -> set[int]:
    from .api import output_head

    ids = set()
    head = output_head(model)
    if head is not None:
        ids.add(id(head))
        if isinstance(head, LoraLayer):
            ids.add(id(head.base_layer))
    return ids


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module that could be adapted: LoRA internals and modules whose weight
    is read directly by their parent (nn.MultiheadAttention's projections) are skipped."""
    skip: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (LoraLayer, QuantizedLayer, nn.MultiheadAttention)):
            skip.add(name)
        yield name, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """(path, module) of every layer ``config`` selects for adapters (ValueError on one LoRA cannot adapt)."""
    heads = _output_head_ids(model)
    targets = []
    for name, module in candidate_modules(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = lora_kind(base)
        if config.target_modules == "all-linear":
            hit = kind in _LINEAR_KINDS and id(module) not in heads and name.split(".")[-1] != "lm_head"
        else:
            hit = name_matches(config.target_modules, name)
        if not hit or (config.exclude_modules is not None and name_matches(config.exclude_modules, name)):
            continue
        if kind is None:
            raise ValueError(
                f"target_modules matched {name!r}, a {type(module).__name__}, which LoRA cannot adapt; "
                "name only Linear, Conv1D, Conv*d, ConvTranspose*d or Embedding layers (or use exclude_modules)"
            )
        targets.append((name, module))
    return targets


# modules that wrap a layer without being part of the model: torch's activation-checkpoint wrapper (accelerate's
# FSDP activation checkpointing), FSDP1's wrapper and torch.compile's; their attribute names are not in the
# model's own paths (PEFT's adapter keys, transformers' checkpoints)
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")


def plain_path(path: str) -> str:
    """``path`` of a module without the segments of wrappers (``layers.0._checkpoint_wrapped_module.mlp`` ->
    ``layers.0.mlp``)."""
    return ".".join(part for part in path.split(".") if part not in _WRAPPER_SEGMENTS)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(path, layer) of every LoRA wrapper in ``model``, paths as the unwrapped model names them."""
    return [(plain_path(n), m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapter name -> LoraConfig registry (created empty on first use)."""
    configs = model.__dict__.get("_lora_configs")
    if configs is None:
        configs = {}
        model.__dict__["_lora_configs"] = configs
    return configs


def active_adapters(model: nn.Module) -> list[str]:
    """The model's list of active adapter names (created empty on first use; mutated in place)."""
    active = model.__dict__.get("_lora_active")
    if active is None:
        active = []
        model.__dict__["_lora_active"] = active
    return active


def refresh_trainable(model: nn.Module) -> None:
    """Base frozen; exactly the active adapters' parameters train."""
    active = set(active_adapters(model))
    trainable: set[int] = set()
    for _, layer in lora_layers(model):
        for name in active:
            for container in (
                layer.lora_A,
                layer.lora_B,
                layer.lora_magnitude_vector,
            ):
                if name in container:
                    trainable.update(id(p) for p in container[name].parameters())
            for container in (layer.lora_embedding_A, layer.lora_embedding_B):
                if name in container:
                    trainable.add(id(container[name]))
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def check_adapter_name(adapter_name: str) -> None:
    """ValueError unless ``adapter_name`` is a non-empty string without dots (dots would split state keys)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")


def add_to_module(model, path, module, adapter_name, *, r, alpha, config: LoraConfig, init: str) -> LoraLayer:
    """Add adapter ``adapter_name`` to the layer at ``path``, wrapping it in a LoRA layer first if needed."""
    if isinstance(module, LoraLayer):
        layer = module
    else:
        layer = wrap_with_lora(module)
        model.set_submodule(path, layer)
    layer.add_adapter(
        adapter_name,
        r,
        alpha,
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init=init,
        base_name=path,
    )
    parent_name = path.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    layer.train(parent.training)  # new modules start in train mode; in an eval model, adapter dropout must stay off
    layer.active_adapters = list(active_adapters(model))
    return layer


_REWRITING_INITS = ("pissa", "loftq")


@torch.no_grad()
def _record_base_rewrite(layer: LoraLayer, adapter_name: str, init: str, was_quantized: bool) -> None:
    """Remember that ``init`` rewrote this layer's base weight, and PiSSA's initial factors A0, B0.

    PiSSA leaves base = W - s B0 A0, so :func:`save_adapter` can write an adapter that is exact on the
    original W (PEFT's conversion, rank 2r). The factors are non-persistent buffers: they follow the model
    across devices and stay out of its state dict.
    """
    layer.__dict__.setdefault("_lora_base_rewrites", {})[adapter_name] = {
        "init": init,
        "scaling": layer.scaling[adapter_name],
        "was_quantized": was_quantized,
    }
    if init == "pissa":
        layer.register_buffer(f"_lora_init_A_{adapter_name}", layer._a(adapter_name).detach().clone(), False)
        layer.register_buffer(f"_lora_init_B_{adapter_name}", layer._b(adapter_name).detach().clone(), False)


# ----- public API ----------------------------------------------------------------------------------------
def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Attach a LoRA adapter to every layer ``config`` targets; the base is frozen.

    The first adapter of a model becomes active; later ones are added inactive (as in PEFT) until
    :func:`set_adapter` selects them. Only the active adapters' parameters require grad.

    Args:
        model: any nn.Module (float or quantized with ``qlora_kit.quantize``).
        config: a :class:`LoraConfig`.
        adapter_name: name of this adapter (several can coexist).

    Returns:
        The same model, changed in place.

    Raises:
        ValueError: no layer matched, a matched layer is unsupported, or the name is taken.

    Example:
        >>> model = add_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_lora() needs a LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name")
    targets = find_targets(model, config)
    if not targets:
        sample = [n for n, _ in candidate_modules(model)][:8]
        raise ValueError(f"target_modules={config.target_modules!r} matched no layer; module names look like {sample}")
    validate.check_lora_rank(config, targets)
    if not active_adapters(model):
        active_adapters(model).append(adapter_name)
    for path, module in targets:
        was_quantized = isinstance(module.base_layer if isinstance(module, LoraLayer) else module, QuantizedLayer)
        layer = add_to_module(
            model, path, module, adapter_name, r=config.r, alpha=config.alpha, config=config, init=config.init
        )
        if config.init in _REWRITING_INITS:
            _record_base_rewrite(layer, adapter_name, config.init, was_quantized)
    configs[adapter_name] = config
    refresh_trainable(model)
    return model


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or several names, summed) the active adapter(s); only they train.

    Raises:
        ValueError: an unknown name, or adapters are merged (unmerge first).
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(known)}")
    layers = lora_layers(model)
    if any(layer.merged_adapters for _, layer in layers):
        raise ValueError("cannot switch adapters while some are merged; call unmerge_lora(model) first")
    active = active_adapters(model)
    active[:] = names
    for _, layer in layers:
        layer.active_adapters = list(names)
    refresh_trainable(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter; layers left without adapters are unwrapped back to their base."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    for path, layer in lora_layers(model):
        if adapter_name in layer.r:
            layer.delete_adapter(adapter_name)
            if not layer.r:
                model.set_submodule(path, layer.base_layer)
    del configs[adapter_name]
    active = active_adapters(model)
    active[:] = [a for a in active if a != adapter_name]
    for _, layer in lora_layers(model):
        layer.active_adapters = list(active)
    refresh_trainable(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes as its base (merged adapters are unmerged and
    merged back on exit).

    Example:
        >>> with disable_adapters(model):
        ...     reference = model(x)
    """
    layers = [layer for _, layer in lora_layers(model)]
    remerge = model.__dict__.get("_lora_merge_requantize", True) if any(la.merged_adapters for la in layers) else None
    if remerge is not None:
        unmerge_lora(model)
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapters_disabled = False
        if remerge is not None:
            merge_lora(model, requantize=remerge)


@dataclass
class MergeReport:
    """What :func:`merge_lora` did, and how much merging changed the outputs.

    Every drift is a relative error ||a - b||_F / ||b||_F (Frobenius norms, b the value before merging).

    Attributes:
        merged: paths of the layers merged.
        layer_output_drift: per merged layer, the relative error of its output on a fixed-seed random probe
            input (linear: 8 rows of N(0, 1) features; convolution: one small N(0, 1) image; embedding: 8
            random ids), merged layer vs base + adapters before merging. Float bases: rounding level;
            requantized quantized bases: the drift requantization caused.
        weight_drift: per quantized layer, ||W_new - (W + dW)||_F / ||W + dW||_F (W_new the requantized
            weight; ~0 with ``requantize=False``).
        output_drift: the model-level drift: with ``example_inputs``, the relative error of the model's
            output on them; otherwise the largest ``layer_output_drift`` (0.0 when nothing was merged).
    """

    merged: list[str] = field(default_factory=list)
    layer_output_drift: dict[str, float] = field(default_factory=dict)
    weight_drift: dict[str, float] = field(default_factory=dict)
    output_drift: float = 0.0

    @property
    def max_weight_drift(self) -> float:
        return max(self.weight_drift.values(), default=0.0)

    def __str__(self) -> str:  # print(merge_lora(model)): a few readable lines; repr() keeps every number
        from .merge_summary import format_merge_report

        return format_merge_report(self)


def _run(model: nn.Module, inputs) -> torch.Tensor:
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    return _first_tensor(out)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "sample", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for value in out:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"cannot find an output tensor in a {type(out).__name__}")


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {k: v for k, v in owners.items() if len(v) > 1}


def _relative_error(new: torch.Tensor, ref: torch.Tensor) -> float:
    new, ref = new.double(), ref.double()
    return float(torch.linalg.norm(new - ref) / torch.linalg.norm(ref).clamp(min=1e-30))


def _probe_input(layer: LoraLayer) -> torch.Tensor:
    """A fixed-seed random input for ``layer`` (see :class:`MergeReport`), on its device and in its dtype."""
    g = torch.Generator().manual_seed(0)
    base, device = layer.base_layer, layer.base_device()
    if layer.kind == "embedding":
        return torch.randint(0, base.num_embeddings, (8,), generator=g).to(device)
    dtype = base.compute_dtype if isinstance(base, QuantizedLayer) else base.weight.dtype
    if layer.kind == "linear":
        return torch.randn(8, layer._dims()[0], generator=g).to(device, dtype)
    nd = len(base.kernel_size)
    if layer.kind == "conv_transpose":
        sizes = (4,) * nd
    else:  # large enough for the kernel, a few strides, and reflect/replicate padding
        pad = (0,) * nd if isinstance(base.padding, str) else base.padding
        sizes = tuple(d * (k - 1) + 1 + 3 * st + 2 * p for d, k, st, p in zip(
            base.dilation, base.kernel_size, base.stride, pad, strict=True))  # fmt: skip
    return torch.randn(1, base.in_channels, *sizes, generator=g).to(device, dtype)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@torch.no_grad()
def merge_lora(model: nn.Module, *, requantize: bool = True, example_inputs=None) -> MergeReport:
    """Fold the active adapters into the base weights (undo with :func:`unmerge_lora`) and measure the drift.

    Float bases change in place. Quantized bases are dequantized to an fp32 copy (the merge math runs in
    fp32, more accurate than a bf16 copy), merged, then requantized (``requantize=True``) or replaced by
    float layers in their compute dtype (``requantize=False``). Every merged layer's output drift is
    measured on a fixed-seed probe input (see :class:`MergeReport`); the model's output drift too when
    ``example_inputs`` are given. Requantizing quantized layers always issues a warning stating the drift.

    Args:
        model: a model with LoRA adapters.
        requantize: keep quantized bases quantized after merging.
        example_inputs: optional model inputs (tensor, tuple or dict) to measure the model's output drift.

    Returns:
        A :class:`MergeReport`.

    Raises:
        ValueError: a merged weight is shared with another module (tied embeddings), or a grouped conv.
    """
    shared = _shared_weights(model)
    layers = lora_layers(model)
    for path, layer in layers:
        w = getattr(layer.base_layer, "weight", None)
        if layer._live_adapters() and w is not None and id(w) in shared:
            others = [n for n in shared[id(w)] if not n.startswith(path + ".")]
            raise ValueError(
                f"cannot merge into {path!r}: its weight is shared with {others} (tied weights) and merging "
                "would change both; exclude it from target_modules or untie the weights"
            )
    reference = None
    if example_inputs is not None:
        with _eval_mode(model):
            reference = _run(model, example_inputs)
    report = MergeReport()
    for path, layer in layers:
        if not layer._live_adapters():
            continue
        probe = _probe_input(layer)
        with _eval_mode(layer):
            before = layer(probe)
            drift = layer.merge(requantize=requantize)
            report.layer_output_drift[path] = _relative_error(layer(probe), before)
        report.merged.append(path)
        if drift is not None:
            report.weight_drift[path] = drift
    model.__dict__["_lora_merge_requantize"] = requantize
    if reference is not None:
        with _eval_mode(model):
            report.output_drift = _relative_error(_run(model, example_inputs), reference)
    else:
        report.output_drift = max(report.layer_output_drift.values(), default=0.0)
    if report.weight_drift and requantize:
        worst = max(report.weight_drift, key=lambda p: report.layer_output_drift[p])
        warnings.warn(
            f"merged LoRA into {len(report.weight_drift)} quantized layers and requantized them: their outputs moved "
            f"by up to {report.layer_output_drift[worst]:.2%} ({worst}; relative error on a probe input"
            + (f", {report.output_drift:.2%} on the model's example inputs" if reference is not None else "")
            + "); pass requantize=False to keep merged layers in float",
            stacklevel=3,
        )
    return report


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`: float bases subtract the update, quantized bases get their original
    quantized weights back exactly."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


# Saving / loading adapters (adapter_io.py) and k-bit preparation (kbit.py) live in their own modules; they are
# re-exported here so ``qlora_kit.lora.save_adapter`` etc. keep working. Imported last: adapter_io reads this
# module's helpers, which exist by now.
from .adapter_io import load_adapter, save_adapter  # noqa: E402
from .kbit import prepare_for_kbit_training  # noqa: E402

__all__ = [
    "LoraConfig",
    "MergeReport",
    "add_lora",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "merge_lora",
    "prepare_for_kbit_training",
    "save_adapter",
    "set_adapter",
    "unmerge_lora",
]
