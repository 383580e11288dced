"""Upper bounds of the recipe's numeric keys (the lower bounds and types are checked in ``recipe.py``).

A value past these bounds is never a real run: it overflows what torch / numpy accept (a seed), makes
PyTorch allocate far more than any machine has before the first step (``num_train_timesteps`` tables,
``lora.r``), or oversubscribes the CPU (``cpu_threads``). Each is refused in one sentence that names the
key, the bound and the fix. Bounds that depend on the model (``lora.r`` against the targeted layers) and
on the machine (memory) are checked when the model is known, in ``qlora_kit/train/fit.py``.
"""

from __future__ import annotations

import os

SEED_MAX = 2**32 - 1  # numpy.random.seed's largest (torch.manual_seed takes up to 2**64 - 1)
INT_MAX = 2**31 - 1  # counts that reach C ints (steps, sizes)
THREADS_PER_CORE = 4

# key -> largest value (keys not named here: INT_MAX for integers)
UPPER = {
    "seq_len": 1 << 20,
    "image_size": 4096,
    "batch_size": 1 << 16,
    "grad_accum_steps": 1 << 16,
    "epochs": 1_000_000,
    "num_train_timesteps": 100_000,
    "latent_dim": 1 << 16,
    "lora.r": 1 << 16,
}


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_upper_bounds(recipe, lora) -> None:
    """RecipeError for the first integer key of ``recipe`` (or its ``lora`` section) above its bound."""
    from .recipe import RecipeError

    if not 0 <= recipe.seed <= SEED_MAX:
        raise RecipeError(
            f"seed must be between 0 and {SEED_MAX} (what numpy and torch accept), got {recipe.seed}; set e.g. seed=0"
        )
    if recipe.cpu_threads is not None:
        cores = cpu_cores()
        if recipe.cpu_threads > THREADS_PER_CORE * cores:
            raise RecipeError(
                f"cpu_threads={recipe.cpu_threads} is more than {THREADS_PER_CORE} per CPU core "
                f"({cores} cores here); set cpu_threads={cores} or null"
            )
    check_path_names("output_dir", recipe.output_dir)
    for prefix, section in (("", recipe), ("lora.", lora)):
        for key, value in vars(section).items():
            name = prefix + key
            if isinstance(value, bool) or not isinstance(value, int) or name in ("seed", "cpu_threads"):
                continue
            top = UPPER.get(name, INT_MAX)
            if value > top:
                raise RecipeError(f"{name}={value} is larger than {top:,}, the most qlora-kit accepts; lower it")


NAME_MAX = 255  # bytes per path component on every common filesystem (ext4, xfs, btrfs, APFS, NTFS)
PATH_MAX = 4096


def check_path_names(key: str, path: str) -> None:
    """RecipeError when a path component or the whole path is longer than filesystems allow."""
    from .recipe import RecipeError

    raw = os.fsencode(path)
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        shown = os.fsdecode(longest[:24]) + "..."
        raise RecipeError(
            f"{key} has a name of {len(longest)} bytes ({shown!r}), longer than the {NAME_MAX} filesystems allow; "
            "choose a shorter name"
        )
    if len(raw) > PATH_MAX:
        raise RecipeError(f"{key} is {len(raw)} bytes long, more than the {PATH_MAX} filesystems allow; shorten it")
