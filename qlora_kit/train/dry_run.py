"""``qlora-kit finetune --dry-run``: the resolved config, parameter counts, trainable share, quantized size and
a rough peak-memory estimate, without loading weights of hub / local models or training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..recipe import BUILTIN_MODELS, Recipe, to_yaml
from .report import banner, fmt_bytes, fmt_count
from .summary import quant_desc


@dataclass
class _Sizes:
    """What the dry run adds up over the recipe's models."""

    total: int = 0
    trainable: int = 0
    qbytes: int = 0
    fbytes: int = 0
    qlayers: int = 0
    act: int = 0


def _bases(recipe: Recipe, dtype: torch.dtype, builtin: bool) -> dict[str, nn.Module]:
    """The recipe's base model(s): built-ins in full (they are tiny), others on the meta device."""
    from .build import load_base, vocab_for_builtin
    from .objectives import objective_class

    vocab = None
    if builtin and objective_class(recipe.objective).language_model and recipe.tokenizer not in ("auto", "bytes"):
        from ..data import build_tokenizer

        vocab = vocab_for_builtin(recipe, build_tokenizer(recipe))
    return load_base(recipe, dtype=dtype, meta=not builtin, vocab_size=vocab)


def _add_model(sizes: _Sizes, recipe: Recipe, role: str, model: nn.Module, objective, a: int, builtin: bool):
    """Add one model's parameter counts, weight bytes and activation estimate (adapters attached here)."""
    from .build import attach_lora, count_params, estimate_quantized_bytes, lora_config

    sizes.act += objective.dry_run_activation_bytes(model, role, a, builtin)
    q, f, n = estimate_quantized_bytes(model, recipe)
    full_d = role == "discriminator" and recipe.discriminator == "full"
    if full_d:
        whole = (
            q + f if recipe.quantization == "none" else sum(p.numel() * p.element_size() for p in model.parameters())
        )
        q, f, n = 0, whole, 0
    sizes.qbytes, sizes.fbytes, sizes.qlayers = sizes.qbytes + q, sizes.fbytes + f, sizes.qlayers + n
    t_all, _ = count_params(model)
    if full_d:
        t_train = t_all
    else:
        attach_lora(model, lora_config(recipe, model), recipe)
        _, t_train = count_params(model)
    sizes.total += t_all
    sizes.trainable += t_train


def dry_run_report(recipe: Recipe, checks=None) -> dict:
    """Print the resolved recipe and the dry run's figures (with the preflight's lines and notes).

    Args:
        recipe: the resolved recipe.
        checks: the :class:`~qlora_kit.train.preflight.PreflightResult` to show with the figures.

    Returns:
        The figures: {"dry_run", "params", "trainable", "quantized_bytes", "float_bytes", "quantized_layers",
        "peak_bytes"}.
    """
    from .build import compute_dtype, quant_config
    from .objectives import make_objective

    dtype = compute_dtype(recipe)
    quant_config(recipe, dtype)  # checks the format is available
    builtin = recipe.model in BUILTIN_MODELS
    objective = make_objective(recipe)
    a = torch.empty((), dtype=dtype).element_size()
    sizes = _Sizes()
    for role, model in _bases(recipe, dtype, builtin).items():
        if not builtin:
            model.to(dtype)
        _add_model(sizes, recipe, role, model, objective, a, builtin)
    optimizer_bytes = sizes.trainable * (4 + 4 + 8)  # fp32 adapter, its gradient, two AdamW moments
    weights = sizes.qbytes + sizes.fbytes
    peak = weights + optimizer_bytes + sizes.act
    print(to_yaml(recipe, header=f"resolved recipe ({recipe.output_dir})"), end="")
    total, trainable = sizes.total, sizes.trainable
    lines = [
        (
            "parameters",
            f"{total:,} ({fmt_count(total)}) · trainable {trainable:,} ({100 * trainable / max(total, 1):.3f}%)",
        ),
        (
            "quantized",
            f"{quant_desc(recipe)} · {sizes.qlayers} layers · weights {fmt_bytes(sizes.qbytes)} quantized + "
            f"{fmt_bytes(sizes.fbytes)} float = {fmt_bytes(weights)}",
        ),
        (
            "peak memory",
            f"~{fmt_bytes(peak)} per process (weights {fmt_bytes(weights)} + adapters and "
            f"AdamW {fmt_bytes(optimizer_bytes)} + activations ~{fmt_bytes(sizes.act)}; a rough estimate)",
        ),
    ] + (checks.lines if checks is not None else [])
    print(banner(lines, "dry run: nothing trained, nothing written"))
    for note in checks.notes if checks is not None else []:
        print(f"note: {note}")
    return {
        "dry_run": True,
        "params": total,
        "trainable": trainable,
        "quantized_bytes": sizes.qbytes,
        "float_bytes": sizes.fbytes,
        "quantized_layers": sizes.qlayers,
        "peak_bytes": peak,
    }
