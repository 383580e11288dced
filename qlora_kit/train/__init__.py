"""Fine-tuning on accelerate: objectives (causal LM, diffusion, GAN), checkpoints, progress, export.

Entry point: :func:`finetune` (what ``qlora-kit finetune`` runs).

Example:
    >>> from qlora_kit.recipe import load_recipe
    >>> from qlora_kit.train import finetune
    >>> summary = finetune(load_recipe("quickstart", ["max_steps=20"]))
"""

from __future__ import annotations


def finetune(recipe, *, dry_run: bool = False) -> dict:
    """Run a recipe (see :func:`qlora_kit.train.loop.finetune`)."""
    from .loop import finetune as _finetune

    return _finetune(recipe, dry_run=dry_run)


__all__ = ["finetune"]
