"""What a run prints: the resolved config, the banner before training and the summary after it."""

from __future__ import annotations

import torch

from ..recipe import Recipe
from . import fsdp
from .report import banner, fmt_bytes, fmt_count, fmt_rate, peak_memory


def compact_yaml(recipe: Recipe, width: int = 110) -> str:
    """The resolved recipe as ``key: value`` pairs (dotted for ``lora.*``), a few per line, wrapped near ``width``
    columns; the description is left out (the banner shows it). config.yaml holds the same values as YAML."""
    import yaml

    from ..recipe import to_dict

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif k != "description":
                text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
                yield f"{prefix}{k}: {text.removesuffix(chr(10) + '...').strip()}"

    lines, line = [], ""
    for item in flat(to_dict(recipe)):  # whole pairs per line, never split inside one
        if line and len(line) + 3 + len(item) > width:
            lines.append(line)
            line = ""
        line = f"{line} · {item}" if line else f"  {item}"
    return "\n".join([*lines, line] if line else lines)


def size_line(built) -> str:
    """The base's size before and after quantization, by format, and the trainable bytes."""
    kinds = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in built.bytes_by_kind.items())
    return (
        f"base {fmt_bytes(built.bytes_float)} float -> {fmt_bytes(built.bytes_now)} ({kinds}) "
        f"+ {fmt_bytes(built.bytes_trainable)} trainable"
    )


def quant_desc(recipe: Recipe) -> str:
    """The recipe's quantization in words (``nf4 (blocks of 64, double quant)``)."""
    if recipe.quantization == "none":
        return "not quantized (LoRA on the float base)"
    from ..registry import get_format, weight_config

    options = dict(blocksize=recipe.blocksize, double_quant=recipe.double_quant, group_size=recipe.group_size)
    return get_format(recipe.quantization).describe(weight_config(recipe.quantization, **options))


def lora_desc(recipe: Recipe) -> str:
    """The recipe's adapters in words (``LoRA r=16 alpha=32 dropout=0.05 on all-linear``)."""
    lo = recipe.lora
    tm = lo.target_modules if isinstance(lo.target_modules, str) else ",".join(lo.target_modules)
    extra = "".join([" rslora" if lo.use_rslora else "", " dora" if lo.use_dora else ""])
    return f"LoRA r={lo.r} alpha={lo.alpha:g} dropout={lo.dropout:g} on {tm}{extra}"


def run_banner(recipe: Recipe, run, built, data, resume_from, start_step: int) -> str:
    """The banner printed before the first step: model, sizes, adapters, data, steps, optimizer, devices."""
    acc = run.acc
    per_step = run.global_batch * (recipe.seq_len if run.obj.unit == "tokens" else 1)
    devices = f"{acc.device.type} x {run.world}" + (
        f" ({torch.cuda.get_device_name(acc.device)})" if acc.device.type == "cuda" else ""
    )
    lines = [
        ("model", f"{built.description} · {fmt_count(built.n_params)} params · {quant_desc(recipe)}"),
        ("size", f"{size_line(built)} · {built.quantized_layers} quantized layers"),
        (
            "adapters",
            f"{lora_desc(recipe)} · {built.lora_layers} layers · {fmt_count(built.n_trainable)} trainable "
            f"({100 * built.n_trainable / max(1, built.n_params):.2f}%)",
        ),
        ("data", data.summary),
        (
            "steps",
            f"{run.max_steps} = {run.max_steps / run.sampler.steps_per_epoch:.2g} epochs "
            f"({run.sampler.steps_per_epoch} steps each{', set by max_steps' if recipe.max_steps else ''}) · "
            f"batch {recipe.batch_size} x "
            f"{recipe.grad_accum_steps} accum x {run.world} proc = {run.global_batch} "
            f"({fmt_count(per_step)} {run.obj.unit}) per step",
        ),
        (
            "optimizer",
            f"{run.opt_desc} lr {recipe.learning_rate:g} · {recipe.lr_schedule}, warmup {recipe.warmup_steps}"
            f" · clip {recipe.max_grad_norm} · wd {recipe.weight_decay:g}"
            + (" · gradient checkpointing" if recipe.gradient_checkpointing else ""),
        ),
        (
            "devices",
            f"{devices} · precision {acc.mixed_precision} · compute {_compute(recipe)}" + fsdp.banner_note(run.models),
        ),
        ("output", f"{run.recipe.output_dir} (config.yaml, metrics.jsonl, checkpoints/, adapter/)"),
    ]
    if resume_from is not None:
        lines.append(("resume", f"from {resume_from} (step {start_step})"))
    return banner(lines, f"qlora-kit finetune · {recipe.objective} · {recipe.description or recipe.model}")


def _compute(recipe: Recipe) -> str:
    from .build import compute_dtype

    return str(compute_dtype(recipe)).replace("torch.", "")


def run_summary(recipe, run, losses, last_eval, elapsed, units_done, start_step, out_dir) -> str:
    """The banner printed after the run: losses, evaluation, where the adapter and metrics are, what next."""
    steps = len(losses)
    vals = list(losses.values())
    tail = vals[-max(1, min(10, len(vals) // 5)) :]
    label, mem = peak_memory(run.device)
    lines = [
        (
            "train loss",
            f"{vals[0]:.4f} (step {start_step + 1}) -> {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)"
            if vals
            else "no steps run",
        ),
    ]
    if last_eval:
        lines.append(
            ("eval", " · ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()) + run.obj.eval_protocol(run))
        )
    adapter = out_dir / "adapter"
    lines += [
        ("adapter", f"{adapter} (PEFT format: adapter_config.json + adapter_model.safetensors)"),
        ("metrics", str(out_dir / "metrics.jsonl")),
    ]
    if recipe.merge_adapter:
        lines.append(("merged", str(out_dir / "merged")))
    lines += run.obj.next_steps(out_dir)
    title = (
        f"done · {steps} steps in {elapsed:.1f} s · {fmt_rate(units_done / max(elapsed, 1e-9))} "
        f"{run.obj.unit}/s · peak {label} {mem:.0f} MB"
    )
    return banner(lines, title)
