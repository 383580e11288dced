"""After training: rebuild a model with its adapter, measure perplexity, merge and save.

Used by ``qlora-kit eval`` / ``qlora-kit merge`` and by ``merge_adapter: true`` at the end of a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..recipe import Recipe, RecipeError, load_recipe


def load_run_recipe(run_dir: str | Path) -> Recipe:
    """The resolved recipe a run saved in ``<run_dir>/config.yaml``."""
    path = Path(run_dir).expanduser() / "config.yaml"
    if not path.is_file():
        raise RecipeError(f"{str(run_dir)!r} is not a run directory (no config.yaml); pass the output_dir of a run")
    return load_recipe(str(path))


def model_with_adapter(recipe: Recipe, adapter_dir: str | Path | None, *, quantized: bool = True):
    """The recipe's base model (quantized as in training unless ``quantized=False``) with the adapter in
    ``adapter_dir`` loaded (frozen); ``adapter_dir=None`` gives the base alone. In eval mode, on the CPU."""
    from ..api import quantize
    from ..data import build_tokenizer
    from ..lora import load_adapter
    from .build import compute_dtype, load_base, quant_config, vocab_for_builtin
    from .objectives import objective_class

    if adapter_dir is not None and recipe.lora.init in ("pissa", "loftq"):
        raise RecipeError(
            f"a lora.init={recipe.lora.init} adapter was trained on a base changed by its initialisation, so it "
            "does not apply to the original base; evaluate or merge runs trained with lora.init=default"
        )
    dtype = compute_dtype(recipe)
    vocab = None
    if objective_class(recipe.objective).language_model and recipe.tokenizer not in ("auto", "bytes"):
        vocab = vocab_for_builtin(recipe, build_tokenizer(recipe))
    bases = load_base(recipe, vocab_size=vocab, dtype=dtype)
    model = bases.get("model") or bases["generator"]
    qconfig = quant_config(recipe, dtype) if quantized else None
    if qconfig is not None:
        quantize(model, qconfig)
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise RecipeError(f"{str(adapter_dir)!r} holds no adapter_config.json; point at a saved adapter directory")
        try:
            load_adapter(model, adapter_dir, is_trainable=False)
        except ValueError as e:
            raise RecipeError(f"cannot load the adapter from {str(adapter_dir)!r}: {str(e).splitlines()[0]}") from None
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, split, batch_size: int, max_batches: int | None = None) -> dict:
    """Token-weighted mean next-token loss and perplexity of ``model`` over packed blocks ``split``: the blocks are
    the windows of :func:`qlora_kit.eval.perplexity.window_nll`, the scoring ``qlora-kit bench`` uses."""
    from ..eval.perplexity import window_nll

    device = next(model.parameters()).device
    n = len(split) if max_batches is None else min(len(split), max_batches * batch_size)
    total, count = 0.0, 0
    for lo in range(0, n, batch_size):
        nll, k = window_nll(model, split.get(list(range(lo, min(lo + batch_size, n)))).to(device))
        total, count = total + nll, count + k
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "sequences": n}


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper by its base layer (call after merging)."""
    from ..nn.lora_layers import LoraLayer

    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    for key in ("_lora_configs", "_lora_active", "_lora_merge_requantize"):
        model.__dict__.pop(key, None)
    return model


def merge_and_save(model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False):
    """Merge the active adapters into the base, drop the wrappers and save the model and its tokenizer (the
    built-in byte tokenizer as its Hugging Face equivalent). Returns (how it was saved, the MergeReport).

    Adapted quantized layers become float layers in their compute dtype (``merge_lora(requantize=False)``);
    when quantized layers remain (not adapted), the result is saved as ``save_quantized`` saves (plus
    config.json), else with the model's ``save_pretrained`` (safetensors) or as a safetensors state dict.
    Everything goes through one crash-safe directory save (``qlora_kit/safe_io.py``): ``directory`` must be
    new, empty or a previous save; ``overwrite=True`` replaces only the saved files and keeps the others.
    """
    from safetensors.torch import save_file

    from .. import safe_io
    from ..lora import merge_lora
    from ..nn.quantized import QuantizedLayer
    from ..serialization import write_quantized

    safe_io.check_target(Path(directory), "merge", overwrite)  # before the (slow) merge
    report = merge_lora(model, requantize=False)
    unwrap_lora(model)
    with safe_io.atomic_dir(directory, kind="merged", what="merge", overwrite=overwrite) as tmp:
        if any(isinstance(m, QuantizedLayer) for m in model.modules()):
            write_quantized(model, tmp)
            kind = "quantized: safetensors + quantization.json + config.json; load with qlora_kit.load_quantized"
            config = getattr(model, "config", None)
            if hasattr(config, "to_json_file"):
                config.to_json_file(str(tmp / "config.json"))
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(str(tmp), safe_serialization=True)
            kind = "transformers format: from_pretrained loads it"
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "model_info.json").write_text(json.dumps({"class": type(model).__name__}))
            kind = "safetensors state dict + model_info.json"
        if tokenizer is not None:
            from ..hf_tokenizer import save_tokenizer

            if save_tokenizer(tokenizer, tmp):
                kind += "; tokenizer beside it"
    return kind, report
