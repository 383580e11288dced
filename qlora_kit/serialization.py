"""Save and load quantized models: safetensors tensors + a JSON quantization map. Never unpickles.

Layout of a saved directory:
    model.safetensors        every tensor of the state dict (tied tensors stored once)
    quantization.json        {"version": 1, "layers": {fqn: {"layer": class, "format": {...},
                              "compute_dtype": "bfloat16", "out_dtype": "float32"}}, "tied": {alias: key}}

    qlora-kit-manifest.json  sizes, SHA-256 and tensor headers of the files above (``qlora_kit.safe_io``)

Saves never delete the user's files and are crash-safe (``qlora_kit/safe_io.py``). Loading validates
everything (manifest hashes, every field of quantization.json against the model, keys, shapes, dtypes,
finite values) before allocating a tensor from a size the file states or touching the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import safe_io, validate
from .nn.quantized import LAYER_CLASSES, QuantizedLayer, quantized_class_for
from .registry import config_class, format_for_config, get_format

WEIGHTS_NAME = "model.safetensors"
QMAP_NAME = "quantization.json"
_VERSION = 1


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
    # files written before the config class was recorded: the format's weight-only config
    cls = get_format(fmt).configs[0] if name is None else config_class(name)
    if cls is None or getattr(format_for_config(cls), "name", None) != fmt:
        raise ValueError(f"{QMAP_NAME}: config {name!r} does not describe format {fmt!r}; the file is corrupt")
    kwargs = {k: (_dtype_from_name(v) if k.endswith("dtype") else v) for k, v in meta.items()}
    return cls(**kwargs)


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    also_write: Callable[[Path], None] | None = None,
) -> None:
    """Save a quantized model (all of its state) to ``directory``, crash-safe, never deleting user files.

    ``directory`` must be new, empty, or a previous qlora-kit save (recognised by its manifest): it is
    then replaced as a whole, so at every instant it holds the complete old or the complete new save.

    Args:
        model: a model returned by ``quantize``.
        directory: target directory.
        overwrite: also save into a directory holding other files: the saved files are replaced, the
            others kept.
        also_write: called with the new directory before its manifest is written, for files saved along
            (``config.json``, a tokenizer).

    Raises:
        ValueError: ``directory`` is a file, or holds files that are not a qlora-kit save (without
            ``overwrite``).

    Example:
        >>> save_quantized(qlora_kit.quantize(model, NF4Config()), "out/nf4")
    """
    with safe_io.atomic_dir(directory, kind="quantized", what="save_quantized", overwrite=overwrite) as tmp:
        write_quantized(model, tmp)
        if also_write is not None:
            also_write(tmp)


def write_quantized(model: nn.Module, directory: Path) -> None:
    """The two files of :func:`save_quantized`, written into ``directory`` as it is (no swap, no manifest)."""
    from safetensors.torch import save_file

    tensors, qmap = _state_and_map(model)
    save_file(tensors, str(Path(directory) / WEIGHTS_NAME), metadata={"format": "pt", "producer": "qlora-kit"})
    (Path(directory) / QMAP_NAME).write_text(json.dumps(qmap, indent=2, sort_keys=True))


def _state_and_map(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to write (tied tensors once) and the quantization map."""
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
    tied = validate.model_ties(state)
    tensors = {key: t.detach().contiguous().cpu() for key, t in state.items() if key not in tied}
    return tensors, {"version": _VERSION, "layers": layers, "tied": tied}


