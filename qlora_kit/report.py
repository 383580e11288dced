"""Method comparison: ``qlora-kit bench`` measures, ``qlora-kit report`` renders.

``bench`` loads (or trains, once, then caches) the reference models of ``benchmarks/reference_models.py``,
applies every method to a fresh copy of each and measures, on the same data:

* quality (the protocol is written next to every number): held-out token perplexity for the Llama LM on
  Python's standard library (and through lm-eval when it is installed); cosine similarity of sentence
  embeddings vs the float all-MiniLM-L6-v2; PSNR vs the float generator from the same noise and a Frechet
  distance in a digits classifier's feature space for the DDPM UNet and the DCGAN;
* size: bytes of all weights (packed codes + scales + float rest) and bits per quantized parameter;
* peak memory while quantizing and evaluating (CUDA: peak allocated; CPU: peak resident set size growth);
* quantization time (calibration included) and throughput (prefill and decode tokens/s by batch, images/s).

Methods: ours (RTN int8 / int4 / NF4 / fp8, HQQ, GPTQ, AWQ, W8A8 dynamic, SmoothQuant, QAT on the LM and the
DCGAN), and peers when installed (bitsandbytes NF4 / int8, torchao int8 / int4, optimum-quanto int8 / int4; the
ones absent are listed as skipped), plus a QLoRA fine-tuning comparison of our NF4 + LoRA with PEFT's LoRA.
Results go to ``<out>/comparison_<device>.json`` plus a Markdown and a self-contained HTML report with
plots (matplotlib when installed, else inline SVG drawn here), the device, library versions and commit.

Usage:
    qlora-kit bench --quick            # 2 CPU cores: ~8 min with cached reference models (see --help)
    qlora-kit bench --device cuda      # the full run, meant for a GPU
    qlora-kit report benchmarks/results/comparison_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import copy
import html
import importlib.util
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
F32 = torch.float32


# ------------------------------------------------------------------------------------------ environment


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed, or broken metadata
        return None


def git_commit() -> str:
    """Short commit of the source tree ("+dirty" with uncommitted changes), or "unknown"."""
    cwd = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=cwd)
    except OSError:
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str) -> dict:
    """Device, versions and commit recorded with the results."""
    env = {"device_type": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            capability=f"sm_{props.major}{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env.update(device=cpu, cores=os.cpu_count(), threads=torch.get_num_threads())
    env.update(python=platform.python_version(), torch=torch.__version__, commit=git_commit())
    for lib in (
        "qlora-kit",
        "triton",
        "transformers",
        "diffusers",
        "bitsandbytes",
        "torchao",
        "optimum-quanto",
        "lm_eval",
        "peft",
    ):
        env[lib] = _version(lib)
    return env


# ------------------------------------------------------------------------------------------ measuring


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{field_name}:\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


def _release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc), so resident-set growth measures new use."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory growth inside a ``with`` block: CUDA peak allocated bytes, or on CPU the growth of the
    resident set (Linux: the high-water mark is reset through /proc/self/clear_refs). ``bytes`` is None
    when it cannot be measured here."""

    def __init__(self, device: str):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _release_free_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = _rss_kib("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.bytes = max(0, _rss_kib("VmHWM") - self.start) * 1024
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], object], device: str, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, batch: int, length: int, device: str, reps: int = 3) -> float:
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    return batch * length / _median_time(lambda: model(input_ids=ids, use_cache=False), device, reps)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, batch: int, prompt: int, new_tokens: int, device: str) -> float:
    """Greedy decoding with the KV cache: tokens generated per second (prompt excluded)."""
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def run(n: int) -> None:
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(n):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    run(2)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    run(new_tokens)
    _sync(device)
    t_all = time.perf_counter() - t0
    _sync(device)
    t0 = time.perf_counter()
    run(0)  # the prefill alone, subtracted
    _sync(device)
    return batch * new_tokens / max(t_all - (time.perf_counter() - t0), 1e-9)


def weight_bytes(model: nn.Module) -> tuple[int, float | None]:
    """(bytes of all weights, bits per quantized parameter or None when nothing is quantized)."""
    from .api import memory_footprint
    from .nn.quantized import QuantizedLayer

    total = sum(memory_footprint(model).values())
    qbytes = qparams = 0
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            qbytes += m.qweight.nbytes()
            qparams += math.prod(m.qweight.shape)
    return total, (8 * qbytes / qparams if qparams else None)


# --------------------------------------------------------------------------------------------- methods


@dataclass
class Method:
    """One row of a comparison.

    Attributes:
        name: row label.
        family: "float", "weight-only", "activation", "qat", "peer" or "control".
        apply: ``apply(model, ctx) -> model`` (in place on a fresh copy), or None for the float model.
        calibrated: whether it uses calibration data.
        note: shown under the table when not empty.
    """

    name: str
    family: str
    apply: Callable | None
    calibrated: bool = False
    note: str = ""
    sized: bool = True  # False when the model keeps float weights (peers measured through dequantized weights)


def _configs(device: str):
    import qlora_kit as qk

    from . import configs

    cd = torch.bfloat16 if device == "cuda" else F32  # fp32 on CPU: numbers comparable to the bitsandbytes peer
    out = {
        "int8 RTN": qk.Int8WeightConfig(compute_dtype=cd),
        "fp8 RTN": qk.FP8WeightConfig(compute_dtype=cd),
        "nf4 RTN": qk.NF4Config(blocksize=64, double_quant=True, compute_dtype=cd),
        "int4 g128 RTN": qk.Int4WeightConfig(group_size=128, compute_dtype=cd),
        "int4 g128 HQQ": qk.HQQConfig(group_size=128, compute_dtype=cd),
        "int4 g128 GPTQ": qk.GPTQConfig(bits=4, group_size=128, compute_dtype=cd),
        "int4 g128 AWQ": qk.AWQConfig(group_size=128, compute_dtype=cd),
    }
    if hasattr(configs, "Int8DynamicActivationConfig"):
        out["W8A8 dynamic"] = configs.Int8DynamicActivationConfig(compute_dtype=cd)
        out["W8A8 SmoothQuant"] = qk.SmoothQuantConfig(alpha=0.5, compute_dtype=cd)
    else:  # the core's W8A8 config is not there yet: the same numerics through qlora_kit.ops, see _OpsW8A8
        out["W8A8 dynamic"] = "ops-w8a8"
        out["W8A8 SmoothQuant"] = "ops-w8a8-smooth"
    return out, cd


