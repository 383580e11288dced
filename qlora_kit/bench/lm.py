"""The Llama LM section: every method on the reference LM, perplexity by :func:`qlora_kit.eval.perplexity`
(the protocol ``qlora-kit eval`` states too), KL to float, lm-eval's byte perplexity when installed, and
throughput; plus the QAT rows with their same-training control."""

from __future__ import annotations

import copy

import torch

from ..eval.perplexity import perplexity, windows_of
from .measure import decode_tokens_per_s, installed_version, prefill_tokens_per_s
from .methods import F32, Method, Section, compute_dtype_for, methods_for, run_rows

CONTROL = "float + same training (control)"
CONTROL_RTN = "control + int4 g128 RTN"
QAT_NAME = "int4 g128 QAT"

LM_PLOTS = [
    {
        "kind": "quality_vs_bits",
        "title": "Perplexity vs bits per parameter (post-training methods)",
        "x": "bits",
        "y": "ppl",
        "xlabel": "bits per quantized parameter (float = 32)",
        "ylabel": "held-out perplexity",
    },
    {
        "kind": "throughput_vs_batch",
        "title": "Decode throughput vs batch",
        "key": "decode_tok_s",
        "xlabel": "batch size",
        "ylabel": "decode tokens/s",
    },
]


def lm_evaluator(ref, quick: bool, device: str, batches: tuple[int, ...], new_tokens: int):
    """``(evaluate(model) -> row values, KL windows)`` for the reference LM ``ref``.

    Perplexity on the held-out files (the first 96 windows in quick runs), KL to the float model on the first
    32 full windows, lm-eval's byte perplexity when lm-eval is installed, prefill and decode throughput.
    """
    spec = ref.spec
    max_windows = 96 if quick else None
    kl_windows = torch.stack(
        [w for w in windows_of(ref.corpus.eval_docs, spec.context, max_windows) if w.numel() == spec.context][:32]
    ).to(device)
    with torch.no_grad():
        ref_logp = ref.model(input_ids=kl_windows).logits.float().log_softmax(-1)

    def evaluate(model):
        res = perplexity(model, ref.corpus.eval_docs, context=spec.context, batch_size=16, max_windows=max_windows)
        out = {"ppl": round(res.ppl, 4)}
        out["_protocol"] = res.protocol
        with torch.no_grad():
            logp = model(input_ids=kl_windows).logits.float().log_softmax(-1)
        out["kl_milli"] = round(1000 * float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()), 4)
        if installed_version("lm_eval"):
            from ..eval.lm_eval_bridge import byte_tokenizer, lm_eval_perplexity

            texts = ref.corpus.eval_texts[: 4 if quick else None]
            out["lm_eval_byte_ppl"] = round(
                lm_eval_perplexity(model, byte_tokenizer(), texts, context=spec.context)["byte_perplexity"], 4
            )
        out["prefill_tok_s"] = round(prefill_tokens_per_s(model, batches[-1], spec.context, device), 1)
        out["decode_tok_s"] = {str(b): round(decode_tokens_per_s(model, b, 16, new_tokens, device), 1) for b in batches}
        return out

    return evaluate, kl_windows


