"""A readable summary of :class:`qlora_kit.lora.MergeReport` (what ``print(merge_lora(model))`` shows).

Example output::

    merged LoRA into 14 layers · output drift 0.33% (largest relative change of a merged layer's output)
      largest layer drifts: model.layers.1.self_attn.q_proj 0.33% · model.layers.0.self_attn.q_proj 0.20% · ...
      weight drift from requantizing: up to 0.12% (model.layers.1.self_attn.q_proj)
"""

from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:.2g}%" if x < 0.001 else f"{100 * x:.2f}%"


def format_merge_report(report, top: int = 3) -> str:
    """A few lines: how many layers were merged, the output drift and where it is largest."""
    if not report.merged:
        return "merged nothing: the model has no active LoRA adapters"
    lines = [
        f"merged LoRA into {len(report.merged)} layer{'s' if len(report.merged) != 1 else ''} · output drift "
        f"{_pct(report.output_drift)} (relative change of the output caused by merging, on a probe input)"
    ]
    worst = sorted(report.layer_output_drift.items(), key=lambda kv: -kv[1])[:top]
    if worst:
        more = " · ..." if len(report.layer_output_drift) > top else ""
        lines.append("  largest layer drifts: " + " · ".join(f"{k} {_pct(v)}" for k, v in worst) + more)
    if report.weight_drift:
        name, value = max(report.weight_drift.items(), key=lambda kv: kv[1])
        lines.append(f"  weight drift from requantizing: up to {_pct(value)} ({name})")
    return "\n".join(lines)