class _OpsW8A8(nn.Module):
    """W8A8 linear for builds without ``Int8DynamicActivationConfig``: int8 weights per output channel (the int8
    format's numerics), activations quantized per token on every call by ``qlora_kit.ops.int8_dynamic_linear``."""

    def __init__(self, lin: nn.Module):
        from .kernels.reference.quant_int import quantize_int8
        from .ptq import weight_2d

        super().__init__()
        q, scale = quantize_int8(weight_2d(lin).detach())
        self.register_buffer("qdata", q)
        self.register_buffer("scale", scale)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        from . import ops

        return ops.int8_dynamic_linear(x, self.qdata, self.scale, self.bias)


def _ops_w8a8(smooth: bool, cd):
    def apply(model, ctx):
        import qlora_kit

        from .ptq import is_linear, select_targets, smooth_activations

        if smooth:
            smooth_activations(model, qlora_kit.SmoothQuantConfig(alpha=0.5, compute_dtype=cd), ctx["calib"])
        for fqn, m in select_targets(model, None):
            if is_linear(m):
                model.set_submodule(fqn, _OpsW8A8(m))
        return model

    return apply


def _quantize_with(config):
    import qlora_kit

    def apply(model, ctx):
        return qlora_kit.quantize(model, config, calib_data=ctx.get("calib"), device=ctx.get("device_arg"))

    return apply


def _bnb_dequantized(kind: str):
    """Peer: bitsandbytes quantize -> dequantize of every quantized-by-default layer (its numerics; the
    float layers then compute with the dequantized weights, as bitsandbytes' CPU path does)."""

    def apply(model, ctx):
        import bitsandbytes.functional as bf

        from .api import default_filter
        from .ptq import is_linear

        keep = default_filter(model)
        for fqn, m in list(model.named_modules()):
            if not fqn or not is_linear(m) or not keep(m, fqn):
                continue
            w = m.weight.data
            if kind == "nf4":
                q, state = bf.quantize_4bit(w.float(), blocksize=64, quant_type="nf4", compress_statistics=True)
                deq = bf.dequantize_4bit(q, state)
            else:  # LLM.int8() weights: symmetric int8 per row (absmax / 127), as Linear8bitLt stores them
                scale = w.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
                deq = torch.round(w.float() / scale).clamp(-127, 127) * scale
            m.weight.data = deq.to(w.dtype)
        return model

    return apply


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _linear_filter(model: nn.Module):
    """Linear layers our default filter quantizes (what the peers are applied to, for a like-for-like row)."""
    from .api import default_filter

    keep = default_filter(model)
    return lambda m, fqn: isinstance(m, nn.Linear) and keep(m, fqn)


def _torchao(kind: str, device: str):
    """Peer: torchao ``quantize_`` on the Linear layers our default filter picks (torchao's own tensor subclasses
    and kernels compute the forward)."""

    def apply(model, ctx):
        from torchao.quantization import quantize_

        quantize_(model, _torchao_config(kind, device)[0], filter_fn=_linear_filter(model))
        return model

    return apply


