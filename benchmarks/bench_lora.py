"""LoRA / QLoRA training step cost: forward and forward + backward time, and peak memory.

Two levels, Llama-2-7B shapes, r=16, M=2048 tokens, bf16 compute:
  * one LoRA-wrapped linear layer (q/o 4096x4096, up/gate 11008x4096, down 4096x11008);
  * one Llama decoder block (attention + MLP, LoRA on all seven linears).
Providers (same run, same inputs):
  ours-fused     qlora_kit NF4 base + LoRA, fused Triton path (update added in the matmul epilogue)
  ours-fused-cublas  the same, but dense products (the "dequant" path of large M) use cuBLAS + one addmm
  ours-unfused   the same layers with fusion off: our NF4 matmul, then the adapter in PyTorch
  nf4-matmul     (layer level) the frozen NF4 matmul alone, input gradient included: the floor
  peft-bnb       PEFT LoRA over bitsandbytes Linear4bit (nf4, double quant), when installed
  ours-fused-int8 / ours-fused-int4 / int8-matmul / int4-matmul   the same over int8 (per channel) and
                 int4 (per group of 128) weight-only bases
  ours-fused-bf16 / peft-bf16   the same over a bf16 base (no quantization)
Targets on an H100 (issue 4): fused forward over NF4 <= 1.10x ``nf4-matmul``; fused forward + backward
>= 1.3x faster than ``peft-bnb``. Columns: ``speedup`` = peft-bnb ms / provider ms; ``vs_nf4_matmul`` =
fused ms / ``nf4-matmul`` ms (NF4 bases only); ``vs_base_matmul`` = fused ms / the matmul alone of the
same quantized base (int8, int4 rows).

``--device cpu`` runs the fused path through Triton's interpreter (QLORA_KIT_BACKEND=triton,
TRITON_INTERPRET=1, set before triton is imported): with ``--quick`` (tiny shapes) a smoke run that
checks every provider works, not a timing. Peak memory is measured on CUDA only (bytes allocated above
the inputs during one step).

Usage:
    python benchmarks/bench_lora.py                  # on a GPU
    python benchmarks/bench_lora.py --quick --device cpu   # CPU smoke run (the default device without a GPU)
Writes benchmarks/results/lora_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from torch import nn  # neither imports triton


def _device_from_argv(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return pre.parse_known_args(argv)[0].device


def _use_interpreter(device: str) -> None:
    """--device cpu always runs the Triton kernels, so on CPU they need the interpreter: set it before triton loads."""
    if device != "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            "--device cpu runs the Triton kernels in the interpreter, but triton was imported before "
            "TRITON_INTERPRET=1 could be set; run bench_lora.py as a script or export TRITON_INTERPRET=1 first"
        )
    os.environ["TRITON_INTERPRET"] = "1"


if __name__ == "__main__":
    _use_interpreter(_device_from_argv(sys.argv[1:]))  # must precede the first triton import

try:
    from benchmarks.harness import Provider, Skip, environment, run_providers, write_results
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from harness import Provider, Skip, environment, run_providers, write_results

LAYERS = {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # (N, K), Llama-2-7B
QUICK_LAYERS = {"down": (96, 160)}
BLOCK = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
QUICK_BLOCK = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextlib.contextmanager
def backend(name: str | None, dense: str | None = None):
    """Set QLORA_KIT_BACKEND (the CPU smoke run needs "triton" for the fused path) and the dense-GEMM
    choice of the fused LoRA (QLORA_KIT_LORA_DENSE_GEMM) for the duration of one call."""
    wanted = {"QLORA_KIT_BACKEND": name, "QLORA_KIT_LORA_DENSE_GEMM": dense}
    old = {k: os.environ.get(k) for k in wanted}
    for k, v in wanted.items():
        if v is not None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _step(module_fn, x, grad, mode):
    """The timed function: forward (no graph) or forward + backward to the adapters and the input."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                module_fn(x)

        return run

    def run():
        x.grad = None
        out = module_fn(x)
        out.backward(grad)

    return run


