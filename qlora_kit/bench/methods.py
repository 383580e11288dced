"""The rows of a comparison: our methods (one round-to-nearest row per registered weight format, the PTQ
algorithms, W8A8) and the peers when installed, and running them into a :class:`Section`."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .measure import PeakMemory, installed_version, sync, weight_bytes

F32 = torch.float32


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


def compute_dtype_for(device: str) -> torch.dtype:
    """The dtype quantized layers compute in: bf16 on CUDA, fp32 on the CPU (numbers comparable to the
    bitsandbytes peer, whose CPU path computes in fp32)."""
    return torch.bfloat16 if device == "cuda" else F32


def rtn_configs(cd: torch.dtype) -> dict[str, object]:
    """One round-to-nearest row per registered weight format: blocks of 64 with double quantization for the
    block formats, groups of 128 for the grouped ones (the group size is in the row's name: "int4 g128 RTN")."""
    from .. import registry
    from .formats import format_variants

    out = {}
    for _, name, opts in format_variants(blocksize=64, group_size=128):
        if registry.get_format(name).available():
            group = f" g{opts['group_size']}" if "group_size" in opts else ""
            out[f"{name}{group} RTN"] = registry.weight_config(name, compute_dtype=cd, **opts)
    return out


def method_configs(device: str) -> dict[str, object]:
    """{row name: config} of our post-training methods on ``device``: every registered weight format by
    round-to-nearest, then HQQ, GPTQ and AWQ at int4 g128, then W8A8 dynamic and with SmoothQuant."""
    import qlora_kit as qk

    cd = compute_dtype_for(device)
    return rtn_configs(cd) | {
        "int4 g128 HQQ": qk.HQQConfig(group_size=128, compute_dtype=cd),
        "int4 g128 GPTQ": qk.GPTQConfig(bits=4, group_size=128, compute_dtype=cd),
        "int4 g128 AWQ": qk.AWQConfig(group_size=128, compute_dtype=cd),
        "W8A8 dynamic": qk.Int8DynamicActivationConfig(compute_dtype=cd),
        "W8A8 SmoothQuant": qk.SmoothQuantConfig(alpha=0.5, compute_dtype=cd),
    }


def _quantize_with(config):
    import qlora_kit

    def apply(model, ctx):
        return qlora_kit.quantize(model, config, calib_data=ctx.get("calib"), device=ctx.get("device_arg"))

    return apply


def bnb_dequantized(kind: str):
    """Peer: bitsandbytes quantize -> dequantize of every quantized-by-default layer (its numerics; the
    float layers then compute with the dequantized weights, as bitsandbytes' CPU path does)."""

    def apply(model, ctx):
        import bitsandbytes.functional as bf

        from ..api import default_filter
        from ..ptq import is_linear

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


def one_line(e: BaseException) -> str:
    """``"ErrorType: first line of the message"`` (at most 200 characters), for a note under a table."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _linear_filter(model: nn.Module):
    """Linear layers our default filter quantizes (what the peers are applied to, for a like-for-like row)."""
    from ..api import default_filter

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
        why = one_line(e)
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
    if installed_version("bitsandbytes"):
        peers.append(
            Method(
                "bnb nf4 (peer)",
                "peer",
                bnb_dequantized("nf4"),
                sized=False,
                note="bitsandbytes quantize_4bit / dequantize_4bit (nf4, blocks of 64, double quant); "
                "quality only: the model computes with the dequantized weights",
            )
        )
        peers.append(
            Method(
                "bnb int8 weights (peer)",
                "peer",
                bnb_dequantized("int8"),
                sized=False,
                note="LLM.int8()'s weight rounding (row absmax / 127) without its outlier split; quality only",
            )
        )
    else:
        note_missing.append("bitsandbytes")
    if installed_version("torchao"):
        for kind in ("int8", "int4"):
            try:
                _, desc, why = _torchao_config(kind, device)
            except Exception as e:  # an installed but unusable torchao: say why, run the rest
                peers.append(Method(f"torchao {kind} (peer)", "peer", None, note=f"not run: {one_line(e)}"))
                continue
            note = f"{desc} via quantize_ on the same Linear layers; torchao's tensor subclasses compute"
            note += f"; size not measured (torchao's own storage). {why}" if why else "; size not measured"
            peers.append(Method(f"torchao {kind} (peer)", "peer", _torchao(kind, device), sized=False, note=note))
    else:
        note_missing.append("torchao")
    if installed_version("optimum-quanto"):
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
    out = [Method("float", "float", None)]
    for name, cfg in method_configs(device).items():
        fam = "activation" if name.startswith("W8A8") else "weight-only"
        calibrated = type(cfg).__name__ in ("GPTQConfig", "AWQConfig", "SmoothQuantConfig")
        out.append(Method(name, fam, _quantize_with(cfg), calibrated))
    return out + (_peer_methods(note_missing, device) if peers else [])


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


def run_method(
    method: Method, float_model: nn.Module, ctx: dict, device: str, evaluate: Callable[[nn.Module], dict], log
) -> tuple[dict, nn.Module]:
    """Apply ``method`` to a copy of ``float_model`` and measure it: (row, the model it made).

    The row holds ``evaluate(model)``'s values, the quantization time, the peak memory of copying, quantizing
    and evaluating, and the weights' size and bits per quantized parameter (when ``method.sized``).
    """
    row = {"method": method.name, "family": method.family}
    with PeakMemory(device) as peak:
        model = copy.deepcopy(float_model)
        t0 = time.perf_counter()
        if method.apply is not None:
            model = method.apply(model, ctx) or model
        sync(device)
        row["quant_seconds"] = round(time.perf_counter() - t0, 2) if method.apply is not None else None
        row.update(evaluate(model))
    row["peak_mem_bytes"] = peak.bytes
    row["size_bytes"], row["bits"] = weight_bytes(model) if method.sized else (None, None)
    log(f"  {method.name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("method", "family")))
    return row, model


def run_rows(section: Section, methods: list[Method], float_model, ctx, device, evaluate, log, protocol=None) -> None:
    """Run every method into ``section.rows``; a peer that fails is noted (one line), not fatal. The first
    row's ``_protocol`` goes into the section's protocol through ``protocol(text)``."""
    for method in methods:
        if method.family == "peer" and method.apply is None:
            section.notes.append(f"{method.name}: {method.note}")
            continue
        try:
            row, model = run_method(method, float_model, ctx, device, evaluate, log)
        except Exception as e:
            if method.family != "peer":
                raise
            log(f"  {method.name}: failed: {one_line(e)}")
            section.notes.append(f"{method.name}: not run here: {one_line(e)}")
            continue
        proto = row.pop("_protocol", None)
        if proto and protocol is not None and not section.protocol:
            section.protocol.append(protocol(proto))
        section.rows.append(row)
        del model


# --------------------------------------------------------------------------------------------- the LM
