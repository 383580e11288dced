"""Training objectives: causal language modelling, diffusion denoising (DDPM) and GAN.

A registry keyed by the recipe's ``objective`` name. Each class owns what differs between objectives:
building its model(s) (built-in or pretrained), its training step, its evaluation, its samples and its
activation-memory estimate (``base.py`` holds what they share). The generic code asks the class; a new
objective is one file here plus its entry in :data:`OBJECTIVES`.

Example:
    >>> objective = make_objective(recipe)  # CausalLM(recipe) for objective: causal_lm
    >>> out = objective.train_step(run, step, indices)
"""

from __future__ import annotations

from .base import Objective, global_randn, step_generator
from .causal_lm import CausalLM, lm_activation_bytes
from .diffusion import Diffusion
from .gan import GAN

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CausalLM, Diffusion, GAN)}


def objective_class(name: str) -> type[Objective]:
    """The objective class registered as ``name`` (KeyError for an unknown name; recipes check it first)."""
    return OBJECTIVES[name]


def make_objective(recipe) -> Objective:
    """The recipe's objective, ready to train (the diffusion objective builds its noise scheduler)."""
    return objective_class(recipe.objective)(recipe)


__all__ = [
    "GAN",
    "OBJECTIVES",
    "CausalLM",
    "Diffusion",
    "Objective",
    "global_randn",
    "lm_activation_bytes",
    "make_objective",
    "objective_class",
    "step_generator",
]
