"""Saving and loading LoRA adapters in PEFT's format and diffusers' LoRA format.

PEFT's format is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<path>.lora_A.weight``; diffusers models also get ``pytorch_lora_weights.safetensors``
(keys ``unet.<path>...``), which ``pipeline.load_lora_weights`` reads; :func:`load_adapter` reads both
(diffusers' through :mod:`qlora_kit.hf_diffusers`). Loading never unpickles. The
public entry points are re-exported by :mod:`qlora_kit.lora`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import hf_diffusers, safe_io, validate
from .lora import (
    LoraConfig,
    active_adapters,
    adapter_configs,
    add_to_module,
    candidate_modules,
    check_adapter_name,
    lora_layers,
    name_matches,
    refresh_trainable,
)
from .nn.lora_layers import LoraLayer, lora_kind, lora_wrapper_class

_CONFIG_NAME = "adapter_config.json"
_WEIGHTS_NAME = "adapter_model.safetensors"
_DIFFUSERS_WEIGHTS_NAME = hf_diffusers.DIFFUSERS_WEIGHTS_NAME
_PEFT_PREFIX = "base_model.model."


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """path -> {PEFT suffix: tensor} for one adapter, as trained (relative to the current base)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, layer in lora_layers(model):
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
    layers = dict(lora_layers(model))
    use_rslora = adapter_configs(model)[adapter_name].use_rslora
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
    names = [n for n, _ in candidate_modules(model)]
    wanted = set(paths)
    for spec in (sorted({p.split(".")[-1] for p in paths}), sorted(paths)):
        if {n for n in names if name_matches(spec, n)} == wanted:
            return spec
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _peft_config_dict(
    model: nn.Module, adapter_name: str, paths: list[str], ranks: dict[str, int], alphas: dict[str, float]
) -> dict:
    config = adapter_configs(model)[adapter_name]
    layers = dict(lora_layers(model))
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

    configs = adapter_configs(model)
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
    """Load a PEFT LoRA adapter (saved by :func:`save_adapter`, by PEFT or by diffusers) into ``model``.

    A directory with ``adapter_config.json`` is read as PEFT's format (``modules_to_save`` and ``bias``
    tensors included); one with only diffusers' ``pytorch_lora_weights.safetensors`` is read as diffusers
    writes it (the part for ``model``'s component: ``unet.``, ``transformer.`` or ``text_encoder.``; alpha from
    its metadata, else alpha = rank as diffusers loads it), see :mod:`qlora_kit.hf_diffusers`.

    The layers to wrap are read from the tensor names, ranks from the tensor shapes, alpha from
    ``lora_alpha`` / ``alpha_pattern``. Works on float and quantized bases. The adapter becomes active
    when none is; ``is_trainable=False`` loads it frozen.

    Returns:
        The same model.

    Raises:
        FileNotFoundError: the directory lacks adapter_config.json or adapter_model.safetensors (and
            pytorch_lora_weights.safetensors).
        ValueError: not a LoRA adapter, an option or layout it does not read (named), a targeted module is
            missing, or shapes disagree with the model.

    Example:
        >>> model = load_adapter(model, "out/adapter")
    """
    safe_io.recover(directory)  # a save killed mid-swap: its previous adapter comes back first
    directory = os.fspath(directory)
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pass another adapter_name")
    if hf_diffusers.is_diffusers_lora_dir(directory):
        peft_config, state = hf_diffusers.read_diffusers_lora(directory, model)
    else:
        peft_config, weights_path = _open_adapter(directory)
        state = validate.read_adapter_tensors(weights_path, directory)
    per_path, extra = _parse_peft_state(state, directory, peft_config)
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
    plan = _load_plan(model, per_path, directory)
    validate.check_adapter_plan(plan, directory)  # every shape checked before the model changes
    if not active_adapters(model):
        active_adapters(model).append(adapter_name)
    _load_extra_tensors(model, extra, directory)
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    for path, module, entry, a, _ in plan:
        r = lora_wrapper_class(module.base_layer if isinstance(module, LoraLayer) else module).rank_of(a)
        alpha = _pattern_value(alpha_pattern, path, config.alpha)
        layer = add_to_module(
            model, path, module, adapter_name, r=r, alpha=alpha,
            config=LoraConfig(r=r, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                              use_dora="lora_magnitude_vector" in entry),
            init="default",
        )  # fmt: skip
        _copy_into(layer, adapter_name, entry, path, directory)
    adapter_configs(model)[adapter_name] = config
    refresh_trainable(model)
    if not is_trainable:
        for _, layer in lora_layers(model):
            for p in layer.parameters():
                if p.requires_grad and _owns(layer, adapter_name, p):
                    p.requires_grad_(False)
    return model


def _open_adapter(directory: str) -> tuple[dict, str]:
    """(adapter_config.json, path of the weights file) of a saved LoRA adapter, both checked."""
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
    return peft_config, weights_path


def _load_plan(model: nn.Module, per_path: dict[str, dict[str, torch.Tensor]], directory: str) -> list[tuple]:
    """(path, module, tensors, A, B) for every adapted layer, each checked to exist and be adaptable."""
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
    return plan


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
