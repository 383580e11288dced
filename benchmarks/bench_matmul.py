"""Quantized linear layers y = x W^T side by side: bf16 cuBLAS, ours per format, bitsandbytes, torchao.

Shapes from ``shapes.py`` (Llama-3-8B, Llama-2-7B; M in 1..2048). Per row: median time, TFLOP/s,
effective GB/s (weight + activation + output bytes / time), % of the measured device-to-device copy
bandwidth, and speedup over the bf16 ``torch.matmul`` of the same case. On CUDA, "ours" runs the Triton
kernels through the ``qlora_kit`` custom ops; on CPU (``--device cpu``) it runs the PyTorch reference
behind the same ops (a smoke run: CUDA-only providers are skipped with the reason).

``--tune`` (CUDA) times every path of our kernels per case and writes the dispatcher's table
(``kernels/matmul_table.json`` or ``--table``), which ``plan_matmul`` then reads.

Usage:
    python benchmarks/bench_matmul.py                    # full registry on the GPU
    python benchmarks/bench_matmul.py --quick --device cpu
    python benchmarks/bench_matmul.py --tune --formats nf4,int4,int8
Writes benchmarks/results/matmul_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
import torch.nn.functional as F

try:
    from benchmarks.harness import (
        Provider,
        Skip,
        copy_bandwidth_gbps,
        environment,
        run_providers,
        time_ms,
        write_results,
    )
    from benchmarks.shapes import linear_cases
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from harness import Provider, Skip, copy_bandwidth_gbps, environment, run_providers, time_ms, write_results
    from shapes import linear_cases

from qlora_kit.bench.formats import format_variants

# provider suffix -> (format, config kwargs, activation mode): every registered weight format (blocks of 64
# with double quant, groups of 128), then the dynamic-activation modes
OURS = {label: (fmt, opts, None) for label, fmt, opts in format_variants(blocksize=64, group_size=128)} | {
    "w8a8-dyn": ("int8", {}, "int8"),
    "fp8-dyn": ("fp8", {}, "fp8"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.lru_cache(maxsize=2)
def float_weight(n: int, k: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(n * 7 + k)
    return (torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype)


@functools.lru_cache(maxsize=8)
def our_weight(fmt: str, config_items: tuple, n: int, k: int, device: str, dtype: torch.dtype):
    from qlora_kit import registry

    try:
        cls = registry.get_format(fmt)
    except ValueError:
        raise Skip(f"weight format {fmt!r} is not available in this tree") from None
    config = registry.weight_config(fmt, compute_dtype=dtype, **dict(config_items))
    return cls.from_float(float_weight(n, k, device, dtype), config)


def _inputs(case, device, dtype):
    return torch.randn(case["m"], case["k"], device=device, dtype=dtype)


def provider_torch(device, dtype):
    def setup(case):
        w, x = float_weight(case["n"], case["k"], device, dtype), _inputs(case, device, dtype)
        return (lambda: F.linear(x, w)), {"weight_bytes": w.numel() * w.element_size()}

    return Provider(setup)


def provider_ours(suffix, device, dtype):
    fmt, config, activation = OURS[suffix]

    def setup(case):
        from qlora_kit import ops

        if activation == "fp8" and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            raise Skip("fp8 matmuls need sm89+")
        qw = our_weight(fmt, tuple(sorted(config.items())), case["n"], case["k"], device, dtype)
        x = _inputs(case, device, dtype)
        impl = "triton" if device == "cuda" else "reference"
        return (lambda: ops.quantized_linear(x, qw, activation=activation)), {"weight_bytes": qw.nbytes(), "impl": impl}

    return Provider(setup)


def provider_bnb_4bit(device, dtype):
    def setup(case):
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbF
        except ImportError:
            raise Skip("bitsandbytes is not installed") from None
        w = float_weight(case["n"], case["k"], device, dtype)
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        nbytes = packed.numel() + state.absmax.numel() + 4 * (state.state2.absmax.numel() + 1)
        x = _inputs(case, device, dtype)
        return (lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)), {"weight_bytes": nbytes}

    return Provider(setup)


def provider_bnb_int8(device, dtype):
    def setup(case):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise Skip("bitsandbytes is not installed") from None
        layer = bnb.nn.Linear8bitLt(case["k"], case["n"], bias=False, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(
            float_weight(case["n"], case["k"], "cpu", dtype), requires_grad=False, has_fp16_weights=False
        )
        layer = layer.to(device)
        x = _inputs(case, device, dtype)
        return (lambda: layer(x)), {"weight_bytes": case["n"] * case["k"] + 4 * case["n"]}

    return Provider(setup)


def provider_torchao(kind, device, dtype):
    def setup(case):
        try:
            import torchao.quantization as tq
        except ImportError:
            raise Skip("torchao is not installed") from None
        layer = torch.nn.Linear(case["k"], case["n"], bias=False, device=device, dtype=dtype)
        layer.weight.data.copy_(float_weight(case["n"], case["k"], device, dtype))
        if kind == "int4-g128":
            config = getattr(tq, "Int4WeightOnlyConfig", None) or tq.int4_weight_only
            nbytes = case["n"] * case["k"] // 2 + 4 * case["n"] * (case["k"] // 128)
            try:  # torchao >= 0.14: the default "plain" packing needs the separate mslk package; tinygemm's
                # tile-packed layout runs on torch's built-in _weight_int4pack_mm (the path torchao benchmarks)
                cfg = config(group_size=128, int4_packing_format="tile_packed_to_4d")
            except TypeError:  # older torchao: no int4_packing_format argument, tinygemm by default
                cfg = config(group_size=128)
            tq.quantize_(layer, cfg)
        else:
            config = getattr(tq, "Int8WeightOnlyConfig", None) or tq.int8_weight_only
            nbytes = case["n"] * case["k"] + 2 * case["n"]
            tq.quantize_(layer, config())
        x = _inputs(case, device, dtype)
        return (lambda: layer(x)), {"weight_bytes": nbytes}

    return Provider(setup, devices=("cuda",))


def build_providers(device, dtype, formats):
    providers = {f"torch-{str(dtype).split('.')[-1]}": provider_torch(device, dtype)}
    for suffix in OURS:
        if OURS[suffix][0] in formats:
            providers[f"ours-{suffix}"] = provider_ours(suffix, device, dtype)
    if "nf4" in formats:
        providers["bnb-nf4-dq"] = provider_bnb_4bit(device, dtype)
    if "int8" in formats:
        providers["bnb-int8"] = provider_bnb_int8(device, dtype)
    if "int4" in formats:
        providers["torchao-int4-g128"] = provider_torchao("int4-g128", device, dtype)
    if "int8" in formats:
        providers["torchao-int8"] = provider_torchao("int8", device, dtype)
    return providers


def metrics_fn(copy_gbps, dtype):
    size = torch.tensor([], dtype=dtype).element_size()

    def metrics(row, ms):
        m, n, k = row["m"], row["n"], row["k"]
        gbps = (row.get("weight_bytes", 0) + size * (m * k + m * n)) / (ms * 1e-3) / 1e9
        return {"tflops": 2 * m * n * k / (ms * 1e-3) / 1e12, "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps}

    return metrics


def tune(cases, formats, dtype, table_path, log=print):
    """Time every candidate plan of our kernels per (format, case); write the fastest into the table."""
    from qlora_kit.kernels import matmul_4bit as mm
    from qlora_kit.kernels import planner as pl

    from qlora_kit import ops, registry

    device_name = pl.device_key(torch.device("cuda"))
    measured = []
    for fmt in [f for f in registry.format_names() if f in formats]:
        suffix = next(s for s, (f, _, act) in OURS.items() if f == fmt and act is None)
        config = tuple(sorted(OURS[suffix][1].items()))
        for case in cases:
            try:
                qw = our_weight(fmt, config, case["n"], case["k"], "cuda", dtype)
            except Skip as e:
                log(f"tune {fmt}: skipped ({e})")
                break
            x = _inputs(case, "cuda", dtype)
            code_table = bool(getattr(registry.get_format(fmt), "quant_type", ""))  # NF4 / FP4: 16-entry table
            luts = ("memory", "registers") if code_table else ("memory",)
            plans = [mm.MatmulPlan("dequant")] + [mm.MatmulPlan("gemm", 1, lut) for lut in luts]
            if case["m"] <= 64:
                plans += [mm.MatmulPlan("gemv", s, lut) for s in (1, 2, 4, 8) for lut in luts]
                plans += [mm.MatmulPlan("gemm", s, lut) for s in (2, 4) for lut in luts]
            timings = []
            for plan in plans:
                with mm.force_path(plan):
                    ms, _ = time_ms(lambda x=x, qw=qw: ops.quantized_linear(x, qw), "cuda")
                timings.append((ms, plan))
            ms, best = min(timings, key=lambda t: t[0])
            log(f"tune {fmt} m={case['m']} n={case['n']} k={case['k']}: {best} {ms:.4f} ms")
            measured.append(
                {
                    "device": device_name,
                    "format": fmt,
                    "m": case["m"],
                    "n": case["n"],
                    "k": case["k"],
                    "path": best.path,
                    "split_k": best.split_k,
                    "lut": best.lut,
                    "ms": ms,
                }
            )
    try:
        with open(table_path, encoding="utf-8") as f:
            old = json.load(f).get("plans", [])
    except FileNotFoundError:
        old = []
    key = lambda r: (r["device"], r["format"], r["m"], r["n"], r["k"])  # noqa: E731
    new_keys = {key(r) for r in measured}
    plans = [r for r in old if key(r) not in new_keys] + measured
    with open(table_path, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "plans": plans}, f, indent=1)
        f.write("\n")
    pl._read_table.cache_clear()
    log(f"wrote {len(measured)} measured plans to {table_path}")


def main(argv=None):
    from qlora_kit import registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and M in {1, 16} (CPU smoke run)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument(
        "--formats",
        default=",".join(registry.format_names()),
        help="comma-separated weight formats (default: all registered)",
    )
    parser.add_argument("--models", default=None, help="comma-separated models from shapes.py")
    parser.add_argument("--m", default=None, help="comma-separated row counts (default: the registry's)")
    parser.add_argument(
        "--graph",
        action="store_true",
        help="CUDA: time CUDA-graph replays (no launch overhead, but L2 stays warm across calls)",
    )
    parser.add_argument("--tune", action="store_true", help="CUDA: measure our paths and write the dispatch table")
    parser.add_argument("--table", default=None, help="dispatch table path (default: kernels/matmul_table.json)")
    parser.add_argument("--name", default=None, help="results file name (default: matmul_<device>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu --quick for a smoke run")
    if args.tune and args.device != "cuda":
        parser.error("--tune measures the Triton kernels and needs --device cuda")
    dtype = DTYPES[args.dtype]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    m_values = [int(m) for m in args.m.split(",")] if args.m else None
    cases = linear_cases(args.quick, args.models.split(",") if args.models else None, m_values)

    if args.tune:
        from qlora_kit.kernels import planner as pl

        tune(cases, formats, dtype, args.table or pl.table_path())

    copy_gbps = copy_bandwidth_gbps(args.device)
    print(f"device-to-device copy bandwidth: {copy_gbps:.1f} GB/s")
    providers = build_providers(args.device, dtype, formats)
    baseline = next(iter(providers))
    rows = run_providers(
        cases, providers, device=args.device, graph=args.graph, baseline=baseline, metrics=metrics_fn(copy_gbps, dtype)
    )
    meta = {
        "title": f"Quantized linear y = x W^T ({args.device}, {args.dtype})",
        "env": environment(args.device),
        "copy_bandwidth_gbps": round(copy_gbps, 1),
        "note": "ms = median; gbps = (weight + x + y bytes) / time; speedup = " + baseline + " ms / ms",
    }
    columns = [
        "model",
        "layer",
        "m",
        "n",
        "k",
        "provider",
        "status",
        "ms",
        "speedup",
        "tflops",
        "gbps",
        "pct_copy_bw",
        "weight_bytes",
        "timer",
        "impl",
        "reason",
    ]
    paths = write_results(args.name or f"matmul_{args.device}", rows, meta, columns=columns)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
