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

import collections
import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import safe_io, validate
from .nn.lora_layers import LoraLayer, lora_kind, lora_wrapper_class, wrap_with_lora
from .nn.quantized import QuantizedLayer

_INITS = ("default", "gaussian", "pissa", "loftq")
_LINEAR_KINDS = ("linear",)
_CONFIG_NAME = "adapter_config.json"
_WEIGHTS_NAME = "adapter_model.safetensors"
_DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_PEFT_PREFIX = "base_model.model."


def _check_names(field_name: str, value, allow_all_linear: bool):
    """Normalise a target/exclude spec: "all-linear", a regex string, or a tuple of module names."""
    if isinstance(value, str):
        if allow_all_linear and value == "all-linear":
            return value
        if not value:
            raise ValueError(f"LoraConfig.{field_name} must not be an empty string")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"LoraConfig.{field_name}={value!r} is not a valid regular expression ({e})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"LoraConfig.{field_name} must be a non-empty list of module names, got {value!r}")
        return names
    raise ValueError(
        f"LoraConfig.{field_name} must be 'all-linear', a regex string or a list of module names, got {value!r}"
    )


@dataclass(frozen=True)
class LoraConfig:
    """Which layers get LoRA adapters and how.

    Args:
        r: adapter rank (> 0).
        alpha: scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``).
        dropout: dropout on the adapter input, 0 <= dropout < 1.
        target_modules: "all-linear" (every Linear / Conv1D, quantized or not, except the output head),
            a list of module names (a module matches when its path equals a name or ends with ".name"),
            or a regex that must match the whole module path.
        exclude_modules: names or a regex (same rules) of modules never to adapt.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        use_dora: DoRA (weight-decomposed LoRA; linear and convolution layers).
        init: "default" (A Kaiming-uniform, B = 0: output unchanged), "gaussian" (A ~ N(0, 1/r), B = 0),
            "pissa" (A, B from the top singular vectors; the base keeps the residual; float bases can save
            it exactly, see :func:`save_adapter`), or "loftq" (float bases only: base = nf4(W) with blocks of
            64, A, B = the SVD of W - nf4(W); quantize to NF4 with blocksize 64 before saving).

    Raises:
        ValueError: a field is out of range (the message names it).

    Example:
        >>> LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], dropout=0.05)
    """

    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoraConfig.alpha must be a finite positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", _check_names("target_modules", self.target_modules, True))
        if self.exclude_modules is not None:
            object.__setattr__(self, "exclude_modules", _check_names("exclude_modules", self.exclude_modules, False))
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoraConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.init not in _INITS:
            raise ValueError(f"LoraConfig.init must be one of {list(_INITS)}, got {self.init!r}")

    @property
    def scale(self) -> float:
        """The factor s in y = base(x) + s * B A x."""
        return self.alpha / self.r**0.5 if self.use_rslora else self.alpha / self.r


# ----- finding layers ------------------------------------------------------------------------------------
def _name_matches(spec, name: str) -> bool:
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


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module that could be adapted: LoRA internals and modules whose weight
    is read directly by their parent (nn.MultiheadAttention's projections) are skipped."""
    skip: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (LoraLayer, QuantizedLayer, nn.MultiheadAttention)):
            skip.add(name)
        yield name, module


