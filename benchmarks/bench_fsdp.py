"""Memory model of FSDP2 QLoRA: per-GPU peak for a Llama across N GPUs, from our formats' real byte counts.

    python benchmarks/bench_fsdp.py --model llama-70b --gpus 2 --gpu-mem 48
    python benchmarks/bench_fsdp.py --model llama-70b --gpus 2 --gpu-mem 24 --cpu-offload

The base: every linear layer of every decoder layer becomes a format object built on the meta device
(``Format.from_metadata``), so the bytes are those of the tensors the format really stores (codes,
scales, nested scales); embeddings, norms and the output head stay in the compute dtype (``quantize``'s
default filter). Sharding: FSDP2 splits each parameter along dim 0 with ``torch.chunk`` (rank 0 holds
the largest chunk), as the 2-process CPU test measures (tests/test_fsdp.py checks this model against
the local shards of a real run). Adapters: LoRA A (r x in) and B (out x r) on every linear layer, fp32;
gradients fp32; AdamW two fp32 moments; all sharded. Working set: FSDP2 gathers one decoder layer's
packed bytes (and prefetches the next), keeps the final norm + output head gathered from the end of
forward into backward, and the largest weight may be dequantized into a compute-dtype buffer.
Activations with checkpointing: each layer's input kept (tokens x hidden), one layer recomputed in full
(tokens x (12 hidden + 3 intermediate)) and the fp32 logits with their gradient (3 x tokens x vocab x 4),
the estimate ``qlora-kit finetune --dry-run`` uses. Runtime overhead (CUDA context, NCCL, allocator
slack) is a flat assumption, printed.

Config sources: Llama-3.1-70B and -8B ``config.json`` on the Hugging Face Hub (meta-llama/Llama-3.1-70B,
meta-llama/Llama-3.1-8B): hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, vocab_size, tie_word_embeddings=false.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results" / "fsdp_memory.md"
RECIPE = "llama70b_fsdp_qlora"
OVERHEAD_GIB = 2.0  # CUDA context + NCCL buffers + allocator fragmentation (assumption)


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """One decoder layer's linear layers as (out_features, in_features)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (self.intermediate, h),
            "up_proj": (self.intermediate, h),
            "down_proj": (h, self.intermediate),
        }


MODELS = {
    "llama-70b": LlamaShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
    "llama-8b": LlamaShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
}


def shape_of(config) -> LlamaShape:
    """A :class:`LlamaShape` from a transformers ``LlamaConfig`` (for the tiny model of the tests)."""
    return LlamaShape(
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        bool(config.tie_word_embeddings),
    )


def format_meta(quantization: str, shape: tuple[int, int], blocksize=64, double_quant=True, group_size=128):
    """Metadata of a ``quantization`` weight of ``shape`` with the knobs its format's config has."""
    options = {"blocksize": blocksize, "double_quant": double_quant, "group_size": group_size}
    meta = {"format": quantization, "shape": list(shape)}
    return meta | {k: v for k, v in options.items() if k in _config_fields(quantization)}


def _config_fields(quantization: str) -> dict:
    """The fields of the weight config of registered format ``quantization`` (what the format's metadata holds)."""
    from qlora_kit import registry

    return registry.weight_config(quantization).__dataclass_fields__


