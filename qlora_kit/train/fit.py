"""Will the run fit? Checks made before any weight is allocated: the LoRA rank against the targeted layers,
and an up-front memory estimate against what the machine has.

The model is built on the ``meta`` device (shapes only, no memory, no random draws: the global RNG is
restored), so a recipe asking for ``lora.r=1000000`` or ``seq_len=1000000`` is refused in one sentence
instead of growing until the kernel kills the process.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..recipe import Recipe, RecipeError
from .report import fmt_bytes

ADAM_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 adapter weight, its gradient, two AdamW moments
SKIP_ENV = "QLORA_KIT_NO_MEMORY_CHECK"


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """(rows, cols) of a layer's weight seen as output channels x everything else: LoRA's rank bound is
    min(rows, cols)."""
    from ..nn.lora_layers import lora_kind
    from ..nn.quantized import is_transformers_conv1d

    kind = lora_kind(module)
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if kind == "linear":
        if is_transformers_conv1d(module):
            return module.weight.shape[1], module.weight.shape[0]
        return module.out_features, module.in_features
    k = math.prod(module.kernel_size)
    if kind == "conv_transpose":
        return module.out_channels, module.in_channels * k
    return module.out_channels, module.in_channels * k


def _targets(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module]]:
    from ..lora import find_targets
    from .build import lora_config

    try:
        return find_targets(model, lora_config(recipe, model))
    except ValueError:
        return []  # attach_lora reports target problems in its own words


def check_rank(model: nn.Module, recipe: Recipe) -> int:
    """RecipeError when ``lora.r`` exceeds min(rows, cols) of every targeted layer (no layer could use that
    rank); returns the adapter parameter count ``r * (rows + cols)`` summed over the targets.

    A rank above some layers' bound only (an output conv with 1 channel) is allowed, as in PEFT: their
    update is rank-limited by their shape, the other layers use the full rank.
    """
    r, params = recipe.lora.r, 0
    largest = None
    for name, module in _targets(model, recipe):
        rows, cols = weight_dims(module)
        params += r * (rows + cols)
        if largest is None or min(rows, cols) > largest[1]:
            largest = (name, min(rows, cols), rows, cols)
    if largest is not None and r > largest[1]:
        name, bound, rows, cols = largest
        raise RecipeError(
            f"lora.r={r} is larger than any targeted layer can hold (the largest, {name}, is {rows} x {cols}, "
            f"so r <= {bound}); set lora.r={bound} or lower"
        )
    return params


def _meta_bases(recipe: Recipe, vocab_size: int | None) -> dict[str, nn.Module]:
    from .build import compute_dtype, load_base

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, no draws from the global RNG
        return load_base(recipe, vocab_size=vocab_size, dtype=compute_dtype(recipe), meta=True)


def estimate(recipe: Recipe, vocab_size: int | None = None) -> dict[str, int]:
    """Bytes one process needs: {"weights", "adapters", "activations", "total"}; raises RecipeError on a
    LoRA rank the targeted layers cannot hold."""
    from .build import compute_dtype, count_params, estimate_quantized_bytes
    from .objectives import objective_class

    a = torch.empty((), dtype=compute_dtype(recipe)).element_size()
    weights = adapters = act = 0
    objective = objective_class(recipe.objective)(recipe)
    for role, model in _meta_bases(recipe, vocab_size).items():
        q, f, _ = estimate_quantized_bytes(model, recipe)
        if role == "discriminator" and recipe.discriminator == "full":
            weights += f + q
            adapters += count_params(model)[0] * ADAM_BYTES_PER_PARAM
        else:
            weights += q + f
            adapters += check_rank(model, recipe) * ADAM_BYTES_PER_PARAM
        act += objective.activation_bytes(model, role, a)
    return {"weights": weights, "adapters": adapters, "activations": act, "total": weights + adapters + act}


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes this process can still allocate on ``device``, what they are), None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:  # a cgroup (container) limit below the machine's
        with open("/sys/fs/cgroup/memory.max") as f1, open("/sys/fs/cgroup/memory.current") as f2:
            limit = f1.read().strip()
            if limit != "max":
                room = int(limit) - int(f2.read().strip())
                avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail, "of RAM available"


def check_fits(recipe: Recipe, device: torch.device, vocab_size: int | None = None) -> dict[str, int]:
    """RecipeError when the run's estimated peak memory is more than ``device`` has available (set the
    environment variable QLORA_KIT_NO_MEMORY_CHECK=1 to skip the comparison, not the rank check)."""
    need = estimate(recipe, vocab_size)
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return need
    have, what = available_bytes(device)
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    if have is not None and need["total"] * procs > have:
        raise RecipeError(
            f"this run needs about {fmt_bytes(need['total'] * procs)} ({procs} process(es) x weights "
            f"{fmt_bytes(need['weights'])} + adapters and AdamW {fmt_bytes(need['adapters'])} + activations "
            f"{fmt_bytes(need['activations'])}) but only {fmt_bytes(have)} {what}; lower batch_size, seq_len or "
            f"lora.r, or set {SKIP_ENV}=1 to try anyway"
        )
    return need