def _find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    heads = _output_head_ids(model)
    targets = []
    for name, module in _candidate_modules(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = lora_kind(base)
        if config.target_modules == "all-linear":
            hit = kind in _LINEAR_KINDS and id(module) not in heads and name.split(".")[-1] != "lm_head"
        else:
            hit = _name_matches(config.target_modules, name)
        if not hit or (config.exclude_modules is not None and _name_matches(config.exclude_modules, name)):
            continue
        if kind is None:
            raise ValueError(
                f"target_modules matched {name!r}, a {type(module).__name__}, which LoRA cannot adapt; "
                "name only Linear, Conv1D, Conv*d, ConvTranspose*d or Embedding layers (or use exclude_modules)"
            )
        targets.append((name, module))
    return targets


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = model.__dict__.get("_lora_configs")
    if configs is None:
        configs = {}
        model.__dict__["_lora_configs"] = configs
    return configs


def _active(model: nn.Module) -> list[str]:
    active = model.__dict__.get("_lora_active")
    if active is None:
        active = []
        model.__dict__["_lora_active"] = active
    return active


def _refresh_trainable(model: nn.Module) -> None:
    """Base frozen; exactly the active adapters' parameters train."""
    active = set(_active(model))
    trainable: set[int] = set()
    for _, layer in _lora_layers(model):
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


def _check_adapter_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")


def _add_to_module(model, path, module, adapter_name, *, r, alpha, config: LoraConfig, init: str) -> LoraLayer:
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
    layer.active_adapters = list(_active(model))
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
    _check_adapter_name(adapter_name)
    configs = _configs(model)
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name")
    targets = _find_targets(model, config)
    if not targets:
        sample = [n for n, _ in _candidate_modules(model)][:8]
        raise ValueError(f"target_modules={config.target_modules!r} matched no layer; module names look like {sample}")
    validate.check_lora_rank(config, targets)
    if not _active(model):
        _active(model).append(adapter_name)
    for path, module in targets:
        was_quantized = isinstance(module.base_layer if isinstance(module, LoraLayer) else module, QuantizedLayer)
        layer = _add_to_module(
            model, path, module, adapter_name, r=config.r, alpha=config.alpha, config=config, init=config.init
        )
        if config.init in _REWRITING_INITS:
            _record_base_rewrite(layer, adapter_name, config.init, was_quantized)
    configs[adapter_name] = config
    _refresh_trainable(model)
    return model


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or several names, summed) the active adapter(s); only they train.

    Raises:
        ValueError: an unknown name, or adapters are merged (unmerge first).
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = _configs(model)
    for name in names:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(known)}")
    layers = _lora_layers(model)
    if any(layer.merged_adapters for _, layer in layers):
        raise ValueError("cannot switch adapters while some are merged; call unmerge_lora(model) first")
    active = _active(model)
    active[:] = names
    for _, layer in layers:
        layer.active_adapters = list(names)
    _refresh_trainable(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter; layers left without adapters are unwrapped back to their base."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    for path, layer in _lora_layers(model):
        if adapter_name in layer.r:
            layer.delete_adapter(adapter_name)
            if not layer.r:
                model.set_submodule(path, layer.base_layer)
    del configs[adapter_name]
    active = _active(model)
    active[:] = [a for a in active if a != adapter_name]
    for _, layer in _lora_layers(model):
        layer.active_adapters = list(active)
    _refresh_trainable(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes as its base (merged adapters are unmerged and
    merged back on exit).

    Example:
        >>> with disable_adapters(model):
        ...     reference = model(x)
    """
    layers = [layer for _, layer in _lora_layers(model)]
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
    layers = _lora_layers(model)
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
    for _, layer in _lora_layers(model):
        layer.unmerge()
    return model


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = True, norms_in_fp32: bool = True
) -> nn.Module:
    """The usual preparation of a (quantized) model for adapter training.

    Freezes every parameter, optionally casts normalisation layers to fp32 (stabler training in half
    precision), makes the input embeddings' output require grad (so checkpointed blocks see an input
    that requires grad), and enables non-reentrant gradient checkpointing when the model supports it.

    Returns:
        The same model.

    Example:
        >>> model = prepare_for_kbit_training(quantize(model, NF4Config()))
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if norms_in_fp32:
        for module in model.modules():
            is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
                "norm" in type(module).__name__.lower() and not list(module.children())
            )
            if is_norm:
                for p in module.parameters(recurse=False):
                    if p.is_floating_point() and p.dtype != torch.float32:
                        p.data = p.data.float()
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        try:
            enable()
        except (NotImplementedError, AttributeError):
            _hook_input_grads(model)
    else:
        _hook_input_grads(model)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing through the model's own switch, without the warnings the user
    did not cause: transformers >= 5.2 renamed gradient_checkpointing_enable (the old name warns), and a KV
    cache is useless (and warned about) while training with checkpointing."""
    if not getattr(model, "supports_gradient_checkpointing", True):
        return
    new = getattr(model, "activation_checkpointing_enable", None)
    old = getattr(model, "gradient_checkpointing_enable", None)
    if callable(new):
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    elif callable(old):
        try:
            old(gradient_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:
            old()
    else:
        return
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False


def _hook_input_grads(model: nn.Module) -> None:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, nn.Module):
        emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


# ----- save / load ---------------------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """path -> {PEFT suffix: tensor} for one adapter, as trained (relative to the current base)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, layer in _lora_layers(model):
        if adapter_name not in layer.r:
            continue
        entry = {}
        if layer.kind == "embedding":
            entry["lora_embedding_A"] = layer.lora_embedding_A[adapter_name]
            entry["lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
        else:
            entry["lora_A.weight"] = layer.lora_A[adapter_name].weight
            entry["lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            entry["lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
        out[path] = {k: v.detach().to("cpu").contiguous().clone() for k, v in entry.items()}
    return out


def _is_nf4_64(base: nn.Module) -> bool:
    q = getattr(base, "qweight", None)
    return getattr(q, "name", "") == "nf4" and getattr(q, "blocksize", None) == 64


def _export_adapter(
    model: nn.Module, adapter_name: str, as_trained: bool = False
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int], dict[str, float]]:
    """The tensors, ranks and alphas to save for one adapter, such that loading them into a fresh (original)
    model reproduces this model's output.

    PiSSA rewrote the base to W - s0 B0 A0, so the update relative to the original W is s B A - s0 B0 A0:
    saved as PEFT does (``save_pretrained(path_initial_model_for_weight_conversion=...)``), a rank-(r + r0)
    adapter A' = [A; A0], B' = [B, -(s0 / s) B0] with alpha scaled so that the scaling s stays (2 alpha at
    rank 2r; sqrt(2) alpha with rsLoRA). This holds for the PiSSA adapter itself and for any other adapter
    sitting on a PiSSA residual. LoftQ's base is nf4(W) with blocks of 64, not a low-rank shift of W: its
    layers are saved as trained, which is exact on the original model quantized to NF4 with blocksize 64,
    and only when they are quantized that way here.

    Raises:
        ValueError: a layer's base cannot be expressed on the original model (the message names the fix).
    """
    tensors = _adapter_tensors(model, adapter_name)
    layers = dict(_lora_layers(model))
    use_rslora = _configs(model)[adapter_name].use_rslora
    ranks, alphas = {}, {}
    for path, entry in tensors.items():
        layer = layers[path]
        r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        ranks[path], alphas[path] = r, alpha
        rewrites = {} if as_trained else layer.__dict__.get("_lora_base_rewrites", {})
        merged_from_quantized = any(kind == "restore" for kind, *_ in layer._merge_undo)
        offsets = []
        for name, rec in rewrites.items():
            if rec["init"] == "loftq":
                if not (layer.is_quantized and _is_nf4_64(layer.base_layer)):
                    raise ValueError(
                        f"cannot save adapter {adapter_name!r}: {path!r} was initialised with init='loftq' (adapter "
                        f"{name!r}), which is exact only over the NF4 (blocksize 64) base, not the original float "
                        "weights; quantize the model with NF4Config(blocksize=64) before saving and load the adapter "
                        "into the original model quantized the same way (or pass as_trained=True)"
                    )
                continue
            if rec["was_quantized"] or layer.is_quantized or merged_from_quantized:
                raise ValueError(
                    f"cannot save adapter {adapter_name!r}: {path!r} sits on a quantized PiSSA residual (init='pissa' "
                    f"of adapter {name!r}), which no adapter reproduces over the original quantized weights; keep "
                    "PiSSA bases in float until saving, use init='loftq' (or 'default') for quantized bases, or pass "
                    "as_trained=True to save it for this changed base only"
                )
            a0 = layer.get_buffer(f"_lora_init_A_{name}").to("cpu")
            b0 = layer.get_buffer(f"_lora_init_B_{name}").to("cpu")
            offsets.append((a0, b0, rec["scaling"]))
        if not offsets:
            continue
        s = layer.scaling[adapter_name]
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if layer.kind == "embedding" else (
            "lora_A.weight", "lora_B.weight")  # fmt: skip
        a_dim = 1 if layer.kind == "conv_transpose" else 0
        a_parts, b_parts = [entry[a_key]], [entry[b_key]]
        for a0, b0, s0 in offsets:
            a_parts.append(a0.to(entry[a_key].dtype))
            b_parts.append((b0.double() * (-s0 / s)).to(entry[b_key].dtype))
        entry[a_key] = torch.cat(a_parts, dim=a_dim).contiguous()
        entry[b_key] = torch.cat(b_parts, dim=1).contiguous()
        new_r = r + sum(int(a0.shape[a_dim]) for a0, _, _ in offsets)
        if use_rslora:  # the same scaling s at the new rank
            alphas[path] = alpha * (new_r / r) ** 0.5
        else:
            alphas[path] = alpha * (new_r // r) if new_r % r == 0 else alpha * new_r / r
        ranks[path] = new_r
    return tensors, ranks, alphas


def _target_spec(model: nn.Module, paths: list[str]) -> list[str] | str:
    """target_modules for the saved config that selects exactly ``paths`` on the unwrapped model:
    the short names when they are unambiguous, else the full paths, else an exact regex."""
    names = [n for n, _ in _candidate_modules(model)]
    wanted = set(paths)
    for spec in (sorted({p.split(".")[-1] for p in paths}), sorted(paths)):
        if {n for n in names if _name_matches(spec, n)} == wanted:
            return spec
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _peft_config_dict(
    model: nn.Module, adapter_name: str, paths: list[str], ranks: dict[str, int], alphas: dict[str, float]
) -> dict:
    config = _configs(model)[adapter_name]
    layers = dict(_lora_layers(model))
    # the config's r / alpha where some layer has them (PiSSA conversion doubles all: then the commonest value)
    top_r = config.r if config.r in ranks.values() else collections.Counter(ranks.values()).most_common(1)[0][0]
    top_alpha = (config.alpha if config.alpha in alphas.values()
                 else collections.Counter(alphas.values()).most_common(1)[0][0])  # fmt: skip
    rank_pattern = {p: ranks[p] for p in paths if ranks[p] != top_r}
    alpha_pattern = {p: alphas[p] for p in paths if alphas[p] != top_alpha}
    fan_in_fan_out = any(type(layers[p].base_layer).__name__ in ("Conv1D", "QuantConv1D") for p in paths)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path if isinstance(name_or_path, str) else None,
        "revision": None,
        "inference_mode": True,
        "r": top_r,
        "lora_alpha": top_alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_spec(model, paths),
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "modules_to_save": None,
        "init_lora_weights": True,  # the weights come from the file: never re-initialise on load
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_bias": False,
    }


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _is_diffusers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(model).__mro__)


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    diffusers: bool | None = None,
    as_trained: bool = False,
    overwrite: bool = False,
) -> None:
    """Write one adapter in PEFT's format (and diffusers' LoRA file for diffusers models).

    Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (loadable with
    ``peft.PeftModel.from_pretrained`` on the same float base); with ``diffusers`` (default: when the
    model is a diffusers model) also ``pytorch_lora_weights.safetensors`` with keys prefixed ``unet.``
    (``transformer.`` for other diffusers models) and the config in its metadata, as
    ``pipeline.load_lora_weights(directory)`` expects, and a manifest (``qlora_kit/safe_io.py``).
    ``directory`` must be new, empty or a previous save (``overwrite=True``: replace only the adapter's
    files, keep the others); it is replaced crash-safely as a whole.

    The saved adapter is exact on the original model: where ``init="pissa"`` rewrote a base into its
    residual, it is written as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
    writes it (rank 2r, alpha doubled, or times sqrt(2) with rsLoRA). ``init="loftq"`` adapters are exact
    on the original model quantized with ``NF4Config(blocksize=64)``. ``as_trained=True`` skips this and
    writes the tensors as trained: exact only over this model's base as it is now (changed by PiSSA / LoftQ).

    Raises:
        ValueError: the model has no adapter ``adapter_name``, the adapter cannot be made exact on the
            original model (PiSSA over a quantized base; LoftQ before quantizing to NF4 with blocksize 64),
            or ``directory`` holds files that are not a saved adapter (without ``overwrite``).

    Example:
        >>> save_adapter(model, "out/adapter")
    """
    with safe_io.atomic_dir(directory, kind="adapter", what="save_adapter", overwrite=overwrite) as tmp:
        _write_adapter(model, tmp, adapter_name, diffusers=diffusers, as_trained=as_trained)