def _torchao_config(kind: str, device: str):
    """(torchao config, description, why the preferred config was not used or ""), probed on a small layer."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if kind == "int8":
        return Int8WeightOnlyConfig(), "torchao Int8WeightOnlyConfig (int8 per output channel)", ""
    probe = nn.Sequential(nn.Linear(256, 64)).to(device)
    try:
        quantize_(probe, Int4WeightOnlyConfig(group_size=128))
        with torch.no_grad():
            probe(torch.randn(2, 256, device=device))
        return Int4WeightOnlyConfig(group_size=128), "torchao Int4WeightOnlyConfig(group_size=128)", ""
    except Exception as e:  # torchao's int4 packings need CUDA or the mslk kernels
        why = _one_line(e)
    cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128), mapping_type=MappingType.ASYMMETRIC)
    return (
        cfg,
        "torchao IntxWeightOnlyConfig(int4, PerGroup(128), asymmetric)",
        f"Int4WeightOnlyConfig(group_size=128) does not run here ({why}), so this row uses IntxWeightOnlyConfig",
    )


def _quanto(kind: str):
    """Peer: optimum-quanto ``quantize(weights=qint8 / qint4)`` + ``freeze`` on the Linear layers our default
    filter picks (quanto's defaults otherwise)."""

    def apply(model, ctx):
        from optimum.quanto import freeze, qint4, qint8, quantize

        keep = _linear_filter(model)
        skip = [fqn for fqn, m in model.named_modules() if fqn and isinstance(m, nn.Linear) and not keep(m, fqn)]
        quantize(model, weights=qint4 if kind == "int4" else qint8, exclude=skip or None)
        freeze(model)
        return model

    return apply


def _peer_methods(note_missing: list[str], device: str = "cpu") -> list[Method]:
    peers = []
    if _version("bitsandbytes"):
        peers.append(
            Method(
                "bnb nf4 (peer)",
                "peer",
                _bnb_dequantized("nf4"),
                sized=False,
                note="bitsandbytes quantize_4bit / dequantize_4bit (nf4, blocks of 64, double quant); "
                "quality only: the model computes with the dequantized weights",
            )
        )
        peers.append(
            Method(
                "bnb int8 weights (peer)",
                "peer",
                _bnb_dequantized("int8"),
                sized=False,
                note="LLM.int8()'s weight rounding (row absmax / 127) without its outlier split; quality only",
            )
        )
    else:
        note_missing.append("bitsandbytes")
    if _version("torchao"):
        for kind in ("int8", "int4"):
            try:
                _, desc, why = _torchao_config(kind, device)
            except Exception as e:  # an installed but unusable torchao: say why, run the rest
                peers.append(Method(f"torchao {kind} (peer)", "peer", None, note=f"not run: {_one_line(e)}"))
                continue
            note = f"{desc} via quantize_ on the same Linear layers; torchao's tensor subclasses compute"
            note += f"; size not measured (torchao's own storage). {why}" if why else "; size not measured"
            peers.append(Method(f"torchao {kind} (peer)", "peer", _torchao(kind, device), sized=False, note=note))
    else:
        note_missing.append("torchao")
    if _version("optimum-quanto"):
        for kind in ("int8", "int4"):
            peers.append(
                Method(
                    f"quanto {kind} (peer)",
                    "peer",
                    _quanto(kind),
                    sized=False,
                    note=f"optimum-quanto quantize(weights=q{kind}) + freeze on the same Linear layers (quanto's "
                    "default grouping); size not measured",
                )
            )
    else:
        note_missing.append("optimum-quanto")
    return peers


def methods_for(device: str, note_missing: list[str], *, peers: bool = True) -> list[Method]:
    """Our methods (and the peers when ``peers``: bitsandbytes, torchao and quanto are applied to Linear layers,
    so they are compared on the transformers, not on the convolutional image models)."""
    cfgs, cd = _configs(device)
    out = [Method("float", "float", None)]
    for name, cfg in cfgs.items():
        fam = "activation" if name.startswith("W8A8") else "weight-only"
        if isinstance(cfg, str):
            out.append(Method(name, fam, _ops_w8a8(cfg.endswith("smooth"), cd), cfg.endswith("smooth"), sized=False))
            continue
        calibrated = type(cfg).__name__ in ("GPTQConfig", "AWQConfig", "SmoothQuantConfig")
        out.append(Method(name, fam, _quantize_with(cfg), calibrated))
    return out + (_peer_methods(note_missing, device) if peers else [])


def _w8a8_note() -> list[str]:
    from . import configs

    if hasattr(configs, "Int8DynamicActivationConfig"):
        return []
    return [
        "W8A8 rows: Linear layers only, through qlora_kit.ops.int8_dynamic_linear (this build has no "
        "Int8DynamicActivationConfig layer yet); other layers stay float, so size and bits are not shown."
    ]


# ------------------------------------------------------------------------------------ reference models


def _reference_models():
    """``benchmarks/reference_models.py`` of the source checkout (bench runs from a repository checkout)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_models.py"
    if path.is_file():
        spec = importlib.util.spec_from_file_location("qlora_kit_reference_models", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    try:
        from benchmarks import reference_models

        return reference_models
    except ImportError:
        raise RuntimeError(
            "qlora-kit bench needs benchmarks/reference_models.py from the qlora-kit source repository; "
            "run it from a checkout (pip install -e .)"
        ) from None


@dataclass
class Section:
    """One model's comparison."""

    key: str
    title: str
    protocol: list[str]
    columns: list[tuple[str, str, str]]
    rows: list[dict] = field(default_factory=list)
    bars: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    plots: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("key", "title", "protocol", "columns", "rows", "bars", "notes", "info", "plots")
        }


def _run_method(
    method: Method, float_model: nn.Module, ctx: dict, device: str, evaluate: Callable[[nn.Module], dict], log
) -> tuple[dict, nn.Module]:
    row = {"method": method.name, "family": method.family}
    with PeakMemory(device) as peak:
        model = copy.deepcopy(float_model)
        t0 = time.perf_counter()
        if method.apply is not None:
            model = method.apply(model, ctx) or model
        _sync(device)
        row["quant_seconds"] = round(time.perf_counter() - t0, 2) if method.apply is not None else None
        row.update(evaluate(model))
    row["peak_mem_bytes"] = peak.bytes
    row["size_bytes"], row["bits"] = weight_bytes(model) if method.sized else (None, None)
    log(f"  {method.name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("method", "family")))
    return row, model


def _ratio_bar(name: str, value: float | None, limit: float, detail: str) -> dict:
    passed = value is not None and value <= limit
    return {"name": name, "passed": passed, "detail": detail}


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["method"] == name), None)


def _run_rows(section: Section, methods: list[Method], float_model, ctx, device, evaluate, log, protocol=None) -> None:
    """Run every method into ``section.rows``; a peer that fails is noted (one line), not fatal. The first
    row's ``_protocol`` goes into the section's protocol through ``protocol(text)``."""
    for method in methods:
        if method.family == "peer" and method.apply is None:
            section.notes.append(f"{method.name}: {method.note}")
            continue
        try:
            row, model = _run_method(method, float_model, ctx, device, evaluate, log)
        except Exception as e:
            if method.family != "peer":
                raise
            log(f"  {method.name}: failed: {_one_line(e)}")
            section.notes.append(f"{method.name}: not run here: {_one_line(e)}")
            continue
        proto = row.pop("_protocol", None)
        if proto and protocol is not None and not section.protocol:
            section.protocol.append(protocol(proto))
        section.rows.append(row)
        del model


# --------------------------------------------------------------------------------------------- the LM


