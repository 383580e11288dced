"""What ``qlora-kit bench`` records beside the quality numbers: environment, peak memory, time, throughput, size."""

from __future__ import annotations

import inspect
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# ------------------------------------------------------------------------------------------ environment


def installed_version(name: str) -> str | None:
    """Version of the installed distribution ``name``, or None when it is not installed."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed, or broken metadata
        return None


def git_commit() -> str:
    """Short commit of the source tree ("+dirty" with uncommitted changes), or "unknown"."""
    cwd = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=cwd)
    except OSError:
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str) -> dict:
    """Device, versions and commit recorded with the results."""
    env = {"device_type": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            capability=f"sm_{props.major}{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env.update(device=cpu, cores=os.cpu_count(), threads=torch.get_num_threads())
    env.update(python=platform.python_version(), torch=torch.__version__, commit=git_commit())
    for lib in (
        "qlora-kit",
        "triton",
        "transformers",
        "diffusers",
        "bitsandbytes",
        "torchao",
        "optimum-quanto",
        "lm_eval",
        "peft",
    ):
        env[lib] = installed_version(lib)
    return env


# ------------------------------------------------------------------------------------------ measuring


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{field_name}:\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


def _release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc), so resident-set growth measures new use."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory growth inside a ``with`` block: CUDA peak allocated bytes, or on CPU the growth of the
    resident set (Linux: the high-water mark is reset through /proc/self/clear_refs). ``bytes`` is None
    when it cannot be measured here."""

    def __init__(self, device: str):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _release_free_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = _rss_kib("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.bytes = max(0, _rss_kib("VmHWM") - self.start) * 1024
        return False


def sync(device: str) -> None:
    """Wait for queued CUDA work (nothing to wait for on the CPU), so a timer reads finished work."""
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, batch: int, length: int, device: str, reps: int = 3) -> float:
    """Tokens per second of one forward over ``batch`` x ``length`` random tokens, no KV cache (median of reps)."""
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    return batch * length / median_time(lambda: model(input_ids=ids, use_cache=False), device, reps)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, batch: int, prompt: int, new_tokens: int, device: str) -> float:
    """Greedy decoding with the KV cache: tokens generated per second (prompt excluded)."""
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    # transformers 5 names the KV cache ``cache`` (``past_key_values`` warns there); older releases the latter
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(n: int) -> None:
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out[key], out.logits[:, -1:].argmax(-1)
        for _ in range(n):
            out = model(input_ids=nxt, use_cache=True, **{key: past})
            past, nxt = out[key], out.logits[:, -1:].argmax(-1)

    run(2)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    run(new_tokens)
    sync(device)
    t_all = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    run(0)  # the prefill alone, subtracted
    sync(device)
    return batch * new_tokens / max(t_all - (time.perf_counter() - t0), 1e-9)


def weight_bytes(model: nn.Module) -> tuple[int, float | None]:
    """(bytes of all weights, bits per quantized parameter or None when nothing is quantized)."""
    from ..api import memory_footprint
    from ..nn.quantized import QuantizedLayer

    total = sum(memory_footprint(model).values())
    qbytes = qparams = 0
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            qbytes += m.qweight.nbytes()
            qparams += math.prod(m.qweight.shape)
    return total, (8 * qbytes / qparams if qparams else None)


# --------------------------------------------------------------------------------------------- methods
