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

import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..recipe import Recipe, RecipeError, save_resolved, to_yaml
from . import checkpoint, fsdp, guard, resume
from . import lock as run_lock
from .report import Metrics, Progress, banner, fmt_bytes, fmt_count, fmt_rate, peak_memory

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
    """State of one training run (kept in one object so the loop reads top to bottom)."""

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
    def _micro_batch(self, idx: list[int], micro: int) -> torch.Tensor:
        lo = (micro * self.world + self.rank) * self.B
        return self.data.train.get(idx[lo : lo + self.B]).to(self.device)

    def _clip(self, role: str) -> float:
        limit = self.recipe.max_grad_norm if self.recipe.max_grad_norm is not None else float("inf")
        norm = self.acc.clip_grad_norm_(self.params[role], limit)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        return float(norm) if norm is not None else float("nan")

    def _finish(self, role: str) -> None:
        self.optimizers[role].step()
        self.schedulers[role].step()
        self.optimizers[role].zero_grad(set_to_none=True)

    def step_supervised(self, step: int, idx: list[int]) -> dict:
        model, accum = self.wrapped["model"], self.recipe.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = self._micro_batch(idx, micro)
            g = _step_gen(self.recipe.seed, step, micro)
            sync = contextlib.nullcontext() if micro == accum - 1 else self.acc.no_sync(model)
            with sync:
                with self.acc.autocast():
                    loss = self.obj.loss(model, batch, g, self.rank * self.B, self.world * self.B)
                self.acc.backward(loss / accum)
            total += loss.detach().float()
        grad_norm = self._clip("model")
        if guard.step_is_finite(self, "model", step, total / accum, grad_norm):
            self._finish("model")
        return {"loss": total / accum, "grad_norm": grad_norm}

    def step_gan(self, step: int, idx: list[int]) -> dict:
        gen, disc = self.wrapped["generator"], self.wrapped["discriminator"]
        real = self._micro_batch(idx, 0)
        g = _step_gen(self.recipe.seed, step, 0)
        z = self.obj.latents(g, self.rank * self.B, self.B, self.world * self.B, self.device)
        with self.acc.autocast():
            fake = gen(z)
            out = disc(torch.cat([real, fake.detach().to(real.dtype)]))
            d_loss = self.obj.d_loss(out[: len(real)], out[len(real) :])
        self.acc.backward(d_loss)
        if guard.step_is_finite(self, "discriminator", step, d_loss, self._clip("discriminator")):
            self._finish("discriminator")
        with self.acc.autocast():  # the unwrapped D: its gradients are not wanted (and DDP must not wait for them)
            g_loss = self.obj.g_loss(self.models["discriminator"](fake))
        self.acc.backward(g_loss, inputs=self.params["generator"])
        grad_norm = self._clip("generator")
        if guard.step_is_finite(self, "generator", step, g_loss, grad_norm):
            self._finish("generator")
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        return {"loss": g_loss.detach().float(), "d_loss": d_loss.detach().float(), "grad_norm": grad_norm}

    # ----- evaluation ------------------------------------------------------------------------------------
    def eval_protocol(self) -> str:
        """What evaluate() measures (``qlora-kit eval`` measures the same first sequences by default)."""
        if self.data.eval is None or self.recipe.objective != "causal_lm":
            return ""
        n = min(len(self.data.eval), self.recipe.eval_batches * self.B * self.world)
        return f" (first {n} held-out sequences x {self.recipe.seq_len} tokens)"

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.data.eval is None:
            return {}
        for m in self.models.values():
            m.eval()
        n_eval = min(len(self.data.eval), self.recipe.eval_batches * self.B * self.world)
        span = self.B * self.world
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        gan_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in range(math.ceil(n_eval / span)):
            lo = b * span + self.rank * self.B
            indices = list(range(lo, min(lo + self.B, n_eval)))
            weight = 1.0
            if not indices:
                if not self.acc.is_fsdp2:
                    continue
                indices, weight = [0], 0.0  # FSDP2: every process runs every forward (its all-gathers)
            batch = self.data.eval.get(indices).to(self.device)
            g = torch.Generator().manual_seed(10_000 + b)
            with self.acc.autocast():
                if self.recipe.objective == "gan":
                    z = self.obj.latents(g, self.rank * self.B, len(indices), span, self.device)
                    fake = self.models["generator"](z)
                    out = self.models["discriminator"](torch.cat([batch, fake.to(batch.dtype)])).float()
                    n = len(indices)
                    gan_sums[0] += self.obj.d_loss(out[:n], out[n:]).double() * n
                    gan_sums[1] += self.obj.g_loss(out[n:]).double() * n
                    sums[1] += n
                else:
                    s, n = self.obj.eval_sums(self.models["model"], batch, g, self.rank * self.B, span)
                    sums[0] += s.double() * weight
                    sums[1] += n * weight
        sums, gan_sums = self.acc.reduce(sums, "sum"), self.acc.reduce(gan_sums, "sum")
        for m in self.models.values():
            m.train()
        count = max(float(sums[1]), 1.0)
        if self.recipe.objective == "gan":
            return {"eval_d_loss": float(gan_sums[0]) / count, "eval_g_loss": float(gan_sums[1]) / count}
        loss = float(sums[0]) / count
        out = {"eval_loss": loss}
        if self.recipe.objective == "causal_lm":
            out["eval_ppl"] = math.exp(min(loss, 50.0))
        return out

    # ----- saving ----------------------------------------------------------------------------------------
    def save_adapters(self, directory: Path) -> None:
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


