"""Shared benchmark harness: timing, environment, providers side by side, JSON + Markdown results.

Timing: on CUDA, ``triton.testing.do_bench`` medians (it clears L2 before every call, and the clearing
kernel hides the host's launch overhead, so this is GPU time with a cold cache); ``graph=True`` uses
``do_bench_cudagraph`` instead (back-to-back replays: the weight may stay in L2). On CPU a
``perf_counter`` loop (median of repeats). Every result file carries the device, torch / triton /
bitsandbytes / torchao versions and the git commit.

Usage from a benchmark script:
    >>> from harness import Provider, Skip, run_providers, write_results, environment
    >>> rows = run_providers(cases, {"torch": Provider(setup_torch)}, device="cuda")
    >>> write_results("matmul_cuda", rows, {"env": environment("cuda")})
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Skip(Exception):
    """Raised by a provider's setup when it cannot run here (library missing, GPU too old, ...)."""


@dataclass(frozen=True)
class Provider:
    """One implementation to time.

    Args:
        setup: ``setup(case) -> fn`` or ``(fn, extra: dict)``; ``fn()`` is what gets timed, ``extra`` is
            merged into the row (e.g. ``{"weight_bytes": ...}``). Raise :class:`Skip` to skip a case.
        devices: device types it runs on (e.g. ``("cuda",)`` for do_bench-only providers).
    """

    setup: Callable
    devices: tuple[str, ...] = ("cuda", "cpu")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # an optional library may fail to import in many ways
        return None


def git_commit() -> str:
    """Short commit of the working tree ("+dirty" when it has uncommitted changes), or "unknown"."""
    from qlora_kit.bench.measure import git_commit as commit

    return commit()


def environment(device: str) -> dict:
    """Device, versions and commit recorded with every result."""
    env = {"device_type": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            capability=f"sm_{props.major}{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        env.update(device=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    env.update(torch=torch.__version__, python=platform.python_version(), commit=git_commit())
    for lib in ("triton", "bitsandbytes", "torchao"):
        env[lib] = _version(lib)
    return env


def time_ms(
    fn: Callable[[], object], device: str, *, graph: bool = False, min_time_s: float = 0.2
) -> tuple[float, str]:
    """Median milliseconds of ``fn()`` and the method used ("do_bench", "cudagraph" or "perf_counter")."""
    if device == "cuda":
        import triton.testing

        if graph:
            try:
                return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), "cudagraph"
            except Exception:  # not capturable (host sync, allocator): fall back, say so in the row
                torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench"
    fn()  # warm up
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.02 / once))  # ~20 ms per sample
    samples = []
    deadline = time.perf_counter() + min_time_s
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 50):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples), "perf_counter"


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, (read + write bytes) / median time, in GB/s."""
    if device == "cpu":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_providers(
    cases: list[dict],
    providers: dict[str, Provider],
    *,
    device: str,
    graph: bool = False,
    metrics: Callable[[dict, float], dict] | None = None,
    baseline: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Time every provider on every case; one row per (case, provider).

    Args:
        cases: dicts of case fields (e.g. ``{"model": ..., "m": 1, "n": 4096, "k": 4096}``).
        providers: name -> :class:`Provider`.
        device: "cuda" or "cpu".
        graph: on CUDA, time with CUDA graphs (falls back to do_bench per provider when capture fails).
        metrics: ``metrics(row, ms) -> dict`` of derived columns (TFLOP/s, GB/s, ...); ``row`` holds the
            case fields and the provider's ``extra``.
        baseline: provider name; adds ``speedup`` = baseline ms / ms to rows of the same case.

    Returns:
        Rows with ``status`` "ok" (``ms``, ``timer``, metrics), "skipped" or "error" (``reason``).
    """
    rows = []
    for case in cases:
        case_rows = []
        for name, provider in providers.items():
            row = {**case, "provider": name}
            try:
                if device not in provider.devices:
                    raise Skip(f"runs on {'/'.join(provider.devices)} only")
                made = provider.setup(case)
                fn, extra = made if isinstance(made, tuple) else (made, {})
                row.update(extra)
                ms, timer = time_ms(fn, device, graph=graph)
                row.update(status="ok", ms=ms, timer=timer, **(metrics(row, ms) if metrics else {}))
            except Skip as e:
                row.update(status="skipped", reason=str(e))
            except Exception as e:  # one failing provider must not stop the table
                row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            finally:
                fn = made = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            log(_describe(row))
            case_rows.append(row)
        if baseline is not None:
            base = next((r for r in case_rows if r["provider"] == baseline and r["status"] == "ok"), None)
            for r in case_rows:
                if base is not None and r["status"] == "ok":
                    r["speedup"] = base["ms"] / r["ms"]
        rows.extend(case_rows)
    return rows


def _describe(row: dict) -> str:
    head = " ".join(f"{k}={v}" for k, v in row.items() if k in ("model", "m", "n", "k", "provider"))
    if row["status"] != "ok":
        return f"{head}: {row['status']} ({row['reason']})"
    return f"{head}: {row['ms']:.4f} ms"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_results(
    name: str, rows: list[dict], meta: dict, out_dir: Path | str = RESULTS_DIR, columns: list[str] | None = None
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (meta + rows) and ``<name>.md`` (meta lines + one table) under ``out_dir``.

    Args:
        columns: Markdown columns in order (default: every key seen, in first-seen order).

    Returns:
        (json path, markdown path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n", encoding="utf-8")
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"# {meta.get('title', name)}", ""]
    for key, value in meta.items():
        if key == "title":
            continue
        text = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        lines.append(f"- {key}: {text}")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, md_path