def _peak_mib(fn, device) -> float | None:
    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----- builders ------------------------------------------------------------------------------------------
def _float_model(case, device, dtype):
    torch.manual_seed(0)
    if case["level"] == "layer":
        n, k = case["n"], case["k"]
        return nn.Sequential(nn.Linear(k, n, bias=False)).to(device, dtype)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(**case["block"], torch_dtype=dtype, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device, dtype)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    return _Block(layer, rope)


class _Block(nn.Module):
    """A decoder layer called like a plain module: hidden states in, hidden states out."""

    def __init__(self, layer, rope):
        super().__init__()
        self.layer, self.rope = layer, rope

    def forward(self, h):
        pos = torch.arange(h.shape[1], device=h.device)[None]
        out = self.layer(h, position_embeddings=self.rope(h, pos), position_ids=pos)
        return out[0] if isinstance(out, tuple) else out


def _targets(case):
    return ["0"] if case["level"] == "layer" else TARGETS


def _inputs(case, device, dtype):
    torch.manual_seed(1)
    width = case["k"] if case["level"] == "layer" else case["block"]["hidden_size"]
    shape = (case["m"], width) if case["level"] == "layer" else (1, case["m"], width)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    return x


def _quant_config(base: str, dtype):
    """The weight-only config of a base: any registered weight format ("nf4", "int8" per channel, "int4" in
    groups of 128, ...), its config's defaults otherwise."""
    from qlora_kit import registry

    return registry.weight_config(base, compute_dtype=dtype, group_size=128)


def provider_ours(device, dtype, *, base: str, fused: bool, force: str | None, dense: str | None = None):
    """qlora_kit LoRA over a ``base`` ("bf16": the float layer itself, or a quantized format)."""

    def setup(case):
        import qlora_kit
        from qlora_kit.nn.lora_layers import LoraLayer

        model = _float_model(case, device, dtype)
        if base != "bf16":
            qlora_kit.quantize(model, _quant_config(base, dtype), filter_fn=lambda m, n: True)
        qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=case["r"], alpha=2 * case["r"], target_modules=_targets(case)))
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.fuse = fused
                nn.init.normal_(m.lora_B["default"].weight, std=0.01)
        x = _inputs(case, device, dtype)
        grad = torch.randn_like(model(x)).detach()

        def fn(inp):
            with backend(force if fused else None, dense):
                return model(inp)

        step = _step(fn, x, grad, case["mode"])
        return step, {"peak_mib": _peak_mib(step, device), "base": base}

    return Provider(setup)


def provider_base_matmul(device, dtype, force, base: str):
    """The frozen quantized matmul alone (input gradient included): the floor of the fused LoRA over ``base``."""

    def setup(case):
        if case["level"] != "layer":
            raise Skip("layer level only")
        import qlora_kit

        model = _float_model(case, device, dtype)
        qlora_kit.quantize(model, _quant_config(base, dtype), filter_fn=lambda m, n: True)
        x = _inputs(case, device, dtype)
        grad = torch.randn(case["m"], case["n"], device=device, dtype=dtype)

        def fn(inp):
            with backend(force):
                return model(inp)

        step = _step(fn, x, grad, case["mode"])
        return step, {"peak_mib": _peak_mib(step, device), "base": base}

    return Provider(setup)


def provider_peft(device, dtype, *, bnb: bool):
    def setup(case):
        try:
            import peft
        except ImportError:
            raise Skip("peft is not installed") from None
        model = _float_model(case, device, dtype)
        if bnb:
            try:
                import bitsandbytes as bnbm
            except ImportError:
                raise Skip("bitsandbytes is not installed") from None
            _to_bnb_4bit(model, bnbm, device, dtype)
        config = peft.LoraConfig(r=case["r"], lora_alpha=2 * case["r"], target_modules=_targets(case))
        model = peft.get_peft_model(model, config)
        x = _inputs(case, device, dtype)
        grad = torch.randn_like(model(x)).detach()
        step = _step(model, x, grad, case["mode"])
        return step, {"peak_mib": _peak_mib(step, device), "base": "bnb-nf4" if bnb else "bf16"}

    return Provider(setup)