def _step_gen(seed: int, step: int, micro: int) -> torch.Generator:
    from .objectives import step_generator

    return step_generator(seed, step, micro)


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
    from ..data import build_tokenizer, load_data
    from .build import build, vocab_for_builtin
    from .fit import check_fits
    from .objectives import make_objective
    from .preflight import preflight

    out_dir = Path(recipe.output_dir).expanduser()
    # names, seq_len vs positions, data columns, one example: checked before anything is written
    checks = preflight(recipe, dry_run=dry_run)
    resume_from = _preflight(recipe, out_dir, dry_run)
    if dry_run:
        return dry_run_report(recipe, checks)
    if recipe.cpu_threads is not None:
        torch.set_num_threads(recipe.cpu_threads)
    accelerator = _accelerator(recipe)
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    tokenizer = build_tokenizer(recipe)
    data = load_data(recipe, tokenizer)
    check_fits(recipe, accelerator.device, vocab_for_builtin(recipe, tokenizer))  # rank and memory, before allocating
    built = build(recipe, device=accelerator.device, vocab_size=vocab_for_builtin(recipe, tokenizer))
    objective = make_objective(recipe)
    run = _Run(recipe, accelerator, built, data, objective)
    start_step, state = 0, {}
    if resume_from is not None:  # every file checked before anything is restored or written; damage: fall back
        with fsdp.full_state(run.models, run.optimizers, saving=False) as optimizers:
            resume_from, state = resume.load_newest_intact(
                out_dir / "checkpoints", accelerator.process_index, run.models, optimizers, run.schedulers,
                run.max_steps, lambda text: _say(accelerator, text),
            )  # fmt: skip
        start_step = state["step"]
        if state.get("data_fingerprint") != data.fingerprint:
            _say(accelerator, "warning: the training data changed since the checkpoint; resuming anyway")
        changed = _changed_keys(state.get("recipe"), recipe)
        if changed:
            _say(accelerator, f"warning: resuming with different {', '.join(changed)} than the checkpoint's run")

    # ----- from here on the run writes to output_dir ----------------------------------------------------
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
    metrics = Metrics(  # metrics.jsonl is rewritten on the first new line only: after the run proved it starts
        out_dir / "metrics.jsonl" if accelerator.is_main_process else None,
        start_step if resume_from is not None else None,
    )

    _say(accelerator, f"resolved config (saved as {out_dir / 'config.yaml'}):\n{compact_yaml(recipe)}")
    _say(accelerator, _banner(recipe, run, built, data, resume_from, start_step))
    for note in checks.notes:
        _say(accelerator, f"note: {note}")
    progress = Progress(run.max_steps, start_step, recipe.progress_bar and accelerator.is_main_process, objective.unit)
    losses: dict[int, float] = {}
    last_eval: dict = {}
    stop_at = min(run.max_steps, recipe.stop_after_steps or run.max_steps)
    t_start = time.perf_counter()
    units_done = 0
    rate = 0.0
    step = start_step
    for step in range(start_step, stop_at):
        epoch, idx = run.sampler.batch(step)
        lr = run.schedulers[run.roles[0]].get_last_lr()[0]
        t0 = time.perf_counter()
        out = run.step_gan(step, idx) if recipe.objective == "gan" else run.step_supervised(step, idx)
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
            record = {
                "step": done,
                "epoch": round(done / run.sampler.steps_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": out["grad_norm"],
                f"{objective.unit}_per_s": round(rate, 2),
                "peak_mem_mb": round(mem_mb, 1),
                "elapsed_s": round(time.perf_counter() - t_start, 3),
            }
            if "d_loss" in out:
                record["d_loss"] = accelerator.reduce(out["d_loss"].reshape(1), "mean").item()
            metrics.write(record)
        progress.update(done, info)
        if (recipe.eval_every and done % recipe.eval_every == 0) or done == run.max_steps:
            last_eval = run.evaluate()
            if last_eval:
                metrics.write({"step": done, **last_eval})
                scores = " · ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items())
                progress.write(f"eval @ step {done}: {scores}{run.eval_protocol()}")
        stopping = done == stop_at and stop_at < run.max_steps
        if (recipe.save_every and done % recipe.save_every == 0 and done < run.max_steps) or stopping:
            state = {
                "epoch": epoch,
                "samples_seen": done * run.global_batch,
                "data_position": {"epoch": epoch, "batch_in_epoch": step % run.sampler.steps_per_epoch + 1},
                "data_fingerprint": data.fingerprint,
                "recipe": to_yaml(recipe),
            }
            with fsdp.full_state(run.models, run.optimizers, saving=True) as optimizers:
                path = checkpoint.save(
                    accelerator,
                    out_dir / "checkpoints",
                    done,
                    run.models,
                    optimizers,
                    run.schedulers,
                    state,
                    recipe.keep_checkpoints,
                    run.save_adapters,
                )
            progress.write(f"checkpoint @ step {done}: {path}")
    progress.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "losses": losses,
        "eval": last_eval,
        "steps": stop_at,
        "output_dir": str(out_dir),
        "elapsed_s": elapsed,
        "data_fingerprint": data.fingerprint,
        "world_size": run.world,
        "local_bytes": fsdp.local_bytes(run.models[run.roles[0]]),  # this process's (shards of) parameters
    }
    if stop_at < run.max_steps:
        _say(
            accelerator,
            f"stopped after step {stop_at} of {run.max_steps} (stop_after_steps); continue with: "
            f"qlora-kit finetune {out_dir / 'config.yaml'} resume=true stop_after_steps=null",
        )
        return summary
    with fsdp.full_state(run.models, {}, saving=True):
        if accelerator.is_main_process:
            run.save_adapters(out_dir)
    if accelerator.is_main_process:
        if recipe.objective != "causal_lm":
            summary["samples"] = _save_samples(recipe, run, out_dir / "samples.png")
        if recipe.merge_adapter:
            _export_merged(recipe, run, out_dir / "merged", tokenizer)
    accelerator.wait_for_everyone()
    _say(accelerator, _summary(recipe, run, losses, last_eval, elapsed, units_done, start_step, out_dir))
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


