"""Resume from the newest intact checkpoint: every file is read and checked before anything is restored.

A checkpoint is usable when its manifest (if any) matches every file, ``state.json`` is consistent (its step
is the directory's, the schedulers are the run's), ``trainable.safetensors`` has the model's tensors with
finite values, ``optimizer.pt`` (read with ``weights_only=True``) has the optimizers' structure and finite
states, and every ``rng-rank<k>.json`` is a valid set of generator states. A damaged checkpoint is
skipped with a message and the next older one tried; nothing in the model, optimizers or run files is
touched until one passes. Every process reads every file, so all of them pick the same checkpoint.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import safe_io, validate
from ..recipe import RecipeError
from . import checkpoint

_STEP_DIR = re.compile(r"^step-(\d+)$")
_RNG_FILE = re.compile(r"^rng-rank(\d+)\.json$")


class Damaged(ValueError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent."""


@dataclass
class Loaded:
    state: dict
    trainable: dict[str, torch.Tensor]
    optimizers: dict
    rng: dict[int, dict]


def candidates(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory under ``root`` (complete or not), newest first."""
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(out, reverse=True)


def _read_state(path: Path, step: int, roles: list[str]) -> dict:
    try:
        state = validate.read_json(path / "state.json", "")
    except ValueError as e:
        raise Damaged(str(e).rstrip("; ")) from None
    if not isinstance(state, dict):
        raise Damaged("state.json is not a mapping")
    if not validate.same(state.get("step"), step):
        raise Damaged(f"state.json says step {state.get('step')!r} in directory step-{step:06d}")
    scheds = state.get("schedulers")
    if not isinstance(scheds, dict) or sorted(scheds) != roles or not all(isinstance(v, dict) for v in scheds.values()):
        raise Damaged(f"state.json field 'schedulers' must hold the states of {roles}")
    for key in ("data_fingerprint", "recipe"):
        if state.get(key) is not None and not isinstance(state[key], str):
            raise Damaged(f"state.json field {key!r} must be a string")
    for key, sched in scheds.items():
        if not validate.same(sched.get("last_epoch"), step):
            raise Damaged(f"state.json: scheduler {key!r} is at step {sched.get('last_epoch')!r}, not {step}")
        lrs = sched.get("base_lrs")
        if not isinstance(lrs, list) or not all(validate.is_number(x) and math.isfinite(x) for x in lrs):
            raise Damaged(f"state.json: scheduler {key!r} has invalid base_lrs")
    return state


def _read_trainable(path: Path, models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / "trainable.safetensors"
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise Damaged(f"trainable.safetensors is missing, truncated or corrupt ({e})") from None
    targets = checkpoint.trainable_targets(models)
    missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or extra:
        raise Damaged(f"trainable.safetensors does not match this model (missing {missing[:2]}, extra {extra[:2]})")
    for key, dst in targets.items():
        src = state[key]
        if src.shape != dst.shape or src.is_floating_point() != dst.is_floating_point():
            raise Damaged(f"trainable.safetensors: {key} is {src.dtype} {tuple(src.shape)}, the model needs "
                          f"{dst.dtype} {tuple(dst.shape)}")  # fmt: skip
    try:
        validate.check_finite(state, sorted(state), "trainable.safetensors")
    except ValueError as e:
        raise Damaged(str(e)) from None
    return state


def _read_optimizers(path: Path, optimizers: dict) -> dict:
    try:
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse an untrusted file means "damaged"
        raise Damaged(f"optimizer.pt is missing, truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(saved, dict) or sorted(saved) != sorted(optimizers):
        raise Damaged(f"optimizer.pt must hold the states of {sorted(optimizers)}")
    for role, opt in optimizers.items():
        _check_optimizer_state(role, saved[role], opt)
    return saved


def _check_optimizer_state(role: str, sd, opt) -> None:
    current = opt.state_dict() or {}
    # FSDP's stand-in optimizer holds the gathered full state on the main process only: elsewhere the saved
    # state is checked for structure and finiteness, not against this process's parameter groups
    want_groups = current.get("param_groups")
    groups = sd.get("param_groups") if isinstance(sd, dict) and "state" in sd else None
    if not isinstance(groups, list) or not isinstance(sd["state"], dict):
        raise Damaged(f"optimizer.pt: the {role} optimizer's state has the wrong structure")
    if want_groups is not None and len(groups) != len(want_groups):
        raise Damaged(f"optimizer.pt: the {role} optimizer's state has the wrong structure")
    ids = None if want_groups is None else [i for g in want_groups for i in g["params"]]  # indices or names
    shapes = {} if ids is None else _param_shapes(opt, ids, current)
    for got, want in zip(groups, want_groups or [{"params": g.get("params")} for g in groups], strict=True):
        if not isinstance(got, dict) or got.get("params") != want["params"]:
            raise Damaged(f"optimizer.pt: the {role} optimizer's parameter groups differ from this model's")
        bad = [k for k, v in got.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise Damaged(f"optimizer.pt: the {role} optimizer's {bad[0]} is not finite")
    for index, entry in sd["state"].items():
        known = (validate.is_int(index) or isinstance(index, str)) and (ids is None or index in ids)
        if not known or not isinstance(entry, dict):
            raise Damaged(f"optimizer.pt: the {role} optimizer's state has an invalid entry {index!r}")
        for name, t in entry.items():
            if not isinstance(t, torch.Tensor):
                continue
            if name in ("exp_avg", "exp_avg_sq") and index in shapes and t.shape != shapes[index]:
                raise Damaged(f"optimizer.pt: {role} {name} of parameter {index} has shape {tuple(t.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise Damaged(f"optimizer.pt: {role} {name} of parameter {index} holds NaN/Inf")


def _param_shapes(opt, ids: list, current: dict) -> dict:
    """Parameter shapes by state key: from the optimizer's parameters, or (FSDP's stand-in optimizer, whose
    full state is keyed by parameter name) from the moments it already holds."""
    groups = getattr(opt, "param_groups", None)
    if groups is not None:
        return dict(zip(ids, (p.shape for g in groups for p in g["params"]), strict=False))
    return {
        i: s["exp_avg"].shape
        for i, s in current.get("state", {}).items()
        if isinstance(s, dict) and isinstance(s.get("exp_avg"), torch.Tensor)
    }


def _check_rng(state, name: str) -> None:
    def byte_list(v):
        return isinstance(v, list) and all(validate.is_int(x) and 0 <= x < 256 for x in v)

    try:
        py, npy = state["python"], state["numpy"]
        random.Random().setstate((py[0], tuple(py[1]), py[2]))
        np.random.RandomState().set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
        if not byte_list(state["torch"]):
            raise ValueError("torch state")
        torch.Generator().set_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and not (isinstance(state["cuda"], list) and all(byte_list(s) for s in state["cuda"])):
            raise ValueError("cuda state")
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError):
        raise Damaged(f"{name} does not hold valid random-generator states") from None


def _read_rng(path: Path) -> dict[int, dict]:
    out = {}
    for file in sorted(path.iterdir()):
        m = _RNG_FILE.match(file.name)
        if not m:
            continue
        try:
            state = validate.read_json(file, "")
        except ValueError as e:
            raise Damaged(str(e).rstrip("; ")) from None
        if not isinstance(state, dict):
            raise Damaged(f"{file.name} is not a mapping")
        _check_rng(state, file.name)
        out[int(m.group(1))] = state
    if 0 not in out:
        raise Damaged("rng-rank0.json is missing")
    return out


def read(path: Path, models: dict[str, nn.Module], optimizers: dict, schedulers: dict, max_steps: int) -> Loaded:
    """Read and check every file of checkpoint ``path``; nothing is changed.

    Raises:
        Damaged: a file is missing, truncated, corrupt or inconsistent (the message names it).
        RecipeError: the checkpoint is intact but lies beyond this recipe's ``max_steps``.
    """
    step = int(_STEP_DIR.match(path.name).group(1))
    try:
        safe_io.verify(path, required=("state.json", "trainable.safetensors", "optimizer.pt"))
    except ValueError as e:
        raise Damaged(str(e).removesuffix("; save it again")) from None
    state = _read_state(path, step, sorted(schedulers))
    loaded = Loaded(state, _read_trainable(path, models), _read_optimizers(path, optimizers), _read_rng(path))
    if step > max_steps:
        raise RecipeError(
            f"checkpoint {path} is at step {step}, beyond this recipe's {max_steps} steps; raise max_steps to "
            "continue it, or start over with overwrite=true"
        )
    return loaded


def apply(loaded: Loaded, rank: int, models: dict[str, nn.Module], optimizers: dict, schedulers: dict) -> dict:
    """Restore a checked checkpoint into the models, optimizers, schedulers and RNGs; returns its state.json."""
    checkpoint.load_trainable_state(models, loaded.trainable, "")
    for key, opt in optimizers.items():
        opt.load_state_dict(loaded.optimizers[key])
    for key, sched in schedulers.items():
        sched.load_state_dict(loaded.state["schedulers"][key])
    checkpoint.set_rng_state(loaded.rng.get(rank, loaded.rng[0]))  # more processes than saved: rank 0's
    return loaded.state


def load_newest_intact(root: Path, rank: int, models, optimizers, schedulers, max_steps: int, say) -> tuple[Path, dict]:
    """Restore the newest checkpoint under ``root`` that passes :func:`read`; (its path, its state.json).

    Damaged checkpoints are skipped with a message through ``say``.

    Raises:
        RecipeError: no checkpoint is intact (the message names the newest one's damage).
    """
    damage = []
    for _, path in candidates(root):
        try:
            loaded = read(path, models, optimizers, schedulers, max_steps)
        except Damaged as e:
            damage.append(f"{path.name}: {e}")
            say(f"warning: checkpoint {path} is damaged ({e}); trying the previous one")
            continue
        if damage:
            say(f"resuming from {path}, the newest intact checkpoint")
        return path, apply(loaded, rank, models, optimizers, schedulers)
    raise RecipeError(
        f"resume=true but no checkpoint in {str(root)!r} is intact ({damage[0] if damage else 'none found'}); "
        "start over with overwrite=true (or resume=false in a new output_dir)"
    )