def _read_files(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(quantization map, tensors) of a saved directory, after the manifest check and the map's structure."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    qmap_path, weights_path = directory / QMAP_NAME, directory / WEIGHTS_NAME
    safe_io.recover(directory)
    for path in (qmap_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing; point load_quantized at a directory written by save_quantized")
    safe_io.verify(directory, required=(QMAP_NAME, WEIGHTS_NAME))
    qmap = validate.read_json(qmap_path, "re-save the model")
    if isinstance(qmap, dict) and not validate.same(qmap.get("version"), _VERSION):
        raise ValueError(f"{qmap_path} has version {qmap.get('version')!r}; this qlora-kit reads version {_VERSION}")
    validate.check_qmap_structure(qmap, qmap_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is truncated or corrupt ({e}); re-save the model") from None
    return qmap, tensors


def _build_layer(model: nn.Module, fqn: str, info: dict, qmap_path: Path) -> nn.Module:
    """An empty quantized layer for ``fqn``, after every field of its entry is checked against the model."""
    try:
        float_module = model.get_submodule(fqn)
    except AttributeError:
        raise ValueError(f"the model has no module {fqn!r} that {qmap_path} quantizes; wrong architecture?") from None
    cls = LAYER_CLASSES.get(info["layer"])
    if cls is None:
        raise ValueError(f"{qmap_path}: unknown layer class {info['layer']!r} for {fqn!r}")
    expected = quantized_class_for(float_module)
    if expected is None or not issubclass(cls, expected):  # subclasses: e.g. SmoothQuantLinear
        raise ValueError(
            f"{qmap_path} says {fqn!r} is a {info['layer']}, but the model's {type(float_module).__name__} "
            "there does not quantize to one; load into the architecture that was saved"
        )
    fmt = info["format"].get("format")
    try:
        config = _config_from_meta(fmt, info["config"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(
            f"{qmap_path}: field 'layers.{fqn}.config' is invalid ({str(e).splitlines()[0]}); re-save the model"
        ) from None
    shape2d = validate.expected_2d_shape(cls, float_module)
    validate.check_format_meta(qmap_path, fqn, info["format"], fmt, config, shape2d)  # sizes known good from here
    layer = cls.empty_like_float(float_module, config, info["format"])
    layer.out_dtype = _dtype_from_name(info["out_dtype"])
    layer.train(float_module.training)
    return layer


def _check_tensors(model, new_layers, qmap, tensors, directory) -> dict[str, torch.Tensor]:
    """Every tensor the finished model needs, checked (presence, shape, dtype, ties, finite); returns them."""
    qmap_path, weights_path = directory / QMAP_NAME, directory / WEIGHTS_NAME
    expected: dict[str, torch.Tensor] = {}
    quantized_prefixes = tuple(f + "." for f in new_layers)
    for key, t in model.state_dict().items():
        if not key.startswith(quantized_prefixes):
            expected[key] = t
    quantized_keys = []
    for fqn, layer in new_layers.items():
        for k, t in layer.state_dict().items():
            expected[f"{fqn}.{k}"] = t
            quantized_keys.append(f"{fqn}.{k}")
    tied = qmap.get("tied", {})
    validate.check_ties(qmap_path, tied, validate.model_ties(expected))
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
    # scales of quantized layers and the model's float parameters must be finite (buffers may hold masks)
    params = {k for k, _ in model.named_parameters() if not k.startswith(quantized_prefixes)}
    validate.check_finite(tensors, [k for k in quantized_keys + sorted(params) if k in tensors], str(weights_path))
    return {key: tensors[tied.get(key, key)] for key in expected}


def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a directory written by :func:`save_quantized` into a float skeleton of the same architecture.

    The model is modified only after every file, field and tensor has been checked: the manifest's SHA-256
    of each file, every field of quantization.json against the model (layer types, shapes, block / group
    sizes, tie map) before any tensor is allocated from it, then every tensor's presence, shape, dtype and
    finiteness. Any mismatch raises ValueError naming the file and the field or tensor, and leaves
    ``model`` as it was.

    Returns:
        ``model``, now quantized and holding the saved weights.

    Example:
        >>> model = load_quantized(AutoModelForCausalLM.from_config(config), "out/nf4")
    """
    directory = Path(directory)
    qmap, tensors = _read_files(directory)
    new_layers = {fqn: _build_layer(model, fqn, info, directory / QMAP_NAME) for fqn, info in qmap["layers"].items()}
    full = _check_tensors(model, new_layers, qmap, tensors, directory)
    # all checks passed: swap layers in and copy the weights
    for fqn, layer in new_layers.items():
        device = next(model.get_submodule(fqn).parameters(), torch.empty(0)).device
        model.set_submodule(fqn, layer.to(device))
    model.load_state_dict(full, strict=True)
    return model
