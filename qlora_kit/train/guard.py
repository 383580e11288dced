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


def _kept(run) -> str:
    last = checkpoint.latest(Path(run.recipe.output_dir).expanduser() / "checkpoints")
    return f"the last good checkpoint {last} is kept (resume=true continues from it)" if last else "no checkpoint"


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
    kept = _kept(run)
    raise NonFiniteLossError(
        f"step {step + 1}: {what}, so the run stopped before applying it and saved nothing ({kept}); lower "
        "learning_rate or max_grad_norm, or set skip_nonfinite_steps=true to skip such steps"
    )


def check_params(run, step: int) -> None:
    """After the update: an optimizer step that made a trainable parameter NaN / Inf (a huge learning rate)
    cannot be skipped any more, so the run stops before anything of it is saved.

    Raises:
        NonFiniteLossError: naming the first such parameter.
    """
    bad = next(
        (f"{role}.{n}" for role, m in run.models.items() for n, p in m.named_parameters()
         if p.requires_grad and not torch.isfinite(p).all()),
        None,
    )  # fmt: skip
    flag = torch.tensor([0.0 if bad is None else 1.0], device=run.device)
    if run.acc.reduce(flag, "sum").item() == 0:
        return
    kept = _kept(run)
    raise NonFiniteLossError(
        f"step {step + 1}: the update made {bad or 'a trainable parameter'} NaN/Inf, so the run stopped without saving "
        f"it ({kept}); lower learning_rate"
    )
