"""The all-MiniLM-L6-v2 section: every method on real pretrained weights, quality as the cosine of sentence
embeddings against the float model's."""

from __future__ import annotations

import torch

from .measure import median_time
from .methods import Section, methods_for, run_rows


def _calibration_sentences(rm, count: int) -> list[str]:
    """English sentences from the docstrings of the training files of the stdlib corpus (not the eval set)."""
    import ast

    corpus = rm.stdlib_corpus(None)
    out = []
    for doc in corpus.train_docs:
        try:
            tree = ast.parse(bytes(doc.tolist()).decode("utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                text = ast.get_docstring(node)
                if text:
                    first = " ".join(text.split("\n\n")[0].split())
                    if 30 <= len(first) <= 300:
                        out.append(first)
            if len(out) >= count:
                return out
    return out


def bench_minilm(rm, quick: bool, device: str, cache_dir, log, missing: list[str]) -> Section:
    """The MiniLM section (arguments as :func:`qlora_kit.bench.lm.bench_lm`; the peers' absence is noted there)."""
    from ..eval.embeddings import SENTENCES, embedding_cosine, sentence_embeddings

    model, tok = rm.reference_minilm()
    model.to(device)
    ref_emb = sentence_embeddings(model, tok, SENTENCES)
    sentences = _calibration_sentences(rm, 64 if quick else 256)
    calib = []
    for i in range(0, len(sentences), 16):
        enc = tok(sentences[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
        calib.append({k: v.to(device) for k, v in enc.items()})

    def evaluate(m):
        res = embedding_cosine(m, ref_emb, tok)
        enc = tok(list(SENTENCES), padding=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            sps = len(SENTENCES) / median_time(lambda: m(**enc), device, 3)
        return {
            "cosine_mean": round(res.mean, 6),
            "cosine_min": round(res.min, 6),
            "sentences_s": round(sps, 1),
            "_protocol": res.protocol,
        }

    section = Section(
        key="minilm",
        title="all-MiniLM-L6-v2 (real pretrained weights, 22.7M parameters)",
        protocol=[],
        columns=[
            ("method", "method", "s"),
            ("cosine_mean", "cosine mean", ".6f"),
            ("cosine_min", "cosine min", ".6f"),
            ("bits", "bits/param", ".2f"),
            ("size_bytes", "weights", "bytes"),
            ("peak_mem_bytes", "peak mem", "bytes"),
            ("quant_seconds", "quant time s", ".2f"),
            ("sentences_s", "sentences/s", ".0f"),
        ],
    )
    ctx = {"calib": calib, "device_arg": None}
    methods = methods_for(device, [])
    run_rows(
        section,
        methods,
        model,
        ctx,
        device,
        evaluate,
        log,
        lambda p: f"quality: {p} (fixed list in qlora_kit/eval/embeddings.py)",
    )
    section.notes += [f"{m.name}: {m.note}" for m in methods if m.note and m.family == "peer" and m.apply]
    section.protocol.append(
        f"calibration: {len(sentences)} docstring sentences from the stdlib training files, batches of 16"
    )
    section.protocol.append(f"throughput: one forward of the {len(SENTENCES)} sentences (median of 3)")
    section.plots = [
        {
            "kind": "quality_vs_bits",
            "title": "Embedding cosine vs bits per parameter",
            "x": "bits",
            "y": "cosine_mean",
            "xlabel": "bits per quantized parameter (float = 32)",
            "ylabel": "mean cosine vs float",
        }
    ]
    return section
