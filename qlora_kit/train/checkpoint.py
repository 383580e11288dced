"""Checkpoints that resume exactly, written atomically.

A checkpoint is a directory ``<output_dir>/checkpoints/step-000050/``:

    adapter/                 the adapter so far, PEFT format (usable on its own)
    trainable.safetensors    every trainable tensor (and BatchNorm running statistics), for exact resume
    optimizer.pt             optimizer states (tensors, numbers and lists only: read with weights_only=True)
    state.json               step, data position, scheduler states, recipe and data fingerprints
    rng-rank<k>.json         each process's Python / NumPy / torch (CPU and CUDA) RNG states

    qlora-kit-manifest.json  size and SHA-256 of every file above (written last)

It is written into a temporary directory by all processes and swapped into place by the main process
(``qlora_kit/safe_io.py``), so a crash never leaves a half-written checkpoint where resume would find it;
resume checks every file anyway (``resume.py``) and falls back to an older checkpoint when one is damaged.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import safe_io
from ..lora import plain_path

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def trainable_state(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Trainable parameters and BatchNorm statistics of every model, keyed ``<role>.<name>``."""
    out = {}
    for role, model in models.items():
        for key, t in _saved(role, model):
            out[key] = t.detach().to("cpu").contiguous().clone()
    return out


def trainable_targets(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The live tensors :func:`trainable_state` saves, by the same keys."""
    return {key: t for role, model in models.items() for key, t in _saved(role, model)}


def _saved(role: str, model: nn.Module):
    # (key, tensor) of the trainable parameters and BatchNorm statistics, keyed by the unwrapped model's names
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield f"{role}.{plain_path(name)}", p
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] in _STAT_BUFFERS:
            yield f"{role}.{plain_path(name)}", b


@torch.no_grad()
def load_trainable_state(models: dict[str, nn.Module], state: dict[str, torch.Tensor], where: str) -> None:
    targets = trainable_targets(models)
    missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or extra:
        from ..recipe import RecipeError

        raise RecipeError(
            f"checkpoint {where} does not match this model (missing {missing[:2]}, unexpected {extra[:2]}); "
            "resume with the recipe that started the run"
        )
    for key, dst in targets.items():
        src = state[key]
        if src.shape != dst.shape:
            from ..recipe import RecipeError

            raise RecipeError(
                f"checkpoint {where}: {key} has shape {tuple(src.shape)}, the model needs {tuple(dst.shape)}; "
                "resume with the recipe that started the run"
            )
        dst.copy_(src.to(dst.device, dst.dtype))


def rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def save(
    accelerator,
    root: Path,
    step: int,
    models: dict[str, nn.Module],
    optimizers: dict,
    schedulers: dict,
    state: dict,
    keep: int,
    save_adapters,
) -> Path:
    """Write checkpoint ``step`` atomically (all processes must call this)."""
    from safetensors.torch import save_file

    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a killed run (one run per output_dir at a time)
            shutil.rmtree(stale, ignore_errors=True)
        safe_io.recover(final)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _write_json(tmp / f"rng-rank{accelerator.process_index}.json", rng_state())
    if accelerator.is_main_process:
        save_file(trainable_state(models), str(tmp / "trainable.safetensors"))
        torch.save({k: opt.state_dict() for k, opt in optimizers.items()}, tmp / "optimizer.pt")
        save_adapters(tmp)
        state = {
            **state,
            "step": step,
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "world_size": accelerator.num_processes,
        }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / "state.json", state)
        safe_io.publish(tmp, final, "checkpoint")  # manifest last, then a crash-safe swap
        for _, old in step_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, models: dict[str, nn.Module], optimizers: dict, schedulers: dict) -> dict:
    """Check every file of checkpoint ``path`` (``resume.read``), then restore it into freshly built models /
    optimizers / schedulers; returns its state.json. ``resume.load_newest_intact`` also falls back."""
    from . import resume

    loaded = resume.read(Path(path), models, optimizers, schedulers, max_steps=2**62)
    return resume.apply(loaded, accelerator.process_index, models, optimizers, schedulers)