def compact_yaml(recipe: Recipe, width: int = 110) -> str:
    """The resolved recipe as ``key: value`` pairs (dotted for ``lora.*``), a few per line, wrapped near ``width``
    columns; the description is left out (the banner shows it). config.yaml holds the same values as YAML."""
    import yaml

    from ..recipe import to_dict

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif k != "description":
                text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
                yield f"{prefix}{k}: {text.removesuffix(chr(10) + '...').strip()}"

    lines, line = [], ""
    for item in flat(to_dict(recipe)):  # whole pairs per line, never split inside one
        if line and len(line) + 3 + len(item) > width:
            lines.append(line)
            line = ""
        line = f"{line} · {item}" if line else f"  {item}"
    return "\n".join([*lines, line] if line else lines)


def _units(objective, recipe: Recipe, run: _Run) -> int:
    """Tokens (or images) one optimizer step processes over all processes."""
    per_example = recipe.seq_len if objective.unit == "tokens" else 1
    return run.global_batch * per_example


@torch.no_grad()
def _save_samples(recipe: Recipe, run: _Run, path: Path, n: int = 16) -> str | None:
    """A 4 x 4 grid of generated images (fixed seed): DDPM sampling for diffusion, G(z) for GANs."""
    try:
        from PIL import Image
    except ImportError:
        return None
    shape = (recipe.image_channels, recipe.image_size, recipe.image_size)
    if recipe.objective == "gan":
        gen = run.models["generator"].eval()
        z = torch.randn((n, recipe.latent_dim), generator=torch.Generator().manual_seed(0)).to(run.device)
        images = gen(z).float().clamp(-1, 1)
        gen.train()
    else:
        model = run.models["model"].eval()
        images = run.obj.sample(model, n, shape, run.device, seed=0).float()
        model.train()
    grid = images.reshape(4, 4, *shape).permute(0, 3, 1, 4, 2).reshape(4 * shape[1], 4 * shape[2], shape[0])
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    img = Image.fromarray(pixels[..., 0] if shape[0] == 1 else pixels)
    scale = max(1, 128 // img.width)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
    return str(path)


def _export_merged(recipe: Recipe, run: _Run, directory: Path, tokenizer=None) -> None:
    from .export import merge_and_save

    merge_and_save(run.models.get("model") or run.models["generator"], directory, tokenizer, overwrite=True)


# ----- banner, summary, dry run ----------------------------------------------------------------------------
def _size_line(built) -> str:
    kinds = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in built.bytes_by_kind.items())
    return (
        f"base {fmt_bytes(built.bytes_float)} float -> {fmt_bytes(built.bytes_now)} ({kinds}) "
        f"+ {fmt_bytes(built.bytes_trainable)} trainable"
    )


