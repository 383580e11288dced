"""Peak memory and time of loading a Llama-shaped ~1.1B checkpoint to NF4 on the CPU, three ways.

- ours: ``from_pretrained(dir, quantization_config=qlora_kit.hf.QuantizationConfig(NF4Config()))``
  (each layer quantized as its weight is read from the shards);
- bnb: ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant))``;
- load_then_quantize: ``from_pretrained(dir, dtype=bfloat16)`` then ``qlora_kit.quantize(model, NF4Config())``.

The checkpoint (TinyLlama-1.1B shapes, random bf16 weights, 1 GB safetensors shards) is written to a temporary
directory. Each variant runs in its own Python subprocess, which reports its peak RSS (``VmHWM``, after
and including the imports; the RSS after imports is recorded too) and its load time. Variants are interleaved
round by round and the load average is recorded before each run.

Usage:
    python benchmarks/bench_load.py [--rounds 1] [--keep DIR]
Writes benchmarks/results/load_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, write_results  # noqa: E402

VARIANTS = ("ours", "bnb", "load_then_quantize")
SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip


def write_checkpoint(directory: Path, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 TinyLlama-shaped weights as sharded safetensors + config.json; returns the parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shards, current, size, n_params = [], {}, 0, 0
    for key, shape in shapes.items():
        t = (
            (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            if len(shape) > 1
            else torch.ones(shape, dtype=torch.bfloat16)
        )
        current[key], size, n_params = t, size + t.numel() * 2, n_params + t.numel()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(directory)
    return n_params


def _rss_mb() -> float:
    """Peak RSS of this process in MiB: VmHWM, which starts afresh at exec (ru_maxrss is carried over from the
    parent across execve on Linux, so a parent that once held more would mask a child's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class PeakSampler:
    """Peaks of RssAnon and RssFile (MiB) from /proc/self/status, sampled every ``interval`` s in a thread.

    The kernel keeps a peak only for the total (VmHWM); the split shows what holds it: anonymous memory (the
    model's tensors) or file pages (the memory-mapped safetensors shards, which the kernel can drop)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peaks, self._stop = interval, {"RssAnon": 0.0, "RssFile": 0.0, "VmRSS": 0.0}, False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in self.peaks:
                self.peaks[key] = max(self.peaks[key], int(line.split()[1]) / 1024)

    def _run(self) -> None:
        while not self._stop:
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.sample()


def run_variant(variant: str, directory: str) -> dict:
    """Load in this process; print and return {seconds, peak_rss_mb (VmHWM), rss_after_imports_mb, the sampled
    peaks of RssAnon / RssFile / VmRSS, quantized_layers}. The imports come first, in every variant."""
    import bitsandbytes  # noqa: F401
    import transformers  # noqa: F401

    import qlora_kit.hf  # noqa: F401

    base = _rss_mb()
    with PeakSampler() as peaks:
        seconds, n = _load(variant, directory)
    out = {"variant": variant, "seconds": seconds, "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": base}
    out.update({f"peak_{k}_mb": round(v, 1) for k, v in peaks.peaks.items()})
    out["quantized_layers"] = n
    print("RESULT " + json.dumps(out), flush=True)
    return out


def _load(variant: str, directory: str) -> tuple[float, int]:
    """(seconds, quantized layers) of one variant's load, as a user writes it."""
    import transformers

    import qlora_kit
    import qlora_kit.hf
    from qlora_kit.nn.quantized import QuantizedLayer

    t0 = time.perf_counter()
    if variant == "ours":
        qc = qlora_kit.hf.QuantizationConfig(qlora_kit.NF4Config())
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=qc, dtype=torch.bfloat16
        )
        n = sum(isinstance(m, QuantizedLayer) for m in model.modules())
    elif variant == "bnb":
        import bitsandbytes as bnb

        qc = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu"
        )
        n = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        qlora_kit.quantize(model, qlora_kit.NF4Config())
        n = sum(isinstance(m, QuantizedLayer) for m in model.modules())
    return time.perf_counter() - t0, n


def _spawn(variant: str, directory: Path) -> dict:
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--variant", variant, "--dir", str(directory)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "loadavg_1min_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", help="write the checkpoint here (reused if it exists) instead of a temp dir")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.keep or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "config.json").exists():
            t0 = time.perf_counter()
            n_params = write_checkpoint(directory)
            print(f"wrote {n_params / 1e9:.3f} B params in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                row = {"round": r, **_spawn(variant, directory)}
                print(row, flush=True)
                rows.append(row)
    summary = _summary(rows)
    meta = {"title": "Load a 1.1B Llama-shaped bf16 checkpoint to NF4 on the CPU", "summary": summary}
    meta["command"] = (
        "python benchmarks/bench_load.py " + f"--rounds {args.rounds}" + (f" --keep {args.keep}" if args.keep else "")
    )
    meta["env"] = environment("cpu")
    write_results("load_cpu", rows, meta)
    print(json.dumps(summary, indent=1))


def _summary(rows: list[dict]) -> dict:
    best = {v: min((r for r in rows if r["variant"] == v), key=lambda r: r["peak_rss_mb"]) for v in VARIANTS}
    fastest = {v: min(r["seconds"] for r in rows if r["variant"] == v) for v in VARIANTS}
    ours = best["ours"]["peak_rss_mb"]
    split = {
        f"{v}_peak_anon_file_mb": [round(best[v]["peak_RssAnon_mb"]), round(best[v]["peak_RssFile_mb"])]
        for v in VARIANTS
    }
    return {
        **split,
        "peak_rss_ours_over_bnb": round(ours / best["bnb"]["peak_rss_mb"], 3),
        "peak_rss_ours_over_load_then_quantize": round(ours / best["load_then_quantize"]["peak_rss_mb"], 3),
        "time_ours_over_bnb": round(fastest["ours"] / fastest["bnb"], 3),
        "targets": "peak <= 1.1x bnb, <= 0.4x load-then-quantize, time <= 1.5x bnb",
    }


if __name__ == "__main__":
    main()
