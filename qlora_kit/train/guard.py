"""A non-finite loss never reaches the weights: the run stops (or, when the recipe opts in, skips the step).

The check runs after the backward pass and before the optimizer step, on the loss averaged over all
processes and on the clipped gradient norm (already global under DDP), so every process takes the same
decision. Under fp16 mixed precision the gradient scaler skips overflowing steps itself: only the loss
is checked there.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..recipe import RecipeError
from . import checkpoint


class NonFiniteLossError(RecipeError):
    """The loss (or the gradient norm) became NaN or Inf; nothing of that step was applied or saved."""


def _finite(x) -> bool:
    return x is None or math.isfinite(float(x))


def step_is_finite(run, role: str, step: int, loss: torch.Tensor, grad_norm) -> bool:
    """True when ``role``'s optimizer may step; False when the step is to be skipped (gradients dropped).

    Raises:
        NonFiniteLossError: the loss or gradient norm is not finite and the recipe does not skip such steps.
    """
    mean_loss = run.acc.reduce(loss.detach().float().reshape(1), "mean").item()
    scaler = getattr(run.acc, "scaler", None)
    norm_ok = scaler is not None or _finite(grad_norm)
    if math.isfinite(mean_loss) and norm_ok:
        return True
    what = f"the {'loss' if role != 'discriminator' else 'discriminator loss'} is {mean_loss}"
    if math.isfinite(mean_loss):
        what = f"the gradient norm is {float(grad_norm)}"
    if run.recipe.skip_nonfinite_steps:
        if scaler is not None:
            return True  # the scaler sees the non-finite gradients and skips the update itself
        run.optimizers[role].zero_grad(set_to_none=True)
        run.schedulers[role].step()  # the schedule follows the step count, skipped or not
        if run.acc.is_main_process:
            print(f"warning: step {step + 1}: {what}; skipped this {role} update (skip_nonfinite_steps=true)")
        return False
    last = checkpoint.latest(Path(run.recipe.output_dir).expanduser() / "checkpoints")
    kept = f"the last good checkpoint {last} is kept (resume=true continues from it)" if last else "no checkpoint"
    raise NonFiniteLossError(
        f"step {step + 1}: {what}, so the run stopped before applying it ({kept}; nothing else was saved); lower "
        "learning_rate or max_grad_norm, or set skip_nonfinite_steps=true to skip such steps"
    )