def _write_adapter(model, directory, adapter_name: str, *, diffusers: bool | None, as_trained: bool) -> None:
    """The files of :func:`save_adapter`, written into the fresh directory ``directory``."""
    from safetensors.torch import save_file

    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r} to save; the model has {sorted(configs)}")
    tensors, ranks, alphas = _export_adapter(model, adapter_name, as_trained)
    paths = sorted(tensors)
    config = _peft_config_dict(model, adapter_name, paths, ranks, alphas)
    state = {f"{_PEFT_PREFIX}{p}.{k}": v for p in paths for k, v in tensors[p].items()}
    _atomic_write(os.path.join(directory, _WEIGHTS_NAME), lambda f: save_file(state, f, metadata={"format": "pt"}))

    def write_json(f):
        with open(f, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)

    _atomic_write(os.path.join(directory, _CONFIG_NAME), write_json)
    if diffusers is None:
        diffusers = _is_diffusers_model(model)
    if diffusers:
        prefix = "unet" if "unet" in type(model).__name__.lower() else "transformer"
        if any(k == "lora_embedding_A" for p in paths for k in tensors[p]):
            raise ValueError(
                "diffusers' LoRA format has no embedding adapters; exclude embeddings or pass diffusers=False"
            )
        dstate = {f"{prefix}.{p}.{k}": v for p in paths for k, v in tensors[p].items()}
        peft_kwargs = {
            k: config[k]
            for k in (
                "r",
                "lora_alpha",
                "target_modules",
                "lora_dropout",
                "use_rslora",
                "use_dora",
                "init_lora_weights",
                "bias",
                "rank_pattern",
                "alpha_pattern",
            )
        }
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
            {f"{prefix}.{k}": v for k, v in peft_kwargs.items()}, indent=2, sort_keys=True)}  # fmt: skip
        _atomic_write(os.path.join(directory, _DIFFUSERS_WEIGHTS_NAME), lambda f: save_file(dstate, f, metadata=meta))


