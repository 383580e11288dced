"""Checks of files read back from disk: every field of quantization.json / adapter_config.json and every
tensor, before anything is allocated from a size the file states or copied into a model.

Each check raises ValueError with one sentence naming the file, the field or tensor, and the fix.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def read_json(path: str | os.PathLike, fix: str):
    """Parse a JSON file; ValueError (naming the file and ``fix``) for unreadable, invalid or too deep JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    except RecursionError:
        raise ValueError(f"{path} nests too deeply to be a real config; {fix}") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jsonish(v) -> str:
    return json.dumps(v) if isinstance(v, (bool, int, float, str, type(None))) else type(v).__name__


def same(a, b) -> bool:
    """Equal with the same JSON type (True is not 1, 64.0 is not 64)."""
    return type(a) is type(b) and a == b


# ----- quantization.json ------------------------------------------------------------------------------------
def check_qmap_structure(qmap, path: Path) -> None:
    """The top level of quantization.json: {"version": 1, "layers": {fqn: {...}}, "tied": {alias: key}}."""
    fix = "re-save the model with save_quantized"
    if not isinstance(qmap, dict):
        raise ValueError(f"{path} holds a {type(qmap).__name__}, not a mapping; {fix}")
    unknown = sorted(set(qmap) - {"version", "layers", "tied"})
    if unknown:
        raise ValueError(f"{path} has unknown field {unknown[0]!r}; {fix}")
    if not isinstance(qmap.get("layers"), dict):
        got = _jsonish(qmap.get("layers"))
        raise ValueError(f"{path}: field 'layers' must be a mapping of module names, got {got}; {fix}")
    tied = qmap.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError(f"{path}: field 'tied' must map tensor names to tensor names; {fix}")
    for fqn, info in qmap["layers"].items():
        if not isinstance(info, dict):
            raise ValueError(f"{path}: the entry for {fqn!r} is not a mapping; {fix}")
        for key, kind in (("layer", str), ("format", dict), ("config", dict), ("out_dtype", str)):
            if not isinstance(info.get(key), kind):
                got = _jsonish(info.get(key))
                raise ValueError(f"{path}: field 'layers.{fqn}.{key}' must be a {kind.__name__}, got {got}; {fix}")
        extra = sorted(set(info) - {"layer", "format", "config", "out_dtype"})
        if extra:
            raise ValueError(f"{path}: field 'layers.{fqn}' has unknown key {extra[0]!r}; {fix}")
        if info["out_dtype"] not in _FLOAT_DTYPE_NAMES:
            allowed = list(_FLOAT_DTYPE_NAMES)
            raise ValueError(f"{path}: field 'layers.{fqn}.out_dtype' is {info['out_dtype']!r}, not one of {allowed}")


def expected_2d_shape(cls: type, float_module: nn.Module) -> tuple[int, ...]:
    """The 2-D shape a quantized layer of ``cls`` stores for ``float_module``'s weight (nothing allocated)."""
    probe = cls.__new__(cls)  # _to_2d only reshapes: no attributes needed
    return tuple(probe._to_2d(torch.empty(float_module.weight.shape, device="meta")).shape)


def check_format_meta(path: Path, fqn: str, meta: dict, fmt: str, config, shape2d: tuple[int, ...]) -> None:
    """The layer's format fields equal what its config and the model's layer imply (before allocating)."""
    expected = {"format": fmt, "shape": list(shape2d)}
    for key in ("blocksize", "double_quant", "group_size"):
        if hasattr(config, key):
            expected[key] = getattr(config, key)
    for key in sorted(set(meta) | set(expected)):
        if key not in expected:
            raise ValueError(f"{path}: field 'layers.{fqn}.format.{key}' is not a {fmt} field; the file is corrupt")
        got = meta.get(key)
        if key == "shape":
            ok = isinstance(got, list) and len(got) == len(shape2d) and all(map(same, got, shape2d))
        else:
            ok = same(got, expected[key])
        if not ok:
            raise ValueError(
                f"{path}: field 'layers.{fqn}.format.{key}' is {_jsonish(got) if key != 'shape' else got!r}, but "
                f"{'the model' if key == 'shape' else 'its config'} needs {expected[key]!r}; the file does not match "
                "this model or is corrupt"
            )