def bench_lm(rm, quick: bool, device: str, cache_dir, log, missing: list[str]) -> Section:
    from .eval.perplexity import perplexity, windows_of
    from .qat import QATConfig, convert_qat, prepare_qat

    ref = rm.reference_lm(quick, cache_dir, device)
    spec = ref.spec
    max_windows = 96 if quick else None
    calib = [b.to(device) for b in ref.calib_batches(batches=8 if quick else 32, batch_size=4 if quick else 8)]
    batches = (1, 4) if quick else (1, 8, 32)
    new_tokens = 32 if quick else 128
    _, cd = _configs(device)

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
        if _version("lm_eval"):
            from .eval.lm_eval_bridge import byte_tokenizer, lm_eval_perplexity

            texts = ref.corpus.eval_texts[: 4 if quick else None]
            out["lm_eval_byte_ppl"] = round(
                lm_eval_perplexity(model, byte_tokenizer(), texts, context=spec.context)["byte_perplexity"], 4
            )
        out["prefill_tok_s"] = round(prefill_tokens_per_s(model, batches[-1], spec.context, device), 1)
        out["decode_tok_s"] = {str(b): round(decode_tokens_per_s(model, b, 16, new_tokens, device), 1) for b in batches}
        return out

    methods = methods_for(device, missing)
    qat_steps = 60 if quick else 600
    qat_lr = 1e-3 if quick else 3e-4

    def qat_with(learnable: bool):
        cfg = QATConfig(
            __import__("qlora_kit").Int4WeightConfig(group_size=128, compute_dtype=F32), learnable_scales=learnable
        )

        def qat(model, ctx):
            prepare_qat(model, cfg)
            model.train()
            rm.train_lm(model, spec, ref.corpus, steps=qat_steps, lr=qat_lr)
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
        rm.train_lm(model, spec, ref.corpus, steps=qat_steps, lr=qat_lr)
        model.eval()
        ctx["control"] = copy.deepcopy(model)
        return model

    def control_rtn(model, ctx):
        import qlora_kit

        return qlora_kit.quantize(
            copy.deepcopy(ctx["control"]), qlora_kit.Int4WeightConfig(group_size=128, compute_dtype=cd)
        )

    methods.append(
        Method(
            CONTROL,
            "control",
            control,
            note=f"the float model trained for the same {qat_steps} steps as QAT (same data, lr "
            f"{qat_lr}): QAT's baseline, since the extra training alone lowers perplexity",
        )
    )
    methods.append(Method(CONTROL_RTN, "control", control_rtn, note="that trained control, then int4 g128 RTN"))
    methods.append(
        Method(
            QAT_NAME,
            "qat",
            qat_with(False),
            note=f"prepare_qat(int4 g128, straight-through, scales from round-to-nearest) + the same "
            f"{qat_steps} steps, then convert_qat; quant time includes the training",
        )
    )
    if not quick:
        methods.append(
            Method(
                QAT_NAME + " LSQ", "qat", qat_with(True), note="as above with LSQ-learned int4 scales and zero points"
            )
        )
    section = Section(
        key="lm",
        title=f"Llama LM on Python's standard library ({sum(p.numel() for p in ref.model.parameters()) / 1e6:.2f}M "
        "parameters, byte tokens)",
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
    ctx = {"calib": calib, "device_arg": device if device == "cuda" else None}
    _run_rows(
        section,
        methods,
        ref.model,
        ctx,
        device,
        evaluate,
        log,
        lambda p: f"perplexity: {p}; held-out files: {', '.join(ref.corpus.eval_names)}",
    )
    section.protocol += [
        f"calibration (GPTQ, AWQ, SmoothQuant): {len(calib)} batches of {calib[0].shape[0]}x{calib[0].shape[1]} "
        "tokens from the training files",
        f"KL to float: mean over tokens of KL(float || method) of the next-token distributions, first "
        f"{kl_windows.shape[0]} full windows, in units of 1e-3 nats (the trained control and QAT rows moved away from "
        "the original float model on purpose)",
        f"throughput: prefill = one forward of batch {batches[-1]} x {spec.context} tokens (median of 3); decode = "
        f"greedy, KV cache, {new_tokens} new tokens after a 16-token prompt, by batch size",
        "peak mem: "
        + (
            "CUDA peak allocated growth"
            if device == "cuda"
            else "growth of the process's peak resident "
            "set after returning free heap pages to the OS (memory the allocator still holds is reused "
            "without growth)"
        )
        + " while copying, quantizing and evaluating the model",
    ]
    if not _version("lm_eval"):
        section.notes.append("lm-eval is not installed: the lm-eval column is empty (pip install 'lm-eval>=0.4').")
    section.notes += _w8a8_note()
    section.notes += [f"{m.name}: {m.note}" for m in methods if m.note and m.apply is not None]
    section.bars = lm_bars(section.rows)
    section.plots = [
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
    return section


CONTROL = "float + same training (control)"
CONTROL_RTN = "control + int4 g128 RTN"
QAT_NAME = "int4 g128 QAT"


def lm_bars(rows: list[dict]) -> list[dict]:
    """The issue's expected results, checked on the measured numbers."""
    bars = []
    f = _row(rows, "float")
    if f is None:
        return bars
    fp = f["ppl"]

    def rel(name):
        r = _row(rows, name)
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
    ours, bnb = _row(rows, "nf4 RTN"), _row(rows, "bnb nf4 (peer)")
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
    rtn = _row(rows, "int4 g128 RTN")
    for name in ("int4 g128 GPTQ", "int4 g128 HQQ", "int4 g128 AWQ"):
        r = _row(rows, name)
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
    qat, ctrl, ctrl_rtn = _row(rows, QAT_NAME), _row(rows, CONTROL), _row(rows, CONTROL_RTN)
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


def bench_adapters(rm, quick: bool, device: str, cache_dir, log, missing: list[str]) -> Section:
    """QLoRA fine-tuning: qlora_kit's NF4 base + LoRA vs PEFT's LoRA on the bitsandbytes NF4 weights (the same
    base numbers, dequantized) or, without bitsandbytes, on the float base; same rank, data, steps and lr."""
    import qlora_kit

    from .eval.perplexity import perplexity

    ref = rm.reference_lm(quick, cache_dir, device)
    spec = ref.spec
    steps, lr, r = (30, 1e-3, 8) if quick else (300, 3e-4, 16)
    max_windows = 96 if quick else None
    _, cd = _configs(device)
    bnb = bool(_version("bitsandbytes"))

    def evaluate(model):
        before = perplexity(model, ref.corpus.eval_docs, context=spec.context, batch_size=16, max_windows=max_windows)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        rm.train_lm(model, spec, ref.corpus, steps=steps, lr=lr)
        _sync(device)
        seconds = time.perf_counter() - t0
        after = perplexity(model, ref.corpus.eval_docs, context=spec.context, batch_size=16, max_windows=max_windows)
        return {
            "ppl_before": round(before.ppl, 4),
            "ppl_after": round(after.ppl, 4),
            "trainable": trainable,
            "train_seconds": round(seconds, 2),
            "step_ms": round(1000 * seconds / steps, 1),
            "_protocol": after.protocol,
        }

    def ours(model, ctx):
        qlora_kit.quantize(model, qlora_kit.NF4Config(blocksize=64, double_quant=True, compute_dtype=cd))
        torch.manual_seed(0)
        return qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear"))

    def with_peft(model, ctx):
        import peft

        if bnb:
            model = _bnb_dequantized("nf4")(model, ctx)
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
        return peft.get_peft_model(model, cfg)

    methods = [Method("qlora_kit NF4 + LoRA", "weight-only", ours)]
    if _version("peft"):
        base = "bitsandbytes NF4 weights (dequantized)" if bnb else "the float base (bitsandbytes not installed)"
        methods.append(Method("PEFT LoRA (peer)", "peer", with_peft, sized=False, note=f"PEFT LoRA on {base}"))
    else:
        missing.append("peft")
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
    _run_rows(section, methods, ref.model, {}, device, evaluate, log, lambda p: f"perplexity: {p}")
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


# ------------------------------------------------------------------------------------------------ MiniLM


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
    from .eval.embeddings import SENTENCES, embedding_cosine, sentence_embeddings

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
            sps = len(SENTENCES) / _median_time(lambda: m(**enc), device, 3)
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
    _run_rows(
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
    section.notes += _w8a8_note()
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


# ------------------------------------------------------------------------------------------ image models


def _image_section(
    key,
    title,
    float_model,
    sample: Callable,
    calib,
    classifier,
    real,
    device,
    log,
    quick,
    extra_protocol: list[str],
    extra_methods: tuple[Method, ...] = (),
) -> Section:
    from .eval.images import frechet_classifier_distance, psnr

    n = 64 if quick else 256
    noise = sample.noise(n)
    with torch.no_grad():
        ref_images = sample(float_model, noise)

    def evaluate(m):
        with torch.no_grad():
            imgs = sample(m, noise)
            ips = n / _median_time(lambda: sample(m, noise), device, 1)
        return {
            "psnr_db": round(psnr(imgs, ref_images), 2) if not torch.equal(imgs, ref_images) else None,
            "frechet_digits": round(frechet_classifier_distance(classifier, imgs, real), 3),
            "images_s": round(ips, 1),
        }

    section = Section(
        key=key,
        title=title,
        protocol=[
            f"PSNR (dB) of {n} generated images vs the float model's from the same noise (range [-1, 1]); "
            "empty for the float model itself",
            f"frechet_digits: Frechet distance between {n} generated images and {real.shape[0]} held-out real "
            "digits in the feature space of a small digits CNN (not FID: another feature network)",
        ]
        + extra_protocol,
        columns=[
            ("method", "method", "s"),
            ("psnr_db", "PSNR dB", ".2f"),
            ("frechet_digits", "Frechet (digits CNN)", ".3f"),
            ("bits", "bits/param", ".2f"),
            ("size_bytes", "weights", "bytes"),
            ("peak_mem_bytes", "peak mem", "bytes"),
            ("quant_seconds", "quant time s", ".2f"),
            ("images_s", "images/s", ".1f"),
        ],
    )
    ctx = {"calib": calib, "device_arg": None, "float": float_model}
    has_linear = any(type(m) is nn.Linear for m in float_model.modules())
    methods = [m for m in methods_for(device, [], peers=False) if has_linear or m.family != "activation"]
    methods += list(extra_methods)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in methods:
            row, _ = _run_method(method, float_model, ctx, device, evaluate, log)
            section.rows.append(row)
    section.notes.append(
        "the default filter keeps the first and last convolution in high precision; GPTQ and AWQ calibrate "
        "Linear layers and ungrouped Conv2d / ConvTranspose2d layers (a convolution as a matmul over unfolded input "
        "patches; AWQ folds its scales into a preceding BatchNorm / GroupNorm / convolution, through a ReLU, "
        "where there is one, else it only searches the clipping)"
    )
    fallback = sorted({str(w.message) for w in caught if "round-to-nearest instead" in str(w.message)})
    section.notes += [f"warning while quantizing: {m}" for m in fallback]
    if has_linear:
        section.notes.append(
            "W8A8 rows: W8A8 (and SmoothQuant's smoothing) covers the Linear layers only; the convolutions of "
            "these rows get int8 weight-only quantization (quantize() warns so)"
        )
        section.notes += _w8a8_note()
    else:
        section.notes.append(
            "no W8A8 / SmoothQuant rows: W8A8 covers Linear layers only and this model has none (SmoothQuant "
            "would give int8 weight-only convolutions, with a warning)"
        )
    section.notes.append("the peers (bitsandbytes, torchao, quanto) are compared on the transformers above")
    section.notes += [f"{m.name}: {m.note}" for m in extra_methods if m.note]
    section.plots = [
        {
            "kind": "quality_vs_bits",
            "title": "PSNR vs bits per parameter",
            "x": "bits",
            "y": "psnr_db",
            "xlabel": "bits per quantized parameter",
            "ylabel": "PSNR vs float (dB)",
        }
    ]
    return section


def _dcgan_qat(nz: int, quick: bool, device: str) -> Method:
    """QAT for the generator by distillation (no discriminator): int4 g128 fake-quant layers trained to
    reproduce the float generator's images on fresh latents, then converted."""
    from .qat import QATConfig, convert_qat, prepare_qat

    steps, lr, batch = (200, 3e-5, 64) if quick else (2000, 3e-5, 128)

    def apply(model, ctx):
        import qlora_kit

        teacher = ctx["float"]
        prepare_qat(model, QATConfig(qlora_kit.Int4WeightConfig(group_size=128, compute_dtype=F32)))
        model.eval()  # BatchNorm keeps its statistics; the weights train
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # to 0: a settled end point
        g = torch.Generator().manual_seed(7)
        for _ in range(steps):
            z = torch.randn((batch, nz), generator=g).to(device)
            with torch.no_grad():
                target = teacher(z)
            loss = torch.nn.functional.mse_loss(model(z), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return convert_qat(model)

    return Method(
        QAT_NAME,
        "qat",
        apply,
        note=f"prepare_qat(int4 g128, straight-through) trained by distillation: {steps} Adam steps (lr {lr}, "
        f"linear decay to 0) of the MSE to the float generator's images on fresh batches of {batch} latents (not "
        "the evaluation noise), BatchNorm statistics fixed, then convert_qat; quant time includes the training",
    )


class _Sampler:
    def __init__(self, fn, shape, device):
        self.fn, self.shape, self.device = fn, shape, device

    def noise(self, n):
        return torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(123))

    def __call__(self, model, noise):
        return self.fn(model, noise.to(self.device)).float().cpu()


def bench_images(rm, quick: bool, device: str, cache_dir, log, missing: list[str]) -> list[Section]:
    classifier, cinfo = rm.digits_classifier(cache_dir, "cpu")
    real, _ = rm.digits_images("test")
    sections = []
    unet = rm.reference_unet(quick, cache_dir, device)
    sampler = _Sampler(lambda m, z: unet.sample(m, z), (1, 8, 8), device)
    calib = [tuple(t.to(device) for t in b) for b in unet.calib_batches(batches=4 if quick else 16)]
    sections.append(
        _image_section(
            "unet",
            f"DDPM UNet on digits (diffusers UNet2DModel, "
            f"{sum(p.numel() for p in unet.model.parameters()) / 1e6:.2f}M parameters)",
            unet.model,
            sampler,
            calib,
            classifier,
            real,
            device,
            log,
            quick,
            [
                f"sampling: DDIM, {unet.spec.sample_steps} steps, eta 0 (deterministic)",
                f"calibration: {len(calib)} batches of noisy digits with timesteps stratified over [0, "
                f"{unet.spec.train_timesteps}) (activation statistics across diffusion timesteps)",
                f"digits classifier test accuracy: {cinfo.get('test_accuracy')}",
            ],
        )
    )
    sections[-1].info = unet.info
    gen, ginfo = rm.reference_dcgan(quick, cache_dir, device)
    gsampler = _Sampler(lambda m, z: m(z), (gen.nz,), device)
    gcalib = [torch.randn((64, gen.nz), generator=torch.Generator().manual_seed(i)).to(device) for i in range(4)]
    sections.append(
        _image_section(
            "dcgan",
            f"DCGAN generator on digits ({sum(p.numel() for p in gen.parameters()) / 1e6:.2f}M parameters)",
            gen,
            gsampler,
            gcalib,
            classifier,
            real,
            device,
            log,
            quick,
            ["calibration: 4 batches of 64 latent vectors"],
            (_dcgan_qat(gen.nz, quick, device),),
        )
    )
    sections[-1].info = ginfo
    return sections


# -------------------------------------------------------------------------------------------- rendering


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "s":
        return str(value)
    if kind == "bytes":
        for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= div:
                return f"{value / div:.2f} {unit}"
        return f"{value} B"
    if kind == "dict":
        return ", ".join(f"b{k}: {v:.0f}" for k, v in value.items())
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, kind)


def render_markdown(results: dict, plot_files: dict[str, str] | None = None) -> str:
    env = results["env"]
    lines = [f"# qlora-kit method comparison ({env.get('device_type')}{', quick' if results.get('quick') else ''})", ""]
    lines.append("Device: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    lines.append(
        f"Run: {results.get('started')}, {results.get('wall_seconds')} s in all"
        f"{' (reference models loaded from the cache)' if results.get('cached') else ''}."
    )
    if results.get("missing"):
        lines.append(f"Peers not installed (skipped): {', '.join(results['missing'])}.")
    if env.get("device_type") == "cpu":
        lines.append(
            "CPU timings (quantization time, throughput, peak memory) are single runs of the PyTorch "
            "reference path (weights dequantized on every call), on whatever else the machine was doing: "
            "indicative only. The fused kernels run on CUDA."
        )
    lines.append("")
    for sec in results["sections"]:
        lines += [f"## {sec['title']}", ""]
        lines += [f"- {p}" for p in sec["protocol"]]
        lines.append("")
        cols = sec["columns"]
        lines.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        lines.append("|" + "|".join("---" if k == "s" else "---:" for _, _, k in cols) + "|")
        for row in sec["rows"]:
            lines.append("| " + " | ".join(_fmt(row.get(key), kind) for key, _, kind in cols) + " |")
        lines.append("")
        if sec["bars"]:
            lines.append("Expected results (from the issue), checked on these numbers:")
            lines.append("")
            for bar in sec["bars"]:
                lines.append(f"- {'PASS' if bar['passed'] else 'FAIL'}: {bar['name']}: {bar['detail']}")
            lines.append("")
        for note in sec["notes"]:
            lines.append(f"- {note}")
        if sec["notes"]:
            lines.append("")
        for i, _ in enumerate(sec.get("plots", [])):
            name = (plot_files or {}).get(f"{sec['key']}_{i}")
            if name:
                lines += [f"![{sec['plots'][i]['title']}]({name})", ""]
        if sec.get("info"):
            lines.append(f"Reference model: `{json.dumps(sec['info'], sort_keys=True)}`")
            lines.append("")
    return "\n".join(lines)


_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        if t >= lo - 1e-9 * step:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _plot_series(sec: dict, plot: dict) -> list[tuple[str, list[tuple[float, float]], bool]]:
    """(label, points, connect) series of one plot spec."""
    series = []
    # trained rows (QAT and its control) moved away from the float model, and peers measured through
    # dequantized float weights have no speed of their own: both would mislead on these axes
    skip = {"quality_vs_bits": ("qat", "control"), "throughput_vs_batch": ("peer", "control")}[plot["kind"]]
    rows = [r for r in sec["rows"] if r.get("family") not in skip]
    if plot["kind"] == "quality_vs_bits":
        for row in rows:
            y = row.get(plot["y"])
            if y is None or (isinstance(y, float) and math.isinf(y)):
                continue
            x = row.get("bits") or 32.0
            series.append((row["method"], [(float(x), float(y))], False))
    else:
        for row in rows:
            d = row.get(plot["key"]) or {}
            pts = [(float(k), float(v)) for k, v in d.items()]
            if pts:
                series.append((row["method"], sorted(pts), True))
    return series


def svg_plot(
    series, *, title: str, xlabel: str, ylabel: str, width: int = 640, height: int = 380, logx: bool = False
) -> str:
    """A self-contained SVG chart: points (or lines) per series, axes with ticks, and a legend."""
    left, right, top, bottom = 70, 210, 34, 50
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for _, pts, _ in series for p in pts]
    ys = [p[1] for _, pts, _ in series for p in pts]
    if not xs:
        return ""
    fx = (lambda v: math.log2(v)) if logx else (lambda v: v)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    y_lo, y_hi = min(ys), max(ys)
    pad_x = (x_hi - x_lo) * 0.08 or 1.0
    pad_y = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.05 or 1.0
    x_lo, x_hi, y_lo, y_hi = x_lo - pad_x, x_hi + pad_x, y_lo - pad_y, y_hi + pad_y

    def px(v):
        return left + (fx(v) - x_lo) / (x_hi - x_lo) * pw

    def py(v):
        return top + ph - (v - y_lo) / (y_hi - y_lo) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + pw / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>',
    ]
    for t in _nice_ticks(y_lo, y_hi):
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    xticks = sorted(set(xs)) if logx else _nice_ticks(x_lo, x_hi)
    for t in xticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(
        f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    for i, (label, pts, connect) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        if connect and len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y in pts:
            out.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}">'
                f"<title>{html.escape(label)}: ({x:g}, {y:g})</title></circle>"
            )
        ly = top + 8 + i * 15
        out.append(f'<circle cx="{left + pw + 14}" cy="{ly}" r="4" fill="{color}"/>')
        out.append(f'<text x="{left + pw + 22}" y="{ly + 4}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _matplotlib_png(series, *, title, xlabel, ylabel, logx=False) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for label, pts, connect in series:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", linestyle="-" if connect else "none", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plots(results: dict):
    """{plot id: (title, svg text, png bytes or None)} for every plot of every section."""
    out = {}
    for sec in results["sections"]:
        for i, plot in enumerate(sec.get("plots", [])):
            series = _plot_series(sec, plot)
            if not series:
                continue
            logx = plot["kind"] == "throughput_vs_batch"
            kw = dict(title=plot["title"], xlabel=plot["xlabel"], ylabel=plot["ylabel"], logx=logx)
            out[f"{sec['key']}_{i}"] = (plot["title"], svg_plot(series, **kw), _matplotlib_png(series, **kw))
    return out


def _figure(title: str, svg: str, png: bytes | None) -> str:
    if png is not None:
        data = base64.b64encode(png).decode()
        return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"/></figure>'
    return f"<figure>{svg}</figure>"


def render_html(results: dict, markdown_text: str, plots, files: dict[str, str]) -> str:
    """A self-contained HTML page: the Markdown's tables and text, each plot inline where the Markdown links it."""
    by_file = {name: pid for pid, name in files.items()}
    chunks, pending = [], []
    for line in markdown_text.splitlines():
        m = re.match(r"!\[[^\]]*\]\(([^)]*)\)", line)
        if m and by_file.get(m.group(1)) in plots:
            chunks.append(_markdown_to_html("\n".join(pending)))
            chunks.append(_figure(*plots[by_file[m.group(1)]]))
            pending = []
        else:
            pending.append(line)
    chunks.append(_markdown_to_html("\n".join(pending)))
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 8px}th{background:#f4f4f4}td.num{text-align:right}code{font-size:11px;"
        "word-break:break-all}.pass{color:#1a7f37}.fail{color:#cf222e}figure{display:inline-block;margin:8px}"
    )
    title = html.escape(markdown_text.splitlines()[0].lstrip("# "))
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
        f"</head><body>\n{''.join(chunks)}\n</body></html>\n"
    )


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    text = re.sub(r"^(PASS)", r"<b class='pass'>\1</b>", text)
    return re.sub(r"^(FAIL)", r"<b class='fail'>\1</b>", text)