_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _extra_tensor_path(rest: str, peft_config: dict) -> str | None:
    """The model parameter a non-LoRA tensor of a PEFT adapter replaces, or None when it is not one PEFT
    writes for ``modules_to_save`` (whole modules, e.g. a classifier head) or ``bias`` ("lora_only"/"all")."""
    module_path, _, name = rest.rpartition(".")
    if rest.endswith(".base_layer.bias") and peft_config.get("bias", "none") != "none":
        return module_path.removesuffix(".base_layer") + ".bias"
    if name == "bias" and peft_config.get("bias", "none") == "all":
        return rest
    saved = peft_config.get("modules_to_save") or []
    if any(f".{m}." in f".{module_path}." for m in saved):  # the saved module or one inside it
        return rest
    return None


def _parse_peft_state(
    state: dict[str, torch.Tensor], directory, peft_config: dict | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(path -> {LoRA suffix: tensor}, model parameter path -> tensor for modules_to_save / biases)."""
    per_path: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in state.items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(
                f"{directory}: key {key!r} does not start with {_PEFT_PREFIX!r}; is this a PEFT LoRA adapter?"
            )
        rest = key[len(_PEFT_PREFIX) :]
        suffix = next((s for s in _SUFFIXES if rest.endswith("." + s)), None)
        if suffix is None:
            target = _extra_tensor_path(rest, peft_config or {})
            if target is not None:
                extra[target] = value
                continue
            if rest.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings' base weights too
                ignored.append(rest)
                continue
            if rest.endswith(".lora_B.bias") or rest.endswith(".lora_A.bias"):
                option = "lora_bias=True (a bias on lora_B)"
            elif ".modules_to_save." in rest:
                option = "modules_to_save (a module the adapter_config.json does not list)"
            else:
                option = "a tensor outside LoRA, modules_to_save and bias"
            raise ValueError(f"{directory}: key {key!r} comes from {option}, which load_adapter does not read")
        per_path.setdefault(rest[: -len(suffix) - 1], {})[suffix] = value
    if ignored:
        warnings.warn(f"ignoring base-layer weights saved with the adapter: {ignored[:3]}", stacklevel=3)
    return per_path, extra


@torch.no_grad()
def _load_extra_tensors(model: nn.Module, extra: dict[str, torch.Tensor], directory) -> None:
    """Copy modules_to_save / bias tensors into the model (they replace the base values, as PEFT's do when
    the adapter is active; disabling adapters does not restore them)."""
    pairs = []
    for path, value in extra.items():  # every tensor is checked before any is copied
        module_path, _, name = path.rpartition(".")
        try:
            module = model.get_submodule(module_path) if module_path else model
        except AttributeError:
            raise ValueError(f"{directory}: {path!r} (modules_to_save or bias) is not in this model") from None
        if isinstance(module, LoraLayer):
            module = module.base_layer
        target = module._parameters.get(name)
        if target is None or tuple(target.shape) != tuple(value.shape):
            got = None if target is None else tuple(target.shape)
            raise ValueError(
                f"{directory}: {path!r} (modules_to_save or bias) has shape {tuple(value.shape)}, the model's is {got}"
            )
        pairs.append((target, value))
    for target, value in pairs:
        target.copy_(value.to(target.dtype))


def _pattern_value(pattern: dict, path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):  # PEFT's get_pattern_key
            return value
    return default


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *, is_trainable: bool = True
) -> nn.Module:
    """Load a PEFT LoRA adapter (saved by :func:`save_adapter` or by PEFT) into ``model``.

    The layers to wrap are read from the tensor names, ranks from the tensor shapes, alpha from
    ``lora_alpha`` / ``alpha_pattern``. Works on float and quantized bases. The adapter becomes active
    when none is; ``is_trainable=False`` loads it frozen.

    Returns:
        The same model.

    Raises:
        FileNotFoundError: the directory lacks adapter_config.json or adapter_model.safetensors.
        ValueError: not a LoRA adapter, a targeted module is missing, or shapes disagree with the model.

    Example:
        >>> model = load_adapter(model, "out/adapter")
    """
    safe_io.recover(directory)  # a save killed mid-swap: its previous adapter comes back first
    directory = os.fspath(directory)
    config_path = os.path.join(directory, _CONFIG_NAME)
    weights_path = os.path.join(directory, _WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {_CONFIG_NAME} in {directory!r}; point load_adapter at a saved adapter directory")
    if not os.path.isfile(weights_path):
        hint = " (pickled .bin adapters are not loaded; convert them to safetensors)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""  # fmt: skip
        raise FileNotFoundError(f"no {_WEIGHTS_NAME} in {directory!r}{hint}")
    peft_config = _read_adapter_config(directory, config_path)
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory!r} holds a {peft_config.get('peft_type')!r} adapter; only LORA adapters load here"
        )
    if peft_config.get("lora_bias"):
        raise ValueError(f"{directory!r} uses lora_bias=True, which load_adapter does not read; retrain without it")
    _check_adapter_name(adapter_name)
    if adapter_name in _configs(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pass another adapter_name")
    per_path, extra = _parse_peft_state(validate.read_adapter_tensors(weights_path, directory), directory, peft_config)
    if not per_path:
        raise ValueError(f"{directory!r} holds no LoRA tensors")
    target = peft_config.get("target_modules") or sorted(per_path)
    config = LoraConfig(
        r=int(peft_config.get("r", 8)),
        alpha=peft_config.get("lora_alpha", 8),
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        target_modules=target if isinstance(target, str) else tuple(target),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        use_dora=bool(peft_config.get("use_dora", False)),
    )
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    modules = dict(model.named_modules())
    plan = []
    for path, entry in sorted(per_path.items()):
        module = modules.get(path)
        if module is None:
            raise ValueError(
                f"the adapter in {directory!r} targets {path!r}, which this model lacks; load it into the model "
                "it was trained for"
            )
        a = entry.get("lora_A.weight", entry.get("lora_embedding_A"))
        b = entry.get("lora_B.weight", entry.get("lora_embedding_B"))
        if a is None or b is None:
            raise ValueError(f"the adapter in {directory!r} has an incomplete A/B pair for {path!r}")
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if lora_kind(base) is None:
            raise ValueError(f"the adapter targets {path!r}, a {type(base).__name__}, which LoRA cannot adapt")
        plan.append((path, module, entry, a, b))
    validate.check_adapter_plan(plan, directory)  # every shape checked before the model changes
    if not _active(model):
        _active(model).append(adapter_name)
    _load_extra_tensors(model, extra, directory)
    for path, module, entry, a, _ in plan:
        r = lora_wrapper_class(module.base_layer if isinstance(module, LoraLayer) else module).rank_of(a)
        alpha = _pattern_value(alpha_pattern, path, config.alpha)
        layer = _add_to_module(
            model, path, module, adapter_name, r=r, alpha=alpha,
            config=LoraConfig(r=r, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                              use_dora="lora_magnitude_vector" in entry),
            init="default",
        )  # fmt: skip
        _copy_into(layer, adapter_name, entry, path, directory)
    _configs(model)[adapter_name] = config
    _refresh_trainable(model)
    if not is_trainable:
        for _, layer in _lora_layers(model):
            for p in layer.parameters():
                if p.requires_grad and _owns(layer, adapter_name, p):
                    p.requires_grad_(False)
    return model


def _read_adapter_config(directory: str, config_path: str) -> dict:
    """adapter_config.json after the manifest check (when the directory has one) and field type checks."""
    safe_io.verify(directory, required=(_CONFIG_NAME, _WEIGHTS_NAME))
    peft_config = validate.read_json(config_path, "save the adapter again")
    validate.check_adapter_config(peft_config, directory)
    return peft_config


def _owns(layer: LoraLayer, adapter_name: str, p: torch.Tensor) -> bool:
    params = []
    for container in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        if adapter_name in container:
            params += list(container[adapter_name].parameters())
    for container in (layer.lora_embedding_A, layer.lora_embedding_B):
        if adapter_name in container:
            params.append(container[adapter_name])
    return any(p is q for q in params)


@torch.no_grad()
def _copy_into(layer: LoraLayer, name: str, entry: dict[str, torch.Tensor], path: str, directory) -> None:
    if layer.kind == "embedding":
        targets = {"lora_embedding_A": layer.lora_embedding_A[name], "lora_embedding_B": layer.lora_embedding_B[name]}
    else:
        targets = {"lora_A.weight": layer.lora_A[name].weight, "lora_B.weight": layer.lora_B[name].weight}
    if name in layer.lora_magnitude_vector:
        targets["lora_magnitude_vector"] = layer.lora_magnitude_vector[name].weight
    for key, dst in targets.items():
        src = entry[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"{directory!r}: {path}.{key} has shape {tuple(src.shape)} but this model needs {tuple(dst.shape)}; "
                "the adapter was trained for a different model"
            )
        dst.copy_(src.to(dst.dtype))
