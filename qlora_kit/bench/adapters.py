"""The QLoRA adapters section: qlora_kit's NF4 base + LoRA vs PEFT's LoRA, fine-tuning the reference LM."""

from __future__ import annotations

import time

import torch

from ..eval.perplexity import perplexity
from .measure import installed_version, sync
from .methods import Method, Section, bnb_dequantized, compute_dtype_for, run_rows


def _adapter_methods(r: int, cd: torch.dtype, bnb: bool, missing: list[str]) -> list[Method]:
    """Ours (NF4 base, blocks of 64 with double quant, + add_lora) and PEFT's LoRA when installed."""
    import qlora_kit

    def ours(model, ctx):
        qlora_kit.quantize(model, qlora_kit.NF4Config(blocksize=64, double_quant=True, compute_dtype=cd))
        torch.manual_seed(0)
        return qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear"))

    def with_peft(model, ctx):
        import peft

        if bnb:
            model = bnb_dequantized("nf4")(model, ctx)
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
        return peft.get_peft_model(model, cfg)

    methods = [Method("qlora_kit NF4 + LoRA", "weight-only", ours)]
    if installed_version("peft"):
        base = "bitsandbytes NF4 weights (dequantized)" if bnb else "the float base (bitsandbytes not installed)"
        methods.append(Method("PEFT LoRA (peer)", "peer", with_peft, sized=False, note=f"PEFT LoRA on {base}"))
    else:
        missing.append("peft")
    return methods


def bench_adapters(rm, quick: bool, device: str, cache_dir, log, missing: list[str]) -> Section:
    """QLoRA fine-tuning: qlora_kit's NF4 base + LoRA vs PEFT's LoRA on the bitsandbytes NF4 weights (the same
    base numbers, dequantized) or, without bitsandbytes, on the float base; same rank, data, steps and lr."""
    ref = rm.reference_lm(quick, cache_dir, device)
    spec = ref.spec
    steps, lr, r = (30, 1e-3, 8) if quick else (300, 3e-4, 16)
    max_windows = 96 if quick else None
    bnb = bool(installed_version("bitsandbytes"))

    def ppl(model):
        return perplexity(model, ref.corpus.eval_docs, context=spec.context, batch_size=16, max_windows=max_windows)

    def evaluate(model):
        before = ppl(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        rm.train_lm(model, spec, ref.corpus, steps=steps, lr=lr)
        sync(device)
        seconds = time.perf_counter() - t0
        after = ppl(model)
        return {
            "ppl_before": round(before.ppl, 4),
            "ppl_after": round(after.ppl, 4),
            "trainable": trainable,
            "train_seconds": round(seconds, 2),
            "step_ms": round(1000 * seconds / steps, 1),
            "_protocol": after.protocol,
        }

    methods = _adapter_methods(r, compute_dtype_for(device), bnb, missing)
    section = Section(
        key="adapters",
        title="QLoRA adapters: fine-tuning the Llama LM (qlora_kit vs PEFT)",
        protocol=[],
        columns=[
            ("method", "method", "s"),
            ("ppl_before", "perplexity before", ".4f"),
            ("ppl_after", f"perplexity after {steps} steps", ".4f"),
            ("trainable", "trainable params", "d"),
            ("train_seconds", "train s", ".2f"),
            ("step_ms", "ms / step", ".1f"),
            ("bits", "base bits/param", ".2f"),
            ("peak_mem_bytes", "peak mem", "bytes"),
        ],
    )
    run_rows(section, methods, ref.model, {}, device, evaluate, log, lambda p: f"perplexity: {p}")
    section.protocol += [
        f"both: LoRA r={r}, alpha={2 * r}, no dropout, every Linear but the output head, A Kaiming-uniform and "
        f"B = 0; then {steps} AdamW steps (lr {lr}, warmup + cosine, batch {spec.batch} x {spec.context} tokens "
        "from the training files, the reference LM's own training loop); train s includes the forward, backward "
        "and optimiser of every step",
        "qlora_kit: NF4 base (blocks of 64, double quant) from qlora_kit.quantize, adapters from qlora_kit.add_lora; "
        "PEFT: get_peft_model on a model whose Linear weights are "
        + ("bitsandbytes' NF4 quantize-dequantize (the same base numbers, held in float)" if bnb else "float"),
    ]
    section.notes += [f"{m.name}: {m.note}" for m in methods if m.note]
    return section
