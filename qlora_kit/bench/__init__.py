"""Method comparison: ``qlora-kit bench`` measures, ``qlora-kit report`` renders (inside the package, so an
installed qlora-kit runs it from any directory).

``bench`` loads (or trains, once, then caches) the reference models of :mod:`qlora_kit.bench.reference_models`,
applies every method to a fresh copy of each and measures, on the same data:

* quality (the protocol is written next to every number): held-out token perplexity for the Llama LM on
  Python's standard library (and through lm-eval when it is installed); cosine similarity of sentence
  embeddings vs the float all-MiniLM-L6-v2; PSNR vs the float generator from the same noise and a Frechet
  distance in a digits classifier's feature space for the DDPM UNet and the DCGAN;
* size: bytes of all weights (packed codes + scales + float rest) and bits per quantized parameter;
* peak memory while quantizing and evaluating (CUDA: peak allocated; CPU: peak resident set size growth);
* quantization time (calibration included) and throughput (prefill and decode tokens/s by batch, images/s).

Methods: ours (round-to-nearest in every registered weight format, HQQ, GPTQ, AWQ, W8A8 dynamic, SmoothQuant,
QAT on the LM and the DCGAN), and peers when installed (bitsandbytes NF4 / int8, torchao int8 / int4,
optimum-quanto int8 / int4; the ones absent are listed as skipped), plus a QLoRA fine-tuning comparison of
our NF4 + LoRA with PEFT's LoRA.
Results go to ``<out>/comparison_<device>.json`` plus a Markdown and a self-contained HTML report with
plots (matplotlib when installed, else inline SVG drawn here), the device, library versions and commit.

Usage:
    qlora-kit bench --quick            # 2 CPU cores: ~8 min with cached reference models (see --help)
    qlora-kit bench --device cuda      # the full run, meant for a GPU
    qlora-kit report benchmarks/results/comparison_cpu.json

Layout: ``reference_models`` (the models, trained once and cached), ``measure`` (environment, memory, time,
size), ``methods`` (the rows: one RTN row per registered weight format, the PTQ algorithms, the peers),
``lm`` / ``adapters`` / ``minilm`` / ``images`` (one file per section), ``render`` (Markdown, SVG, HTML),
``progress`` (ETA and resume) and ``command`` (the two commands).
"""

from .command import QUICK_TIME_HELP, SUITES, main_bench, main_report, run_bench
from .methods import Method, Section, methods_for
from .render import render_markdown, svg_plot, write_report

__all__ = [
    "QUICK_TIME_HELP",
    "SUITES",
    "Method",
    "Section",
    "main_bench",
    "main_report",
    "methods_for",
    "render_markdown",
    "run_bench",
    "svg_plot",
    "write_report",
]
