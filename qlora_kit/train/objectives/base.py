"""What every objective shares: seeded per-step random draws, and the supervised step and evaluation.

Every random draw an objective makes (diffusion noise and timesteps, GAN latents) comes from a
generator seeded by (seed, step, micro-step) and is drawn for the *global* micro-batch, of which each
process takes its own slice. So the numbers do not depend on how many processes share the batch, and
a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import torch
from torch import nn

from ...recipe import BUILTIN_DATASETS, BUILTIN_MODELS, Recipe, RecipeError


def step_generator(seed: int, step: int, micro: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for (seed, step, micro-step); independent of the global RNG."""
    # modulo 2**64 (what manual_seed accepts): unchanged for every seed that fitted before, defined for all seeds
    return torch.Generator().manual_seed((((seed * 1_000_003 + step) * 1_009 + micro) * 31 + salt) % (1 << 64))


def global_randn(shape, g: torch.Generator, offset: int, n: int) -> torch.Tensor:
    """Rows [offset, offset + n) of a (global_rows, ...) standard normal draw."""
    return torch.randn(shape, generator=g)[offset : offset + n]


class Objective:
    """One training objective: its models, its step, its evaluation and its samples.

    The generic code (build, fit, loop, dry run, preflight) reads the class attributes and calls the
    methods; it never compares objective names. Subclasses set the attributes and override what differs
    from a supervised objective (one ``model``, a loss per micro-batch, a summed evaluation loss).
    """

    name: ClassVar[str]
    unit: ClassVar[str]  # what the throughput counts: "tokens" or "images"
    data_kind: ClassVar[str]  # what its dataset holds: "text" or "image"
    language_model: ClassVar[bool] = False  # tokenized text: tokenizer, position table, perplexity, `qlora-kit eval`
    supports_fsdp: ClassVar[bool] = False  # distributed=fsdp shards its model
    quantizes_on_load: ClassVar[bool] = False  # ``pretrained`` takes a qconfig and quantizes while reading
    supports_gradient_checkpointing: ClassVar[bool] = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    # ----- recipe and models ---------------------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """RecipeError when the recipe's built-in model or dataset does not suit this objective (subclasses
        add their own rules after these)."""
        kind = BUILTIN_MODELS.get(recipe.model)
        if kind is not None and kind != cls.name:
            fits = [m for m, k in BUILTIN_MODELS.items() if k == cls.name]
            raise RecipeError(
                f"model {recipe.model!r} is a {kind} model but objective is {cls.name!r}; "
                f"use one of {fits} or set objective={kind}"
            )
        data_kind = BUILTIN_DATASETS.get(recipe.dataset)
        if data_kind is not None and data_kind != cls.data_kind:
            fits = [d for d, k in BUILTIN_DATASETS.items() if k == cls.data_kind]
            raise RecipeError(
                f"dataset {recipe.dataset!r} holds {data_kind} but objective {cls.name!r} needs {cls.data_kind}; "
                f"use dataset={fits[0]} or a {cls.data_kind} dataset of your own"
            )

    @classmethod
    def builtin(cls, recipe: Recipe, vocab_size: int | None) -> dict[str, nn.Module]:
        """The float model(s) of a built-in model name (``recipe.model`` is one of this objective's)."""
        raise NotImplementedError

    @classmethod
    def pretrained(
        cls, recipe: Recipe, source: str, dtype: torch.dtype, meta: bool, qconfig=None
    ) -> dict[str, nn.Module]:
        """The model(s) from a local directory or hub id; ``meta``: without weights (config only); ``qconfig``:
        quantized while loading where the objective can (else None is passed and ``quantize`` runs after)."""
        raise RecipeError(f"objective={cls.name} trains built-in models only; set model to one of them")

    def activation_bytes(self, model: nn.Module, role: str, a: int) -> int:
        """Rough activation memory of one training step of ``model`` (``a`` bytes per element)."""
        raise NotImplementedError

    def dry_run_activation_bytes(self, model: nn.Module, role: str, a: int, builtin: bool) -> float:
        """The activation figure ``--dry-run`` prints (by default the same estimate as the memory check)."""
        return self.activation_bytes(model, role, a)

    # ----- training step -------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: torch.Tensor, g: torch.Generator, offset: int, global_n: int):
        """The micro-batch's loss; ``g`` draws for the global micro-batch, of which this is rows offset..."""
        raise NotImplementedError

    def train_step(self, run, step: int, idx: list[int]) -> dict:
        """One optimizer step over the global batch ``idx``: {"loss", "grad_norm"} (and extra losses)."""
        model, accum = run.wrapped["model"], run.recipe.grad_accum_steps
        total = torch.zeros((), device=run.device)
        for micro in range(accum):
            batch = run.micro_batch(idx, micro)
            g = step_generator(run.recipe.seed, step, micro)
            sync = contextlib.nullcontext() if micro == accum - 1 else run.acc.no_sync(model)
            with sync:
                with run.acc.autocast():
                    loss = self.loss(model, batch, g, run.rank * run.B, run.world * run.B)
                run.acc.backward(loss / accum)
            total += loss.detach().float()
        grad_norm = run.clip("model")
        from .. import guard

        if guard.step_is_finite(run, "model", step, total / accum, grad_norm):
            run.finish("model")
        return {"loss": total / accum, "grad_norm": grad_norm}

    # ----- evaluation and samples ----------------------------------------------------------------------
    def eval_sums(self, model: nn.Module, batch: torch.Tensor, g: torch.Generator, offset: int, global_n: int):
        """(summed loss, number of terms) of one evaluation batch."""
        raise NotImplementedError

    def eval_batches(self, run):
        """(batch, generator, weight) of every evaluation batch this process runs."""
        n_eval = min(len(run.data.eval), run.recipe.eval_batches * run.B * run.world)
        span = run.B * run.world
        for b in range(math.ceil(n_eval / span)):
            lo = b * span + run.rank * run.B
            indices = list(range(lo, min(lo + run.B, n_eval)))
            weight = 1.0
            if not indices:
                if not run.acc.is_fsdp2:
                    continue
                indices, weight = [0], 0.0  # FSDP2: every process runs every forward (its all-gathers)
            yield run.data.eval.get(indices).to(run.device), torch.Generator().manual_seed(10_000 + b), weight

    def evaluate(self, run) -> dict:
        """{"eval_loss": mean loss over the held-out batches} (models in eval mode meanwhile)."""
        sums = torch.zeros(2, dtype=torch.float64, device=run.device)
        span = run.B * run.world
        for batch, g, weight in self.eval_batches(run):
            with run.acc.autocast():
                s, n = self.eval_sums(run.models["model"], batch, g, run.rank * run.B, span)
            sums[0] += s.double() * weight
            sums[1] += n * weight
        sums = run.acc.reduce(sums, "sum")
        return {"eval_loss": float(sums[0]) / max(float(sums[1]), 1.0)}

    def eval_protocol(self, run) -> str:
        """What :meth:`evaluate` measures, for the banner and progress lines ("" when nothing to add)."""
        return ""

    makes_samples: ClassVar[bool] = False  # save_samples writes generated examples after training

    def save_samples(self, run, path) -> str | None:
        """Write generated samples to ``path`` after training; the path written, or None (nothing to show)."""
        return None

    def next_steps(self, out_dir) -> list[tuple[str, str]]:
        """Lines for the end-of-run summary: what the user can do with the run next."""
        return []