def _quant_desc(recipe: Recipe) -> str:
    if recipe.quantization == "none":
        return "not quantized (LoRA on the float base)"
    if recipe.quantization in ("nf4", "fp4"):
        dq = ", double quant" if recipe.double_quant else ""
        return f"{recipe.quantization} (blocks of {recipe.blocksize}{dq})"
    if recipe.quantization == "int4":
        return f"int4 (groups of {recipe.group_size})"
    return recipe.quantization


def _lora_desc(recipe: Recipe) -> str:
    lo = recipe.lora
    tm = lo.target_modules if isinstance(lo.target_modules, str) else ",".join(lo.target_modules)
    extra = "".join([" rslora" if lo.use_rslora else "", " dora" if lo.use_dora else ""])
    return f"LoRA r={lo.r} alpha={lo.alpha:g} dropout={lo.dropout:g} on {tm}{extra}"


def _banner(recipe: Recipe, run: _Run, built, data, resume_from, start_step: int) -> str:
    acc = run.acc
    per_step = run.global_batch * (recipe.seq_len if run.obj.unit == "tokens" else 1)
    devices = f"{acc.device.type} x {run.world}" + (
        f" ({torch.cuda.get_device_name(acc.device)})" if acc.device.type == "cuda" else ""
    )
    lines = [
        ("model", f"{built.description} · {fmt_count(built.n_params)} params · {_quant_desc(recipe)}"),
        ("size", f"{_size_line(built)} · {built.quantized_layers} quantized layers"),
        (
            "adapters",
            f"{_lora_desc(recipe)} · {built.lora_layers} layers · {fmt_count(built.n_trainable)} trainable "
            f"({100 * built.n_trainable / max(1, built.n_params):.2f}%)",
        ),
        ("data", data.summary),
        (
            "steps",
            f"{run.max_steps} = {run.max_steps / run.sampler.steps_per_epoch:.2g} epochs "
            f"({run.sampler.steps_per_epoch} steps each{', set by max_steps' if recipe.max_steps else ''}) · "
            f"batch {recipe.batch_size} x "
            f"{recipe.grad_accum_steps} accum x {run.world} proc = {run.global_batch} "
            f"({fmt_count(per_step)} {run.obj.unit}) per step",
        ),
        (
            "optimizer",
            f"{run.opt_desc} lr {recipe.learning_rate:g} · {recipe.lr_schedule}, warmup {recipe.warmup_steps}"
            f" · clip {recipe.max_grad_norm} · wd {recipe.weight_decay:g}"
            + (" · gradient checkpointing" if recipe.gradient_checkpointing else ""),
        ),
        (
            "devices",
            f"{devices} · precision {acc.mixed_precision} · compute {_compute(recipe)}" + fsdp.banner_note(run.models),
        ),
        ("output", f"{run.recipe.output_dir} (config.yaml, metrics.jsonl, checkpoints/, adapter/)"),
    ]
    if resume_from is not None:
        lines.append(("resume", f"from {resume_from} (step {start_step})"))
    return banner(lines, f"qlora-kit finetune · {recipe.objective} · {recipe.description or recipe.model}")


