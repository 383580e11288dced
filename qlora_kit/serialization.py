"""Save and load quantized models: safetensors tensors + a JSON quantization map. Never unpickles.

Layout of a saved directory:
    model.safetensors        every tensor of the state dict (tied tensors stored once)
    quantization.json        {"version": 1, "layers": {fqn: {"layer": class, "format": {...},
                              "compute_dtype": "bfloat16", "out_dtype": "float32"}}, "tied": {alias: key}}

Writes are atomic: files go to a temporary directory next to the target, which then replaces it.
Loading validates everything (keys, shapes, dtypes, file integrity) before touching the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .api import _format_name, _set_submodule
from .configs import CONFIG_CLASSES, FORMAT_OF_CONFIG
from .nn.quantized import LAYER_CLASSES, QuantizedLayer, quantized_class_for

WEIGHTS_NAME = "model.safetensors"
QMAP_NAME = "quantization.json"
_VERSION = 1
# the weight-only config of each format (files written before the config class was recorded)
_CONFIG_BY_FORMAT = {}
for _cls, _fmt in FORMAT_OF_CONFIG.items():
    _CONFIG_BY_FORMAT.setdefault(_fmt, _cls)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in {QMAP_NAME}")
    return dtype


def _config_meta(config) -> dict:
    meta = {k: getattr(config, k) for k in config.__dataclass_fields__}
    meta = {k: (_dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in meta.items()}
    return {"class": type(config).__name__, **meta}


def _config_from_meta(fmt: str, meta: dict):
    meta = dict(meta)
    name = meta.pop("class", None)
    cls = _CONFIG_BY_FORMAT.get(fmt) if name is None else CONFIG_CLASSES.get(name)
    if cls is None or FORMAT_OF_CONFIG.get(cls) != fmt:
        raise ValueError(f"{QMAP_NAME}: config {name!r} does not describe format {fmt!r}; the file is corrupt")
    kwargs = {k: (_dtype_from_name(v) if k.endswith("dtype") else v) for k, v in meta.items()}
    return cls(**kwargs)


def _atomic_write_dir(directory: Path, write) -> None:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "d")
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old / "d", directory)  # put the previous save back: nothing is lost
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save a quantized model (all of its state) to ``directory`` (created or atomically replaced).

    Args:
        model: a model returned by ``quantize``.
        directory: target directory.
    """
    from safetensors.torch import save_file

    layers = {}
    for fqn, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            layers[fqn] = {
                "layer": type(module).__name__,
                "format": module.qweight.metadata(),
                "config": _config_meta(module.quant_config),
                "out_dtype": _dtype_name(module.out_dtype),
            }
    state = model.state_dict(keep_vars=False)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in by_storage:
            tied[key] = by_storage[ident]
            continue
        if ident is not None:
            by_storage[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    qmap = {"version": _VERSION, "layers": layers, "tied": tied}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "qlora-kit"})
        (tmp / QMAP_NAME).write_text(json.dumps(qmap, indent=2, sort_keys=True))

    _atomic_write_dir(Path(directory), write)


def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a directory written by :func:`save_quantized` into a float skeleton of the same architecture.

    The model is modified only after every tensor has been read and checked: a missing file, a
    truncated or corrupt file, a missing or unexpected key, a wrong shape or dtype raise ValueError
    naming the problem, and leave ``model`` as it was.

    Returns:
        ``model``, now quantized and holding the saved weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    qmap_path, weights_path = directory / QMAP_NAME, directory / WEIGHTS_NAME
    for path in (qmap_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing; point load_quantized at a directory written by save_quantized")
    try:
        qmap = json.loads(qmap_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{qmap_path} is not valid JSON ({e}); re-save the model") from None
    if qmap.get("version") != _VERSION:
        raise ValueError(f"{qmap_path} has version {qmap.get('version')!r}; this qlora-kit reads version {_VERSION}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is truncated or corrupt ({e}); re-save the model") from None

    # build the quantized layers off-model first
    new_layers: dict[str, nn.Module] = {}
    layers = qmap.get("layers", {}) if isinstance(qmap, dict) else None
    if not isinstance(layers, dict):
        raise ValueError(f"{qmap_path} has no 'layers' mapping; re-save the model with save_quantized")
    for fqn, info in layers.items():
        try:
            float_module = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(
                f"the model has no module {fqn!r} that {qmap_path} quantizes; wrong architecture?"
            ) from None
        if not isinstance(info, dict):
            raise ValueError(f"{qmap_path}: the entry for {fqn!r} is not a mapping; re-save the model")
        cls = LAYER_CLASSES.get(info.get("layer"))
        if cls is None:
            raise ValueError(f"{qmap_path}: unknown layer class {info.get('layer')!r} for {fqn!r}")
        expected_cls = quantized_class_for(float_module)
        if expected_cls is None or not issubclass(cls, expected_cls):  # subclasses: e.g. SmoothQuantLinear
            raise ValueError(
                f"{qmap_path} says {fqn!r} is a {info.get('layer')}, but the model's {type(float_module).__name__} "
                "there does not quantize to one; load into the architecture that was saved"
            )
        try:
            fmt = info["format"]["format"]
            config = _config_from_meta(fmt, info["config"])
            _format_name(config)
            layer = cls.empty_like_float(float_module, config, info["format"])
            layer.out_dtype = _dtype_from_name(info["out_dtype"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{qmap_path}: the entry for {fqn!r} is malformed ({type(e).__name__}: {e}); re-save the model"
            ) from None
        layer.train(float_module.training)
        new_layers[fqn] = layer

    # the state dict the finished model will have, to check against
    expected: dict[str, torch.Tensor] = {}
    quantized_prefixes = tuple(f + "." for f in new_layers)
    for key, t in model.state_dict().items():
        if not key.startswith(quantized_prefixes):
            expected[key] = t
    for fqn, layer in new_layers.items():
        for k, t in layer.state_dict().items():
            expected[f"{fqn}.{k}"] = t
    tied = qmap.get("tied", {})
    for key, ref in expected.items():
        source = tied.get(key, key)
        if source not in tensors:
            raise ValueError(f"tensor {key!r} is missing from {weights_path}; the file does not match this model")
        got = tensors[source]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise ValueError(
                f"tensor {key!r} in {weights_path} has shape {tuple(got.shape)} and dtype {got.dtype}, "
                f"the model expects {tuple(ref.shape)} and {ref.dtype}"
            )
    unexpected = sorted(set(tensors) - set(expected) - set(tied.values()))
    if unexpected:
        raise ValueError(f"{weights_path} holds tensors this model does not have, e.g. {unexpected[:3]}")

    # all checks passed: swap layers in and copy the weights
    for fqn, layer in new_layers.items():
        device = next(model.get_submodule(fqn).parameters(), torch.empty(0)).device
        _set_submodule(model, fqn, layer.to(device))
    full = {key: tensors[tied.get(key, key)] for key in expected}
    model.load_state_dict(full, strict=True)
    return model
