"""Quantize / dequantize throughput of every weight format, ours vs bitsandbytes (where it has the format).

Throughput = bytes of the float weight (quantize: read; dequantize: written) / median time.
CPU runs time our CPU path (the PyTorch reference) and bitsandbytes' CPU backend; CUDA runs time our
Triton kernels and bitsandbytes' CUDA kernels, with triton.testing.do_bench.

Usage:
    python benchmarks/bench_quantize.py [--device cpu|cuda] [--quick]
Writes benchmarks/results/quantize_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str) -> dict:
    """Device, library versions and the git commit, recorded with every result."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "threads": torch.get_num_threads(),
    }
    for lib in ("triton", "bitsandbytes"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            env[lib] = None
    return env


def bench(fn, device: str, reps: int) -> float:
    """Median seconds of ``fn()``."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def providers(w: torch.Tensor):
    """(format, provider, quantize_fn, dequantize_fn) for ours and bitsandbytes."""
    from qlora_kit import registry
    from qlora_kit.bench.formats import format_variants

    # every registered weight format, with and without double quantization where it has it (as bitsandbytes'
    # rows below), groups of 128
    for name, fmt_name, options in format_variants(double_quant=(False, True), group_size=128):
        fmt, config = registry.get_format(fmt_name), registry.weight_config(fmt_name, **options)
        q = fmt.from_float(w, config)
        yield name, "qlora-kit", (lambda f=fmt, c=config: f.from_float(w, c)), (lambda q=q: q.dequantize(w.dtype))
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        return
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            qb, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
            name = quant_type + ("-dq" if dq else "")
            yield (
                name,
                "bitsandbytes",
                lambda qt=quant_type, d=dq: bnbF.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=d),
                lambda qb=qb, s=state: bnbF.dequantize_4bit(qb, s),
            )
    q8, s8, _ = bnbF.int8_vectorwise_quant(w)
    quant8, dequant8 = (lambda: bnbF.int8_vectorwise_quant(w)), (lambda: bnbF.int8_vectorwise_dequant(q8, s8))
    yield "int8", "bitsandbytes", quant8, dequant8


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small weight, few repetitions")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows_, cols = (4096, 4096) if args.device == "cuda" else ((512, 1024) if args.quick else (2048, 4096))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    w = torch.randn(rows_, cols, device=args.device, dtype=dtype) * 0.02
    nbytes = w.numel() * w.element_size()
    reps = 3 if args.quick else 10
    rows = []
    for name, provider, qfn, dqfn in providers(w):
        row = {"format": name, "provider": provider, "shape": [rows_, cols], "dtype": str(dtype)}
        t = bench(qfn, args.device, reps)
        row["quantize_ms"] = t * 1e3
        row["quantize_GBps"] = nbytes / t / 1e9
        if dqfn is not None:
            t = bench(dqfn, args.device, reps)
            row["dequantize_ms"] = t * 1e3
            row["dequantize_GBps"] = nbytes / t / 1e9
        rows.append(row)
        print(
            f"{name:7s} {provider:13s} quantize {row['quantize_GBps']:7.2f} GB/s"
            + (f"   dequantize {row['dequantize_GBps']:7.2f} GB/s" if "dequantize_GBps" in row else "")
        )
    env = environment(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quantize_{args.device}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [
        f"# Quantize / dequantize throughput ({args.device})",
        "",
        f"Weight {rows_}x{cols} {dtype}; GB/s of float weight bytes; median of {reps} runs"
        + (" (do_bench)" if args.device == "cuda" else " (perf_counter)"),
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()),
        "",
        "| format | provider | quantize GB/s | dequantize GB/s |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        dq = f"{r['dequantize_GBps']:.2f}" if "dequantize_GBps" in r else "-"
        lines.append(f"| {r['format']} | {r['provider']} | {r['quantize_GBps']:.2f} | {dq} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return rows


if __name__ == "__main__":
    main()
