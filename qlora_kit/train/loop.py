"""The fine-tuning loop: setup, train, save.

``finetune(recipe)`` runs a recipe end to end on accelerate (one process, or several under
``accelerate launch``): build the quantized model with adapters, then for each optimizer step take the
step's global batch from a seeded per-epoch permutation (each process takes its slice of every
micro-batch), accumulate gradients, clip, step, log, evaluate and checkpoint. Because the data order and
every random draw of the objectives depend only on (seed, step), a run resumed from a checkpoint
reproduces the uninterrupted run's losses, and N processes reproduce one process with the same global
batch.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..recipe import Recipe, RecipeError, save_resolved, to_yaml
from . import checkpoint, fsdp, guard, resume
from . import lock as run_lock
from .report import Metrics, Progress, peak_memory
from .summary import compact_yaml, run_banner, run_summary

_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "adapter")


class EpochSampler:
    """Global batches of example indices: a fresh seeded permutation per epoch, the tail dropped."""

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.steps_per_epoch = n // global_batch
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> tuple[int, list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return epoch, self._perm[k * self.global_batch : (k + 1) * self.global_batch].tolist()


def lr_lambda(recipe: Recipe, total_steps: int):
    """Linear warmup to the peak, then cosine / linear decay to zero, or constant."""
    warmup = recipe.warmup_steps

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if recipe.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if recipe.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def make_optimizer(params: list[nn.Parameter], lr: float, recipe: Recipe) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, description). ``adamw`` is torch's fused AdamW where the device supports it."""
    kwargs = dict(lr=lr, weight_decay=recipe.weight_decay, betas=(recipe.adam_beta1, recipe.adam_beta2))
    if recipe.optimizer.startswith("paged_"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RecipeError(
                f"optimizer={recipe.optimizer} needs bitsandbytes; pip install bitsandbytes, or use adamw"
            ) from None
        if not all(p.is_cuda for p in params):
            raise RecipeError(f"optimizer={recipe.optimizer} pages optimizer state on a CUDA GPU; use adamw on the CPU")
        cls = bnb.optim.PagedAdamW8bit if recipe.optimizer.endswith("8bit") else bnb.optim.PagedAdamW32bit
        return cls(params, **kwargs), recipe.optimizer
    if recipe.optimizer == "adamw":
        try:  # fused kernels: CUDA, and CPU since torch 2.4
            return torch.optim.AdamW(params, fused=True, **kwargs), "adamw (fused)"
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, foreach=False, **kwargs), "adamw"


def _mixed_precision(recipe: Recipe) -> str:
    if recipe.mixed_precision != "auto":
        return recipe.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if fsdp.wanted(recipe):
        return fsdp.accelerator(recipe, _mixed_precision(recipe))
    if not distributed:
        AcceleratorState._reset_state(reset_partial_state=True)  # several runs in one process (tests, notebooks)
    # several processes without CUDA (torchrun / accelerate launch on CPUs): data parallel over gloo
    cpu = distributed and not torch.cuda.is_available()
    return Accelerator(mixed_precision=_mixed_precision(recipe), cpu=cpu)


def _holds_run(out_dir: Path) -> bool:
    return out_dir.is_dir() and any((out_dir / m).exists() for m in _RUN_MARKERS)


def _preflight(recipe: Recipe, out_dir: Path, dry_run: bool) -> Path | None:
    """Checks that need no model or data; returns the checkpoint to resume from. Leaves nothing written."""
    from ..data import check_data_paths
    from .build import check_model_path

    check_data_paths(recipe)
    check_model_path(recipe)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"output_dir {str(out_dir)!r} is a file; set output_dir to a directory path")
    _check_writable(out_dir, probe=not dry_run)  # the dry run writes nothing, not even a probe
    if recipe.resume:
        found = next((p for _, p in resume.candidates(out_dir / "checkpoints")), None)  # checked after the build
        if found is None:
            raise RecipeError(
                f"resume=true but {str(out_dir)!r} holds no checkpoint; drop resume=true to start a fresh run"
            )
        return found
    if _holds_run(out_dir) and not recipe.overwrite:
        raise RecipeError(
            f"output_dir {str(out_dir)!r} already holds a run; pass resume=true to continue it, "
            "overwrite=true to start over, or another output_dir"
        )
    return None