def _markdown_to_html(md: str) -> str:
    """The small Markdown subset render_markdown writes: headings, paragraphs, bullet lists, tables."""
    out, in_list, table = [], False, []

    def flush_table():
        if not table:
            return
        head = [c.strip() for c in table[0].strip("|").split("|")]
        aligns = [c.strip().endswith(":") for c in table[1].strip("|").split("|")]
        rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
        for line in table[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(
                "<tr>"
                + "".join(
                    f"<td class='{'num' if a else ''}'>{html.escape(c)}</td>"
                    for c, a in zip(cells, aligns, strict=False)
                )
                + "</tr>"
            )
        out.append("<table>" + "".join(rows) + "</table>")
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush_table()
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def write_report(results: dict, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write ``<stem>.md`` (+ one SVG per plot) and the self-contained ``<stem>.html``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(results)
    files = {}
    for pid, (_, svg, _) in plots.items():
        name = f"{stem}_{pid}.svg"
        (out_dir / name).write_text(svg)
        files[pid] = name
    md = render_markdown(results, files)
    paths = {"markdown": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}
    paths["markdown"].write_text(md)
    paths["html"].write_text(render_html(results, md, plots, files))
    return paths


# ---------------------------------------------------------------------------------------------- commands


_SUITES = ("lm", "minilm", "images")
# measured: 7m38s with the reference models cached (commit 2a73af3, 2 CPU cores); the reference LM's training
# took 2.3-2.8 s of CPU time per step (400 steps) in `bench --quick --device cpu`, empty cache (issue 17)
QUICK_TIME_HELP = (
    "2 CPU cores: about 8 minutes once the reference models are cached; the first run also trains them, "
    "the LM alone taking 15-20 minutes of CPU time"
)


def run_bench(*, quick: bool, device: str, suites=_SUITES, cache_dir=None, log=print, partial_path=None) -> dict:
    """Run the comparison and return the results dictionary (see the module docstring).

    Progress lines carry an ETA; with ``partial_path`` each finished part is saved there and a rerun with the
    same settings reuses it (see :mod:`qlora_kit.bench_progress`).
    """
    from .bench_progress import PARTS, BenchProgress

    rm = _reference_models()
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    root = rm.cache_root(cache_dir)
    cache_before = root.exists() and any(root.iterdir())
    key = {
        "quick": quick,
        "device": device,
        "suites": sorted(suites),
        "commit": git_commit(),
        "torch": torch.__version__,
    }
    parts = [(name, title) for name, title, suite in PARTS if suite in suites]
    timings = root.with_name(root.name + "_bench_timings.json")
    progress = BenchProgress(parts, key, partial_path, timings, log)
    benches = {
        "lm": lambda lg, missing: [bench_lm(rm, quick, device, cache_dir, lg, missing)],
        "adapters": lambda lg, missing: [bench_adapters(rm, quick, device, cache_dir, lg, missing)],
        "minilm": lambda lg, missing: [bench_minilm(rm, quick, device, cache_dir, lg, missing)],
        "images": lambda lg, missing: bench_images(rm, quick, device, cache_dir, lg, missing),
    }

    def part(name):
        def fn(lg):
            missing: list[str] = []
            return {"sections": [s.as_dict() for s in benches[name](lg, missing)], "missing": missing}

        return fn

    done = [progress.run(name, part(name)) for name, _ in parts]
    return {
        "env": environment(device),
        "quick": quick,
        "started": started,
        "cached": cache_before,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "resumed_parts": [name for name, _ in parts if name not in progress.measured],
        "missing": sorted({m for d in done for m in d["missing"]}),
        "sections": [s for d in done for s in d["sections"]],
    }


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass e.g. --threads 2") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1; pass e.g. --threads 2")
    return value


def main_bench(argv: list[str] | None = None) -> int:
    """``qlora-kit bench``: run the method comparison and write JSON, Markdown and HTML results."""
    parser = argparse.ArgumentParser(
        prog="qlora-kit bench",
        description="Compare quantization methods on "
        "reference models: quality, size, peak memory, quantization time, throughput.",
    )
    parser.add_argument("--quick", action="store_true", help=f"small models and data ({QUICK_TIME_HELP})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", default=None, help="output directory (default: $QLORA_KIT_CACHE/bench or ~/.cache/qlora_kit/bench)"
    )
    parser.add_argument("--suites", default=",".join(_SUITES), help=f"comma-separated subset of {','.join(_SUITES)}")
    parser.add_argument(
        "--cache-dir", default=None, help="reference model cache (default: $QLORA_KIT_CACHE or ~/.cache/qlora_kit)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    suites = tuple(s.strip() for s in args.suites.split(",") if s.strip())
    bad = [s for s in suites if s not in _SUITES]
    if bad:
        parser.error(f"unknown suite(s) {bad}; choose from {list(_SUITES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; run with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from .bench_progress import default_out

    stem = f"comparison_{args.device}{'_quick' if args.quick else ''}"
    out = Path(args.out) if args.out else default_out()
    partial = out / f"{stem}.partial.json"  # finished parts: a killed run resumes from here
    results = run_bench(
        quick=args.quick, device=args.device, suites=suites, cache_dir=args.cache_dir, partial_path=partial
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    paths = write_report(results, out, stem)
    partial.unlink(missing_ok=True)
    print(f"wrote {out / (stem + '.json')}, {paths['markdown']}, {paths['html']} ({results['wall_seconds']} s)")
    return 0


def main_report(argv: list[str] | None = None) -> int:
    """``qlora-kit report RESULTS.json``: render Markdown and HTML from a results file written by bench."""
    parser = argparse.ArgumentParser(
        prog="qlora-kit report", description="Render a bench results JSON as Markdown and self-contained HTML."
    )
    parser.add_argument("results", help="JSON written by qlora-kit bench")
    parser.add_argument("--out", default=None, help="output directory (default: next to the JSON)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        parser.error(f"{path} does not exist; pass a JSON written by qlora-kit bench")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = {UnicodeDecodeError: "not UTF-8 text", RecursionError: "nested too deeply"}.get(type(e), str(e))
        parser.error(f"{path} is not valid JSON ({why}); pass a JSON written by qlora-kit bench")
    except OSError as e:
        parser.error(f"cannot read {path} ({e.strerror or e}); pass a JSON written by qlora-kit bench")
    if not isinstance(results, dict) or "sections" not in results or "env" not in results:
        parser.error(f"{path} is not a qlora-kit bench results file (no 'sections' / 'env')")
    try:
        paths = write_report(results, args.out or path.parent, path.stem)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a results file of another shape
        parser.error(f"{path} is not a results file this qlora-kit can render ({type(e).__name__}: {e})")
    print(f"wrote {paths['markdown']} and {paths['html']}")
    return 0