def _compute(recipe: Recipe) -> str:
    from .build import compute_dtype

    return str(compute_dtype(recipe)).replace("torch.", "")


def _summary(recipe, run, losses, last_eval, elapsed, units_done, start_step, out_dir) -> str:
    steps = len(losses)
    vals = list(losses.values())
    tail = vals[-max(1, min(10, len(vals) // 5)) :]
    label, mem = peak_memory(run.device)
    lines = [
        (
            "train loss",
            f"{vals[0]:.4f} (step {start_step + 1}) -> {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)"
            if vals
            else "no steps run",
        ),
    ]
    if last_eval:
        lines.append(("eval", " · ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()) + run.eval_protocol()))
    adapter = out_dir / "adapter"
    lines += [
        ("adapter", f"{adapter} (PEFT format: adapter_config.json + adapter_model.safetensors)"),
        ("metrics", str(out_dir / "metrics.jsonl")),
    ]
    if recipe.merge_adapter:
        lines.append(("merged", str(out_dir / "merged")))
    if recipe.objective != "causal_lm" and (out_dir / "samples.png").is_file():
        lines.append(("samples", f"{out_dir / 'samples.png'} (16 generated images, fixed seed)"))
    if recipe.objective == "causal_lm":
        lines.append(("next", f"qlora-kit eval {out_dir}  ·  qlora-kit merge {out_dir} --output {out_dir / 'merged'}"))
    title = (
        f"done · {steps} steps in {elapsed:.1f} s · {fmt_rate(units_done / max(elapsed, 1e-9))} "
        f"{run.obj.unit}/s · peak {label} {mem:.0f} MB"
    )
    return banner(lines, title)


def dry_run_report(recipe: Recipe, checks=None) -> dict:
    """``--dry-run``: the resolved config, parameter counts, trainable share, quantized size and a rough
    peak-memory estimate, without loading weights of hub / local models or training."""
    from ..recipe import BUILTIN_MODELS
    from .build import (
        attach_lora,
        compute_dtype,
        count_params,
        estimate_quantized_bytes,
        load_base,
        lora_config,
        quant_config,
        vocab_for_builtin,
    )

    dtype = compute_dtype(recipe)
    quant_config(recipe, dtype)  # checks the format is available
    builtin = recipe.model in BUILTIN_MODELS
    vocab = None
    if builtin and recipe.objective == "causal_lm" and recipe.tokenizer not in ("auto", "bytes"):
        from ..data import build_tokenizer

        vocab = vocab_for_builtin(recipe, build_tokenizer(recipe))
    bases = load_base(recipe, dtype=dtype, meta=not builtin, vocab_size=vocab)
    a = torch.empty((), dtype=dtype).element_size()
    total = trainable = qbytes = fbytes = qlayers = 0
    act = 0
    for role, model in bases.items():
        if not builtin:
            model.to(dtype)
        if recipe.objective != "causal_lm" and builtin:
            act += _activation_bytes_by_hooks(model, recipe, role) * (a / 4)
        q, f, n = estimate_quantized_bytes(model, recipe)
        full_d = role == "discriminator" and recipe.discriminator == "full"
        if full_d:
            q, f, n = (
                0,
                q + f
                if recipe.quantization == "none"
                else sum(p.numel() * p.element_size() for p in model.parameters()),
                0,
            )
        qbytes, fbytes, qlayers = qbytes + q, fbytes + f, qlayers + n
        t_all, _ = count_params(model)
        if full_d:
            t_train = t_all
        else:
            attach_lora(model, lora_config(recipe, model), recipe)
            _, t_train = count_params(model)
        total += t_all
        trainable += t_train
    if recipe.objective == "causal_lm":
        act = _lm_activation_bytes(bases["model"], recipe, a)
    optimizer_bytes = trainable * (4 + 4 + 8)  # fp32 adapter, its gradient, two AdamW moments
    peak = qbytes + fbytes + optimizer_bytes + act
    print(to_yaml(recipe, header=f"resolved recipe ({recipe.output_dir})"), end="")
    lines = [
        (
            "parameters",
            f"{total:,} ({fmt_count(total)}) · trainable {trainable:,} ({100 * trainable / max(total, 1):.3f}%)",
        ),
        (
            "quantized",
            f"{_quant_desc(recipe)} · {qlayers} layers · weights {fmt_bytes(qbytes)} quantized + "
            f"{fmt_bytes(fbytes)} float = {fmt_bytes(qbytes + fbytes)}",
        ),
        (
            "peak memory",
            f"~{fmt_bytes(peak)} per process (weights {fmt_bytes(qbytes + fbytes)} + adapters and "
            f"AdamW {fmt_bytes(optimizer_bytes)} + activations ~{fmt_bytes(act)}; a rough estimate)",
        ),
    ] + (checks.lines if checks is not None else [])
    print(banner(lines, "dry run: nothing trained, nothing written"))
    for note in checks.notes if checks is not None else []:
        print(f"note: {note}")
    return {
        "dry_run": True,
        "params": total,
        "trainable": trainable,
        "quantized_bytes": qbytes,
        "float_bytes": fbytes,
        "quantized_layers": qlayers,
        "peak_bytes": peak,
    }


def _lm_activation_bytes(model: nn.Module, recipe: Recipe, a: int) -> int:
    """Rough activation memory of a decoder LM step: with checkpointing only each layer's input is kept,
    plus one layer recomputed in full; logits (fp32, with their gradient) on top."""
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    ffn = getattr(cfg, "intermediate_size", None) or 4 * h
    vocab = getattr(cfg, "vocab_size", 0)
    tokens = recipe.batch_size * recipe.seq_len
    per_layer = tokens * (12 * h + 3 * ffn) * a
    body = layers * tokens * h * a + per_layer if recipe.gradient_checkpointing else layers * per_layer
    return int(body + 3 * tokens * vocab * 4)


@torch.no_grad()
def _activation_bytes_by_hooks(model: nn.Module, recipe: Recipe, role: str) -> int:
    """Sum of every leaf module's output size for one batch (float32), doubled for their gradients."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        b = recipe.batch_size
        if role == "generator":
            model(torch.zeros(b, recipe.latent_dim))
        else:
            x = torch.zeros(b, recipe.image_channels, recipe.image_size, recipe.image_size)
            model(x) if role == "discriminator" else model(x, torch.zeros(b, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return 2 * total