def _check_writable(out_dir: Path, probe: bool = True) -> None:
    """RecipeError unless ``out_dir`` exists writable or its nearest existing parent lets us create it.

    ``os.access`` first; then (as root it says yes even for /proc) a probe directory made and removed at
    once in that parent, so nothing is left behind.
    """
    import tempfile

    target = Path(os.path.abspath(out_dir))
    parent = target
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    what = "output_dir" if parent == target else f"output_dir {str(out_dir)!r} cannot be created:"
    fix = "set output_dir to a directory you can write to"
    if not parent.is_dir():
        raise RecipeError(f"{what} {str(parent)!r} is a file, not a directory; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RecipeError(f"{what} {str(parent)!r} is not writable (permission denied); {fix}")
    if not probe:
        return
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qlora-kit-probe-", dir=parent))
    except OSError as e:
        raise RecipeError(f"{what} {str(parent)!r} is not writable ({e.strerror or e}); {fix}") from None


class _Run:
    """State of one training run (kept in one object so the loop reads top to bottom). The objective
    (``obj``) runs the steps and evaluations through :meth:`micro_batch`, :meth:`clip` and :meth:`finish`."""

    def __init__(self, recipe: Recipe, accelerator, built, data, objective):
        self.recipe, self.acc, self.built, self.data, self.obj = recipe, accelerator, built, data, objective
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.device = accelerator.device
        self.B = recipe.batch_size
        self.global_batch = self.B * recipe.grad_accum_steps * self.world
        if len(data.train) < self.global_batch:
            raise RecipeError(
                f"the training data has {len(data.train)} examples, fewer than one global batch of {self.global_batch}"
                f" (batch_size x grad_accum_steps x processes); lower batch_size or add data"
            )
        self.sampler = EpochSampler(len(data.train), self.global_batch, recipe.seed)
        self.max_steps = recipe.max_steps or recipe.epochs * self.sampler.steps_per_epoch
        self.models = built.models  # unwrapped
        self.roles = list(self.models)
        self.optimizers, self.schedulers, self.opt_desc = {}, {}, ""
        for role, model in self.models.items():
            params = [p for p in model.parameters() if p.requires_grad]
            lr = recipe.d_learning_rate if role == "discriminator" and recipe.d_learning_rate else recipe.learning_rate
            opt, self.opt_desc = make_optimizer(params, lr, recipe)
            self.schedulers[role] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe, self.max_steps))
            self.optimizers[role] = opt
        if accelerator.is_fsdp2:  # FSDP2 prepares a model together with its optimizer (train/fsdp.py)
            pairs = {role: accelerator.prepare(m, self.optimizers[role]) for role, m in self.models.items()}
            self.wrapped = {role: m for role, (m, _) in pairs.items()}
            self.optimizers = {role: o for role, (_, o) in pairs.items()}
        else:
            self.wrapped = {role: accelerator.prepare_model(m) for role, m in self.models.items()}
            self.optimizers = {role: accelerator.prepare_optimizer(o) for role, o in self.optimizers.items()}
        self.params = {role: [p for p in m.parameters() if p.requires_grad] for role, m in self.models.items()}

    # ----- one optimizer step ----------------------------------------------------------------------------
    def micro_batch(self, idx: list[int], micro: int) -> torch.Tensor:
        """This process's slice of micro-step ``micro`` of the global batch ``idx``, on the device."""
        lo = (micro * self.world + self.rank) * self.B
        return self.data.train.get(idx[lo : lo + self.B]).to(self.device)

    def clip(self, role: str) -> float:
        """Clip the role's gradients to max_grad_norm; returns their norm before clipping."""
        limit = self.recipe.max_grad_norm if self.recipe.max_grad_norm is not None else float("inf")
        norm = self.acc.clip_grad_norm_(self.params[role], limit)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        return float(norm) if norm is not None else float("nan")

    def finish(self, role: str) -> None:
        """Optimizer and scheduler step for the role, gradients cleared."""
        self.optimizers[role].step()
        self.schedulers[role].step()
        self.optimizers[role].zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The objective's evaluation on the held-out data ({} without any), models in eval mode meanwhile."""
        if self.data.eval is None:
            return {}
        for m in self.models.values():
            m.eval()
        out = self.obj.evaluate(self)
        for m in self.models.values():
            m.train()
        return out

    # ----- saving ----------------------------------------------------------------------------------------
    def save_adapters(self, directory: Path) -> None:
        """Each role's adapter (or, for a fully trained discriminator, its weights) into ``directory``."""
        from safetensors.torch import save_file

        from ..lora import save_adapter

        for role, model in self.models.items():
            if role == "discriminator" and self.recipe.discriminator == "full":
                state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(state, str(directory / "discriminator.safetensors"))
            else:
                name = "adapter" if role in ("model", "generator") else "discriminator_adapter"
                # PiSSA / LoftQ rewrite the base: qlora-kit eval / merge rebuild that same base from the recipe,
                # so the adapter is saved as trained (save_adapter's conversion targets the untouched base)
                as_trained = self.recipe.lora.init in ("pissa", "loftq")
                save_adapter(model, directory / name, as_trained=as_trained, overwrite=True)  # keeps user files