def training_methods(rm, ref, quick: bool, cd: torch.dtype) -> list[Method]:
    """The rows that train: the float control (same steps and data as QAT), that control + int4 g128 RTN, and
    int4 g128 QAT (plus QAT with LSQ-learned scales in full runs)."""
    import qlora_kit

    from ..qat import QATConfig, convert_qat, prepare_qat

    spec = ref.spec
    steps, lr = (60, 1e-3) if quick else (600, 3e-4)

    def qat_with(learnable: bool):
        cfg = QATConfig(qlora_kit.Int4WeightConfig(group_size=128, compute_dtype=F32), learnable_scales=learnable)

        def qat(model, ctx):
            prepare_qat(model, cfg)
            model.train()
            rm.train_lm(model, spec, ref.corpus, steps=steps, lr=lr)
            model.eval()
            convert_qat(model)
            if cd != F32:  # QAT trains in fp32; the converted layers then compute in the bench's dtype
                for m in model.modules():
                    if hasattr(m, "qweight"):
                        m.compute_dtype = cd
            return model

        return qat

    def control(model, ctx):
        model.train()
        rm.train_lm(model, spec, ref.corpus, steps=steps, lr=lr)
        model.eval()
        ctx["control"] = copy.deepcopy(model)
        return model

    def control_rtn(model, ctx):
        config = qlora_kit.Int4WeightConfig(group_size=128, compute_dtype=cd)
        return qlora_kit.quantize(copy.deepcopy(ctx["control"]), config)

    out = [
        Method(
            CONTROL,
            "control",
            control,
            note=f"the float model trained for the same {steps} steps as QAT (same data, lr "
            f"{lr}): QAT's baseline, since the extra training alone lowers perplexity",
        ),
        Method(CONTROL_RTN, "control", control_rtn, note="that trained control, then int4 g128 RTN"),
        Method(
            QAT_NAME,
            "qat",
            qat_with(False),
            note=f"prepare_qat(int4 g128, straight-through, scales from round-to-nearest) + the same "
            f"{steps} steps, then convert_qat; quant time includes the training",
        ),
    ]
    if not quick:
        note = "as above with LSQ-learned int4 scales and zero points"
        out.append(Method(QAT_NAME + " LSQ", "qat", qat_with(True), note=note))
    return out


def _lm_section(ref, batches: tuple[int, ...]) -> Section:
    params = sum(p.numel() for p in ref.model.parameters()) / 1e6
    return Section(
        key="lm",
        title=f"Llama LM on Python's standard library ({params:.2f}M parameters, byte tokens)",
        protocol=[],
        columns=[
            ("method", "method", "s"),
            ("ppl", "perplexity", ".4f"),
            ("kl_milli", "KL to float (1e-3)", ".3f"),
            ("lm_eval_byte_ppl", "lm-eval byte ppl", ".4f"),
            ("bits", "bits/param", ".2f"),
            ("size_bytes", "weights", "bytes"),
            ("peak_mem_bytes", "peak mem", "bytes"),
            ("quant_seconds", "quant time s", ".2f"),
            ("prefill_tok_s", f"prefill tok/s (b{batches[-1]})", ".0f"),
            ("decode_tok_s", "decode tok/s", "dict"),
        ],
        info={k: v for k, v in ref.info.items() if k != "spec"} | {"spec": ref.info.get("spec")},
    )


def _lm_protocol(calib, kl_windows, batches, new_tokens: int, context: int, device: str) -> list[str]:
    peak = (
        "CUDA peak allocated growth"
        if device == "cuda"
        else "growth of the process's peak resident set after returning free heap pages to the OS (memory the "
        "allocator still holds is reused without growth)"
    )
    return [
        f"calibration (GPTQ, AWQ, SmoothQuant): {len(calib)} batches of {calib[0].shape[0]}x{calib[0].shape[1]} "
        "tokens from the training files",
        f"KL to float: mean over tokens of KL(float || method) of the next-token distributions, first "
        f"{kl_windows.shape[0]} full windows, in units of 1e-3 nats (the trained control and QAT rows moved away from "
        "the original float model on purpose)",
        f"throughput: prefill = one forward of batch {batches[-1]} x {context} tokens (median of 3); decode = "
        f"greedy, KV cache, {new_tokens} new tokens after a 16-token prompt, by batch size",
        f"peak mem: {peak} while copying, quantizing and evaluating the model",
    ]