def _to_bnb_4bit(model, bnbm, device, dtype):
    """Swap every nn.Linear for bitsandbytes' Linear4bit (nf4, double quantization), as QLoRA does."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                q = bnbm.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                       compute_dtype=dtype, compress_statistics=True, quant_type="nf4")  # fmt: skip
                q.weight = bnbm.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                              compress_statistics=True)  # fmt: skip
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to(device))


def cases(quick: bool, m: int, r: int) -> list[dict]:
    layers = QUICK_LAYERS if quick else LAYERS
    block = QUICK_BLOCK if quick else BLOCK
    m = 32 if quick and m == 2048 else m
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for name, (n, k) in layers.items():
            out.append({"level": "layer", "layer": name, "mode": mode, "m": m, "n": n, "k": k, "r": r})
        out.append({"level": "block", "layer": "llama-decoder", "mode": mode, "m": m, "r": r, "block": block})
    return out


def add_floor_ratios(rows: list[dict]) -> None:
    """Fused LoRA time over the time of its own base's matmul alone, same layer / mode / m.

    ``vs_nf4_matmul`` (the issue's target, <= 1.10) on NF4 rows only; ``vs_base_matmul`` on int8 / int4
    rows. Float bases have no quantized matmul to compare with and get neither.
    """
    from qlora_kit import registry

    for row in rows:
        base = row.get("base")
        if not row["provider"].startswith("ours-fused") or row["status"] != "ok" or row["level"] != "layer":
            continue
        if base not in registry.format_names():
            continue
        floor = next((r for r in rows if r["provider"] == f"{base}-matmul" and r["status"] == "ok"
                      and all(r[k] == row[k] for k in ("layer", "mode", "m"))), None)  # fmt: skip
        if floor is not None:
            row["vs_nf4_matmul" if base == "nf4" else "vs_base_matmul"] = row["ms"] / floor["ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run through the interpreter)")
    parser.add_argument("--m", type=int, default=2048, help="tokens per step (rows)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--name", default=None, help="results file name (default: lora_<device>)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; use --quick --device cpu for a smoke run")
    _use_interpreter(device)  # a no-op when run as a script (already set); main() called from Python
    # bf16 on a GPU; fp32 on CPU (the interpreter's bf16 dot is wrong and CPU bf16 matmuls are slow)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    force = "triton" if device == "cpu" else None  # CPU: run the Triton kernels in the interpreter
    providers = {
        "ours-fused": provider_ours(device, dtype, base="nf4", fused=True, force=force),
        "ours-fused-cublas": provider_ours(device, dtype, base="nf4", fused=True, force=force, dense="cublas"),
        "ours-unfused": provider_ours(device, dtype, base="nf4", fused=False, force=None),
        "nf4-matmul": provider_base_matmul(device, dtype, force, "nf4"),
        "peft-bnb": provider_peft(device, dtype, bnb=True),
        "ours-fused-int8": provider_ours(device, dtype, base="int8", fused=True, force=force),
        "int8-matmul": provider_base_matmul(device, dtype, force, "int8"),
        "ours-fused-int4": provider_ours(device, dtype, base="int4", fused=True, force=force),
        "int4-matmul": provider_base_matmul(device, dtype, force, "int4"),
        "ours-fused-bf16": provider_ours(device, dtype, base="bf16", fused=True, force=force),
        "peft-bf16": provider_peft(device, dtype, bnb=False),
    }
    rows = run_providers(cases(args.quick, args.m, args.r), providers, device=device, baseline="peft-bnb")
    add_floor_ratios(rows)
    meta = {"title": "LoRA layer and decoder block: forward / forward+backward", "env": environment(device),
            "dtype": str(dtype), "quick": args.quick}  # fmt: skip
    columns = ["level", "layer", "mode", "m", "n", "k", "r", "provider", "base", "status", "ms", "speedup",
               "vs_nf4_matmul", "vs_base_matmul", "peak_mib", "reason"]  # fmt: skip
    paths = write_results(args.name or f"lora_{device}", rows, meta, columns=columns)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