def _say(accelerator, text: str = "") -> None:
    if accelerator.is_main_process:
        print(text, flush=True)


@run_lock.releases_locks
def finetune(recipe: Recipe, *, dry_run: bool = False) -> dict:
    """Run a recipe: setup, train, save. Returns a summary (losses per step, last evaluation, paths).

    Raises:
        RecipeError: a user mistake found before anything was written (bad paths, a model that does not
            load, too little data, an output_dir holding another run, ...).
    """
    from .preflight import preflight

    out_dir = Path(recipe.output_dir).expanduser()
    # names, seq_len vs positions, data columns, one example: checked before anything is written
    checks = preflight(recipe, dry_run=dry_run)
    resume_from = _preflight(recipe, out_dir, dry_run)
    if dry_run:
        from .dry_run import dry_run_report

        return dry_run_report(recipe, checks)
    run, tokenizer = _start(recipe)
    resume_from, start_step = _resume(run, out_dir, resume_from)
    # ----- from here on the run writes to output_dir ----------------------------------------------------
    metrics = _claim_output(run, out_dir, resume_from, start_step)
    _say(run.acc, f"resolved config (saved as {out_dir / 'config.yaml'}):\n{compact_yaml(recipe)}")
    _say(run.acc, run_banner(recipe, run, run.built, run.data, resume_from, start_step))
    for note in checks.notes:
        _say(run.acc, f"note: {note}")
    trained = _train(run, metrics, start_step, out_dir)
    return _wrap_up(run, trained, out_dir, tokenizer, start_step)


def _start(recipe: Recipe) -> tuple[_Run, object]:
    """(the run with its model(s) built, data loaded and optimizers made, the tokenizer)."""
    from ..data import build_tokenizer, load_data
    from .build import build, vocab_for_builtin
    from .fit import check_fits
    from .objectives import make_objective

    if recipe.cpu_threads is not None:
        torch.set_num_threads(recipe.cpu_threads)
    accelerator = _accelerator(recipe)
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    tokenizer = build_tokenizer(recipe)
    data = load_data(recipe, tokenizer)
    check_fits(recipe, accelerator.device, vocab_for_builtin(recipe, tokenizer))  # rank and memory, before allocating
    # FSDP2: the quantized base is built in CPU memory and fully_shard moves only this process's shard to its
    # device, so no GPU ever holds the whole packed model (with quantize-on-load no process holds it in float)
    device = torch.device("cpu") if accelerator.is_fsdp2 else accelerator.device
    built = build(recipe, device=device, vocab_size=vocab_for_builtin(recipe, tokenizer))
    return _Run(recipe, accelerator, built, data, make_objective(recipe)), tokenizer


def _resume(run: _Run, out_dir: Path, resume_from: Path | None) -> tuple[Path | None, int]:
    """(checkpoint restored, its step): every file checked before anything is restored; damage: fall back."""
    if resume_from is None:
        return None, 0
    accelerator = run.acc
    with fsdp.full_state(run.models, run.optimizers, saving=False) as optimizers:
        resume_from, state = resume.load_newest_intact(
            out_dir / "checkpoints", accelerator.process_index, run.models, optimizers, run.schedulers,
            run.max_steps, lambda text: _say(accelerator, text),
        )  # fmt: skip
    if state.get("data_fingerprint") != run.data.fingerprint:
        _say(accelerator, "warning: the training data changed since the checkpoint; resuming anyway")
    changed = _changed_keys(state.get("recipe"), run.recipe)
    if changed:
        _say(accelerator, f"warning: resuming with different {', '.join(changed)} than the checkpoint's run")
    return resume_from, state["step"]