def bench_lm(rm, quick: bool, device: str, cache_dir, log, missing: list[str]) -> Section:
    """The Llama LM section: every method (and peer) on the reference LM ``rm.reference_lm``.

    Args:
        rm: the reference-models module (:mod:`qlora_kit.bench.reference_models`).
        quick: small model and data.
        device: "cpu" or "cuda".
        cache_dir: reference-model cache (None: the default).
        log: prints a progress line.
        missing: peers that are not installed are appended here.
    """
    ref = rm.reference_lm(quick, cache_dir, device)
    calib = [b.to(device) for b in ref.calib_batches(batches=8 if quick else 32, batch_size=4 if quick else 8)]
    batches = (1, 4) if quick else (1, 8, 32)
    new_tokens = 32 if quick else 128
    evaluate, kl_windows = lm_evaluator(ref, quick, device, batches, new_tokens)
    methods = methods_for(device, missing) + training_methods(rm, ref, quick, compute_dtype_for(device))
    section = _lm_section(ref, batches)
    ctx = {"calib": calib, "device_arg": device if device == "cuda" else None}
    held_out = ", ".join(ref.corpus.eval_names)
    protocol = lambda p: f"perplexity: {p}; held-out files: {held_out}"  # noqa: E731
    run_rows(section, methods, ref.model, ctx, device, evaluate, log, protocol)
    section.protocol += _lm_protocol(calib, kl_windows, batches, new_tokens, ref.spec.context, device)
    if not installed_version("lm_eval"):
        section.notes.append("lm-eval is not installed: the lm-eval column is empty (pip install 'lm-eval>=0.4').")
    section.notes += [f"{m.name}: {m.note}" for m in methods if m.note and m.apply is not None]
    section.bars = lm_bars(section.rows)
    section.plots = copy.deepcopy(LM_PLOTS)
    return section


def _ratio_bar(name: str, value: float | None, limit: float, detail: str) -> dict:
    passed = value is not None and value <= limit
    return {"name": name, "passed": passed, "detail": detail}


def find_row(rows: list[dict], name: str) -> dict | None:
    """The row of method ``name``, or None."""
    return next((r for r in rows if r["method"] == name), None)


def lm_bars(rows: list[dict]) -> list[dict]:
    """The issue's expected results, checked on the measured numbers."""
    bars = []
    f = find_row(rows, "float")
    if f is None:
        return bars
    fp = f["ppl"]

    def rel(name):
        r = find_row(rows, name)
        return None if r is None else (r["ppl"] - fp) / fp

    r8 = rel("int8 RTN")
    bars.append(
        _ratio_bar(
            "int8 weight-only perplexity within 0.5% of float",
            r8,
            0.005,
            f"{100 * r8:+.3f}%" if r8 is not None else "not run",
        )
    )
    ours, bnb = find_row(rows, "nf4 RTN"), find_row(rows, "bnb nf4 (peer)")
    if ours and bnb:
        d = abs(ours["ppl"] - bnb["ppl"]) / bnb["ppl"]
        bars.append(
            _ratio_bar(
                "our NF4 equals bitsandbytes NF4 (perplexity within 0.1%)",
                d,
                0.001,
                f"ours {ours['ppl']:.4f} vs bitsandbytes {bnb['ppl']:.4f}",
            )
        )
    rtn = find_row(rows, "int4 g128 RTN")
    for name in ("int4 g128 GPTQ", "int4 g128 HQQ", "int4 g128 AWQ"):
        r = find_row(rows, name)
        if rtn and r:
            bars.append(
                {
                    "name": f"{name.split()[-1]} beats RTN at int4 g128",
                    "passed": r["ppl"] < rtn["ppl"],
                    "detail": f"{r['ppl']:.4f} vs RTN {rtn['ppl']:.4f}",
                }
            )
    sq = rel("W8A8 SmoothQuant")
    if sq is not None:
        bars.append(_ratio_bar("W8A8 with SmoothQuant within 1% of float", sq, 0.01, f"{100 * sq:+.3f}%"))
    qat, ctrl, ctrl_rtn = find_row(rows, QAT_NAME), find_row(rows, CONTROL), find_row(rows, CONTROL_RTN)
    if qat and ctrl and ctrl_rtn:
        # same training budget on both sides: (train, then RTN) vs QAT, both against the trained float model
        gap = ctrl_rtn["ppl"] - ctrl["ppl"]
        recovered = (ctrl_rtn["ppl"] - qat["ppl"]) / gap if gap > 0 else float("nan")
        bars.append(
            {
                "name": "QAT recovers at least half of the int4 RTN perplexity gap",
                "passed": bool(recovered >= 0.5),
                "detail": f"recovered {100 * recovered:.0f}% (float trained {ctrl['ppl']:.4f}, + RTN "
                f"{ctrl_rtn['ppl']:.4f}, QAT {qat['ppl']:.4f}; the same training for all three)",
            }
        )
    return bars