def chunk_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 chunk FSDP2 gives ``rank`` (``torch.chunk``: chunks of ceil(rows / world))."""
    size = math.ceil(rows / world)
    return max(0, min(size, rows - rank * size))


def tensor_rank_bytes(t: torch.Tensor, world: int, rank: int) -> int:
    if t.dim() == 0:
        return t.element_size()
    per_row = math.prod(t.shape[1:]) * t.element_size()
    return chunk_rows(t.shape[0], world, rank) * per_row


def quantized_linear_bytes(quantization: str, shape, world: int = 1, rank: int = 0, **kw) -> dict[str, int]:
    """{"sharded": bytes of the format's parameters held by ``rank``, "replicated": its buffers}, measured on
    the tensors the format class itself allocates (on the meta device)."""
    from qlora_kit.formats.base import get_format

    cls = get_format(quantization)  # imported outside the meta context (module-level tables need real data)
    with torch.device("meta"):
        q = cls.from_metadata(format_meta(quantization, shape, **kw))
    sharded = sum(tensor_rank_bytes(p, world, rank) for p in q.parameters())
    replicated = sum(b.numel() * b.element_size() for b in q.buffers())
    return {"sharded": sharded, "replicated": replicated, "total": q.nbytes()}


def base_bytes(m: LlamaShape, quantization: str, world: int, rank: int, **kw) -> dict[str, int]:
    """Bytes of the base ``rank`` holds: packed (its shards of codes + scales, plus replicated buffers) and
    float (its shards of embeddings, norms and output head, 2 bytes each)."""
    packed = 0
    for shape in m.linears().values():
        b = quantized_linear_bytes(quantization, shape, world, rank, **kw)
        packed += b["sharded"] + b["replicated"]
    packed *= m.layers
    emb = chunk_rows(m.vocab, world, rank) * m.hidden * 2
    norms = (2 * m.layers + 1) * chunk_rows(m.hidden, world, rank) * 2
    return {"packed": packed, "float": emb * (1 if m.tied else 2) + norms}


def lora_params(m: LlamaShape, r: int) -> int:
    return m.layers * sum(r * (o + i) for o, i in m.linears().values())


def largest_layer_packed(m: LlamaShape, quantization: str, **kw) -> int:
    return sum(quantized_linear_bytes(quantization, s, **kw)["total"] for s in m.linears().values())


def activation_bytes(m: LlamaShape, tokens: int, dtype_bytes: int = 2) -> int:
    per_layer = tokens * (12 * m.hidden + 3 * m.intermediate) * dtype_bytes
    return m.layers * tokens * m.hidden * dtype_bytes + per_layer + 3 * tokens * m.vocab * 4


def peak(m: LlamaShape, args, recipe) -> dict[str, float]:
    """Per-GPU bytes by part (rank 0, the largest shard) and where they live."""
    kw = dict(blocksize=recipe.blocksize, double_quant=recipe.double_quant, group_size=recipe.group_size)
    world, q = args.gpus, recipe.quantization
    base = base_bytes(m, q, world, 0, **kw)
    n_lora = lora_params(m, recipe.lora.r)
    adapters = math.ceil(n_lora / world) * 4
    parts = {
        "base: packed shards": base["packed"],
        "base: float shards (embeddings, norms, head)": base["float"],
        "adapters (fp32 shards)": adapters,
        "adapter gradients (fp32 shards)": adapters,
        "AdamW state (2 x fp32 shards)": 2 * adapters,
    }
    on_gpu = dict.fromkeys(parts, not args.cpu_offload)
    largest = max(o * i for o, i in m.linears().values())
    head = m.vocab * m.hidden * 2
    working = {
        "gathered: 2 decoder layers (packed) + head": (2 * largest_layer_packed(m, q, **kw) + head) * (world > 1),
        "dequantized weight buffer (largest matrix, bf16)": largest * 2,
        f"activations (seq {recipe.seq_len} x batch {recipe.batch_size}, checkpointing)": activation_bytes(
            m, recipe.seq_len * recipe.batch_size
        ),
        "runtime overhead (assumed)": OVERHEAD_GIB * GIB,
    }
    parts.update(working)
    on_gpu.update(dict.fromkeys(working, True))
    return {"parts": parts, "on_gpu": on_gpu, "lora_params": n_lora}


def loading_bytes(m: LlamaShape, recipe) -> int:
    """Host bytes of one process while it loads: every process reads the checkpoint quantizing layer by layer
    (``qlora_kit.hf``'s quantizer), so it holds the whole packed model plus one float (bf16) matrix, never the
    float model; ``fully_shard`` then keeps this process's shard (on its GPU, or in CPU memory with offload)."""
    kw = dict(blocksize=recipe.blocksize, double_quant=recipe.double_quant, group_size=recipe.group_size)
    whole = base_bytes(m, recipe.quantization, 1, 0, **kw)
    return whole["packed"] + whole["float"] + max(o * i for o, i in m.linears().values()) * 2


def table(m: LlamaShape, args, recipe) -> tuple[str, bool]:
    p = peak(m, args, recipe)
    gpu = sum(v for k, v in p["parts"].items() if p["on_gpu"][k])
    cpu = sum(v for k, v in p["parts"].items() if not p["on_gpu"][k])
    fits = gpu <= args.gpu_mem * GIB
    lines = [
        f"### {args.model} · {args.gpus} x {args.gpu_mem:g} GiB · {recipe.quantization}"
        + (" + double quant" if recipe.double_quant and "double_quant" in _config_fields(recipe.quantization) else "")
        + f" · LoRA r={recipe.lora.r} all-linear ({p['lora_params'] / 1e6:.0f}M params)"
        + (" · CPU offload" if args.cpu_offload else ""),
        "",
        "| per GPU (rank 0) | GiB | where |",
        "|---|---:|---|",
    ]
    for k, v in p["parts"].items():
        lines.append(f"| {k} | {v / GIB:.2f} | {'GPU' if p['on_gpu'][k] else 'CPU'} |")
    lines.append(f"| **peak on each GPU** | **{gpu / GIB:.2f}** | of {args.gpu_mem:g} GiB |")
    if cpu:
        lines.append(f"| CPU memory per process (offloaded) | {cpu / GIB:.2f} | |")
    lines.append(f"| CPU memory per process while loading | {loading_bytes(m, recipe) / GIB:.2f} | then the shard |")
    verdict = "fits" if fits else "does NOT fit"
    lines += ["", f"**{verdict}** ({gpu / GIB:.1f} GiB peak per GPU vs {args.gpu_mem:g} GiB)", ""]
    return "\n".join(lines), fits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-70b", choices=sorted(MODELS))
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--gpu-mem", type=float, default=48.0, help="GiB per GPU")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--recipe", default=RECIPE, help="the recipe whose settings are modelled")
    parser.add_argument("--write", action="store_true", help=f"write the standard table set to {RESULTS}")
    args = parser.parse_args(argv)
    from qlora_kit.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if not args.write:
        text, _ = table(MODELS[args.model], args, recipe)
        print(text)
        return 0
    out = [
        "# FSDP2 QLoRA memory model (benchmarks/bench_fsdp.py)",
        "",
        f"Recipe `{args.recipe}` (seq {recipe.seq_len}, batch {recipe.batch_size} per GPU, gradient checkpointing,"
        f" bf16 compute). Regenerate: `python benchmarks/bench_fsdp.py --write`. A model, not a measurement:"
        " its per-rank packed-base bytes are checked against the local shards of a 2-process run in"
        " tests/test_fsdp.py; the working-set and overhead rows are estimates.",
        "",
    ]
    for gpus, mem, offload in ((2, 48, False), (2, 24, False), (2, 24, True), (1, 80, False)):
        a = argparse.Namespace(model=args.model, gpus=gpus, gpu_mem=mem, cpu_offload=offload)
        out.append(table(MODELS[args.model], a, recipe)[0])
    RESULTS.write_text("\n".join(out))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