def _claim_output(run: _Run, out_dir: Path, resume_from: Path | None, start_step: int) -> Metrics:
    """Lock output_dir (main process), clear an overwritten run, save config.yaml; the metrics writer."""
    recipe, accelerator = run.recipe, run.acc
    if accelerator.is_main_process:
        run_lock.acquire(out_dir, say=print)  # held until finetune returns; a second run is refused
        if resume_from is None and not recipe.overwrite and _holds_run(out_dir):  # written since the preflight
            raise RecipeError(f"output_dir {str(out_dir)!r} now holds another run; pass overwrite=true or another")
        run_lock.remove_stale_tmp(out_dir, say=print)
        if recipe.overwrite and resume_from is None:
            for marker in ("checkpoints", "adapter", "discriminator_adapter", "merged"):
                shutil.rmtree(out_dir / marker, ignore_errors=True)
        save_resolved(recipe, out_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return Metrics(  # metrics.jsonl is rewritten on the first new line only: after the run proved it starts
        out_dir / "metrics.jsonl" if accelerator.is_main_process else None,
        start_step if resume_from is not None else None,
    )


@dataclass
class _Trained:
    """What the step loop leaves for the summary."""

    losses: dict[int, float]
    last_eval: dict
    stop_at: int
    elapsed: float
    units_done: int


def _train(run: _Run, metrics: Metrics, start_step: int, out_dir: Path) -> _Trained:
    """The optimizer steps from ``start_step``: log, evaluate and checkpoint as the recipe asks."""
    recipe, accelerator, objective = run.recipe, run.acc, run.obj
    progress = Progress(run.max_steps, start_step, recipe.progress_bar and accelerator.is_main_process, objective.unit)
    losses: dict[int, float] = {}
    last_eval: dict = {}
    stop_at = min(run.max_steps, recipe.stop_after_steps or run.max_steps)
    t_start = time.perf_counter()
    units_done, rate = 0, 0.0
    for step in range(start_step, stop_at):
        epoch, idx = run.sampler.batch(step)
        lr = run.schedulers[run.roles[0]].get_last_lr()[0]
        t0 = time.perf_counter()
        out = objective.train_step(run, step, idx)
        guard.check_params(run, step)  # an update that overflowed the weights stops the run before any save
        loss = accelerator.reduce(out["loss"].reshape(1), "mean").item()
        dt = time.perf_counter() - t0
        units = _units(objective, recipe, run)
        units_done += units
        rate = units / dt if rate == 0.0 else 0.8 * rate + 0.2 * units / dt
        losses[step + 1] = loss
        mem_label, mem_mb = peak_memory(run.device)
        done = step + 1
        info = {"epoch": epoch + 1, "loss": loss, "lr": lr, "rate": rate, "mem_label": mem_label, "mem_mb": mem_mb}
        if done % recipe.log_every == 0 or done == stop_at:
            metrics.write(_record(run, out, done, loss, lr, rate, mem_mb, time.perf_counter() - t_start))
        progress.update(done, info)
        if (recipe.eval_every and done % recipe.eval_every == 0) or done == run.max_steps:
            last_eval = run.evaluate()
            if last_eval:
                metrics.write({"step": done, **last_eval})
                scores = " · ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items())
                progress.write(f"eval @ step {done}: {scores}{objective.eval_protocol(run)}")
        stopping = done == stop_at and stop_at < run.max_steps
        if (recipe.save_every and done % recipe.save_every == 0 and done < run.max_steps) or stopping:
            progress.write(f"checkpoint @ step {done}: {_checkpoint(run, out_dir, done, epoch, step)}")
    progress.close()
    return _Trained(losses, last_eval, stop_at, time.perf_counter() - t_start, units_done)


def _record(run: _Run, out: dict, done: int, loss: float, lr: float, rate: float, mem_mb: float, elapsed: float):
    """One metrics.jsonl line for step ``done``."""
    record = {
        "step": done,
        "epoch": round(done / run.sampler.steps_per_epoch, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": out["grad_norm"],
        f"{run.obj.unit}_per_s": round(rate, 2),
        "peak_mem_mb": round(mem_mb, 1),
        "elapsed_s": round(elapsed, 3),
    }
    if "d_loss" in out:
        record["d_loss"] = run.acc.reduce(out["d_loss"].reshape(1), "mean").item()
    return record


def _checkpoint(run: _Run, out_dir: Path, done: int, epoch: int, step: int) -> Path:
    """Save a resumable checkpoint after step ``done``; returns its path."""
    state = {
        "epoch": epoch,
        "samples_seen": done * run.global_batch,
        "data_position": {"epoch": epoch, "batch_in_epoch": step % run.sampler.steps_per_epoch + 1},
        "data_fingerprint": run.data.fingerprint,
        "recipe": to_yaml(run.recipe),
    }
    with fsdp.full_state(run.models, run.optimizers, saving=True) as optimizers:
        return checkpoint.save(
            run.acc,
            out_dir / "checkpoints",
            done,
            run.models,
            optimizers,
            run.schedulers,
            state,
            run.recipe.keep_checkpoints,
            run.save_adapters,
        )


def _wrap_up(run: _Run, trained: _Trained, out_dir: Path, tokenizer, start_step: int) -> dict:
    """Save the adapters (and samples, a merged export) unless stopped early; print the summary."""
    recipe, accelerator = run.recipe, run.acc
    summary = {
        "losses": trained.losses,
        "eval": trained.last_eval,
        "steps": trained.stop_at,
        "output_dir": str(out_dir),
        "elapsed_s": trained.elapsed,
        "data_fingerprint": run.data.fingerprint,
        "world_size": run.world,
        "local_bytes": fsdp.local_bytes(run.models[run.roles[0]]),  # this process's (shards of) parameters
    }
    if trained.stop_at < run.max_steps:
        _say(
            accelerator,
            f"stopped after step {trained.stop_at} of {run.max_steps} (stop_after_steps); continue with: "
            f"qlora-kit finetune {out_dir / 'config.yaml'} resume=true stop_after_steps=null",
        )
        return summary
    with fsdp.full_state(run.models, {}, saving=True):
        if accelerator.is_main_process:
            run.save_adapters(out_dir)
    if accelerator.is_main_process:
        if run.obj.makes_samples:
            summary["samples"] = run.obj.save_samples(run, out_dir / "samples.png")
        if recipe.merge_adapter:
            _export_merged(run, out_dir / "merged", tokenizer)
    accelerator.wait_for_everyone()
    t = trained
    _say(accelerator, run_summary(recipe, run, t.losses, t.last_eval, t.elapsed, t.units_done, start_step, out_dir))
    return summary


_RUN_ONLY_KEYS = {"resume", "overwrite", "stop_after_steps", "output_dir", "progress_bar", "log_every", "eval_every",
                  "save_every", "keep_checkpoints", "eval_batches", "description", "merge_adapter"}  # fmt: skip


def _changed_keys(saved_yaml: str | None, recipe: Recipe) -> list[str]:
    """Training-relevant recipe keys that differ from the checkpoint's (for a warning on resume)."""
    import yaml

    from ..recipe import to_dict

    if not saved_yaml:
        return []
    try:
        saved = yaml.safe_load(saved_yaml) or {}
    except yaml.YAMLError:
        return []
    if not isinstance(saved, dict):
        return []
    now = to_dict(recipe)
    return sorted(k for k in now if k not in _RUN_ONLY_KEYS and k in saved and saved[k] != now[k])


def _units(objective, recipe: Recipe, run: _Run) -> int:
    """Tokens (or images) one optimizer step processes over all processes."""
    per_example = recipe.seq_len if objective.unit == "tokens" else 1
    return run.global_batch * per_example


def _export_merged(run: _Run, directory: Path, tokenizer=None) -> None:
    from .export import merge_and_save

    merge_and_save(run.models.get("model") or run.models["generator"], directory, tokenizer, overwrite=True)