def model_ties(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: first key} for tensors sharing storage, in order (the rule save_quantized writes ``tied`` by)."""
    tied, seen = {}, {}
    for key, t in tensors.items():
        if not t.numel() or t.device.type == "meta":
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    return tied


def check_ties(path: Path, saved: dict[str, str], expected: dict[str, str]) -> None:
    for alias in sorted(set(saved) | set(expected)):
        if saved.get(alias) != expected.get(alias):
            want = f"tied to {expected[alias]!r}" if alias in expected else "stored on its own"
            raise ValueError(
                f"{path}: field 'tied' maps {alias!r} to {saved.get(alias)!r}, but in this model it is {want}; "
                "the file does not match this model or was edited"
            )


def check_finite(tensors: dict[str, torch.Tensor], keys, where: str) -> None:
    """NaN / Inf in any floating tensor of ``keys`` is refused, naming the tensor."""
    for key in keys:
        t = tensors[key]
        n_bad = _count_nonfinite(t) if t.is_floating_point() else 0
        if n_bad:
            raise ValueError(
                f"tensor {key!r} in {where} holds {n_bad} NaN/Inf values; the file is corrupt (re-save or retrain)"
            )


def _count_nonfinite(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    if t.element_size() > 1:
        return 0 if torch.isfinite(t).all() else int((~torch.isfinite(t)).sum())
    flat = t.reshape(-1)  # fp8 has no isfinite kernel: check it in float32, a chunk at a time
    return sum(int((~torch.isfinite(flat[i : i + chunk].float())).sum()) for i in range(0, flat.numel(), chunk))


def check_not_requantizing(model: nn.Module, config, keep) -> None:
    """``quantize`` starts from float weights: layers the filter picks that are already quantized with
    another config would silently keep their old format, so that is refused (the same config: no-op)."""
    from .nn.quantized import QuantizedLayer

    held = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, QuantizedLayer) and fqn and keep(m, fqn)]
    other = [(fqn, m) for fqn, m in held if m.quant_config != config]
    if not other:
        return
    formats = sorted({m.format_name for _, m in held})
    fqn, m = other[0]
    raise ValueError(
        f"the model already holds {len(held)} quantized layers ({', '.join(formats)}; e.g. {fqn!r} with "
        f"{m.quant_config}), and quantize() starts from float weights: load the float model again (e.g. "
        "from_pretrained) and quantize that, or pass a filter_fn that skips the quantized layers"
    )


# ----- adapter_config.json ----------------------------------------------------------------------------------
_ADAPTER_FIELDS = {  # field: (check, what it must be); absent or null fields take PEFT's defaults
    "r": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (lambda v: is_number(v) and math.isfinite(v) and v > 0, "a finite positive number"),
    "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "target_modules": (
        lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and all(isinstance(n, str) for n in v)),
        "a regex string or a list of module names",
    ),
    "modules_to_save": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of names"),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(is_int(x) and x > 0 for x in v.values()),
        "a mapping of module names to positive integers",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(is_number(x) and math.isfinite(x) and x > 0 for x in v.values()),
        "a mapping of module names to finite positive numbers",
    ),
}


def check_adapter_config(cfg, directory) -> None:
    """Types and ranges of every adapter_config.json field the loader reads (booleans are booleans)."""
    where = f"{os.fspath(directory)!r}: adapter_config.json"
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} holds a {type(cfg).__name__}, not a mapping; save the adapter again")
    for key, (ok, must) in _ADAPTER_FIELDS.items():
        value = cfg.get(key)
        if value is not None and not ok(value):
            raise ValueError(f"{where} field {key!r} must be {must}, got {_jsonish(value)}; fix or re-save the adapter")


def read_adapter_tensors(weights_path: str, directory) -> dict[str, torch.Tensor]:
    """Load adapter_model.safetensors; refuse unreadable files, non-float dtypes and NaN / Inf values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is truncated or corrupt ({e}); save the adapter again") from None
    for key, t in state.items():
        if t.dtype not in _FLOAT_DTYPES and not key.endswith("num_batches_tracked"):
            raise ValueError(
                f"{weights_path}: tensor {key!r} has dtype {t.dtype}; adapter tensors are floating point, "
                "the file is corrupt"
            )
    check_finite(state, list(state), weights_path)
    return state


def check_adapter_plan(plan, directory) -> None:
    """Every A / B pair has the shapes its layer needs, checked before any layer of the model is wrapped."""
    from .nn.lora_layers import LoraLayer, lora_wrapper_class

    for path, module, _entry, a, b in plan:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        cls = lora_wrapper_class(base)
        r = cls.rank_of(a)
        probe = module if isinstance(module, LoraLayer) else cls(base)  # a throwaway wrapper: base untouched
        if probe.groups > 1 and r % probe.groups:
            raise ValueError(
                f"{os.fspath(directory)!r}: {path} has rank {r}, not a multiple of its {probe.groups} groups; "
                "the adapter was trained for a different model"
            )
        for name, t, want in zip(("A", "B"), (a, b), probe._factor_shapes(r), strict=True):
            if tuple(t.shape) != tuple(want):
                raise ValueError(
                    f"{os.fspath(directory)!r}: {path} lora_{name} has shape {tuple(t.shape)} but this model needs "
                    f"{tuple(want)}; the adapter was trained for a different model"
                )


# ----- LoraConfig against the model -------------------------------------------------------------------------
def lora_rank_limit(module: nn.Module) -> int:
    """The largest useful rank on ``module``: min(fan-in, fan-out) of its weight."""
    from .nn.lora_layers import LoraLayer, lora_wrapper_class

    base = module.base_layer if isinstance(module, LoraLayer) else module
    probe = module if isinstance(module, LoraLayer) else lora_wrapper_class(base)(base)
    fan_in, fan_out = probe._dims()
    kernel = getattr(base, "kernel_size", ())
    if probe.kind in ("conv", "conv_transpose"):
        fan_in = fan_in * math.prod(kernel)
    return min(int(fan_in), int(fan_out))


def check_lora_rank(config, targets) -> None:
    """``config.r`` must not exceed min(in, out) of the targeted layers (a larger rank adds nothing).

    When no targeted layer is that wide the config is refused; when only some are narrower (a 1-channel
    output convolution of an image model), they are named in a warning: their update's rank is capped by
    their shape, as in PEFT.
    """
    import warnings

    limits = {path: lora_rank_limit(module) for path, module in targets}
    narrow = sorted(p for p, limit in limits.items() if config.r > limit)
    if not narrow:
        return
    widest = max(limits.values())
    if config.r > widest:
        raise ValueError(
            f"LoraConfig.r={config.r} is larger than any targeted layer allows (min(in, out) is at most {widest}, "
            f"e.g. {narrow[0]!r}); lower r to at most {widest}"
        )
    warnings.warn(
        f"LoraConfig.r={config.r} exceeds min(in, out) of {len(narrow)} targeted layer(s), e.g. {narrow[0]!r} "
        f"({limits[narrow[0]]}): their update's rank is capped by their shape; exclude them to save memory",
        stacklevel=3,
    )
