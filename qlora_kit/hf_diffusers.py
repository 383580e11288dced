"""Reading the LoRA files diffusers writes, for :func:`qlora_kit.load_adapter`.

diffusers' ``save_lora_weights`` (``StableDiffusionPipeline.save_lora_weights``, the training scripts) writes
one ``pytorch_lora_weights.safetensors`` and no ``adapter_config.json``: PEFT's tensor names with the
component as prefix (``unet.<path>.lora_A.weight``, ``text_encoder.<path>...``, ``transformer.<path>...``)
and, when the writer passed ``*_lora_adapter_metadata``, the component's ``LoraConfig`` as JSON in the
safetensors metadata (``lora_adapter_metadata``, keys ``unet.r``, ``unet.lora_alpha``, ...). Without that
metadata diffusers loads every module with ``lora_alpha`` equal to its rank (scale 1, ``W + B @ A``), and so
does this reader. Older layouts (kohya / A1111 ``lora_unet_...lora_down.weight`` with ``.alpha`` tensors,
diffusers' pre-PEFT ``...processor.to_q_lora.down.weight``) are refused by name: diffusers converts them
when its own pipeline loads them, and ``get_peft_model_state_dict`` + ``save_lora_weights`` re-saves them.
"""

from __future__ import annotations

import collections
import json
import os
import re

import torch
from torch import nn

from . import safe_io, validate

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_LEGACY = (
    (re.compile(r"^lora_(unet|te\d?)_|\.lora_down\.weight$|\.lora_up\.weight$|\.alpha$"), "kohya / A1111 keys"),
    (re.compile(r"\.processor\.|_lora\.(down|up)\.weight$|\.lora_linear_layer\."), "diffusers' pre-PEFT keys"),
)


def is_diffusers_lora_dir(directory: str) -> bool:
    """A directory holding diffusers' LoRA file and no PEFT ``adapter_config.json``."""
    return not os.path.isfile(os.path.join(directory, "adapter_config.json")) and os.path.isfile(
        os.path.join(directory, DIFFUSERS_WEIGHTS_NAME)
    )


def component_prefix(model: nn.Module) -> str:
    """The key prefix diffusers gives ``model``'s LoRA: ``unet``, ``transformer`` (other diffusers models) or
    ``text_encoder`` (a transformers model)."""
    if any(c.__module__.startswith("diffusers.") for c in type(model).__mro__):
        return "unet" if "unet" in type(model).__name__.lower() else "transformer"
    return "text_encoder"


def _refuse_legacy(keys, path: str) -> None:
    for key in keys:
        for pattern, layout in _LEGACY:
            if pattern.search(key):
                raise ValueError(
                    f"{path}: key {key!r} is in {layout}, which load_adapter does not read; load it with diffusers' "
                    "pipeline.load_lora_weights and re-save it with get_peft_model_state_dict + save_lora_weights"
                )


def _metadata(path: str, prefix: str) -> dict | None:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its {_METADATA_KEY!r} metadata is not JSON; the file is damaged") from None
    return {k.removeprefix(f"{prefix}."): v for k, v in meta.items() if k.startswith(f"{prefix}.")} or None


def _rank_as_alpha(per_path_ranks: dict[str, int]) -> dict:
    """diffusers' convention for a file without metadata: every module's alpha is its rank (scale 1)."""
    r = collections.Counter(per_path_ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(p): rank for p, rank in per_path_ranks.items() if rank != r}
    return {"r": r, "lora_alpha": r, "alpha_pattern": pattern}


def read_diffusers_lora(directory: str, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """``model``'s part of a diffusers LoRA file, as (adapter_config.json-like dict, PEFT-keyed tensors).

    Raises:
        ValueError: the file is in a pre-PEFT layout, holds no LoRA for ``model``'s component, or uses
            ``lora_bias`` (named in the message).
    """
    path = os.path.join(directory, DIFFUSERS_WEIGHTS_NAME)
    safe_io.verify(directory, required=(DIFFUSERS_WEIGHTS_NAME,))
    state = validate.read_adapter_tensors(path, directory)
    _refuse_legacy(state, path)
    prefix = component_prefix(model)
    mine = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if not mine:
        found = sorted({k.split(".", 1)[0] for k in state})
        raise ValueError(
            f"{path} holds LoRA for {found}, none for {prefix!r} (this {type(model).__name__}); "
            "load it into the component it was trained for"
        )
    config = _metadata(path, prefix)
    if config is None:
        ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in mine.items() if k.endswith(".lora_A.weight")}
        config = _rank_as_alpha(ranks)
        config["use_dora"] = any(k.endswith(".lora_magnitude_vector") for k in mine)
    config = {**config, "peft_type": "LORA"}
    validate.check_adapter_config(config, directory)
    if config.get("lora_bias") or any(k.endswith(".lora_B.bias") for k in mine):
        raise ValueError(f"{path} uses lora_bias=True, which load_adapter does not read; retrain without it")
    return config, {f"base_model.model.{k}": v for k, v in mine.items()}
