"""``distributed: fsdp``: the quantized base sharded across processes with FSDP2, through accelerate.

How the packed base shards: a format object holds its packed codes and scales as frozen
``nn.Parameter``s (``qlora_kit/formats``), so FSDP2's ``fully_shard`` splits every one of them along
dim 0 (uneven sizes padded), one FSDP group per decoder layer (accelerate's transformer wrap policy),
one for the embeddings, one for the final norm + output head, one for the rest. Before a group's
forward (and again before its backward) FSDP2 all-gathers the group's shards *as stored*: uint8 / int8
codes, fp8 codes, fp32 / bf16 scales in one flat byte buffer (a group of mixed dtypes is gathered as
uint8), never dequantized floats; the layer then reads the gathered tensors by attribute at call time
and frees them after. Only NF4 / FP4's 0-dim double-quant ``offset`` is a buffer (FSDP2 does not shard
0-dim parameters): 4 bytes replicated per layer. No tensor subclass is needed because nothing about
the packed layout depends on its row split: the formats' kernels only ever see whole, gathered tensors.

Mixed precision: FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` would cast the fp32 / bf16 scales
and fp8 codes before the all-gather, so the policy here casts nothing; compute runs in the recipe's
``compute_dtype`` and under accelerate's autocast, as on one process.

accelerate enables FSDP on accelerators only; on CPUs (torch's gloo backend, which FSDP2 supports) the
state accelerate built for data parallel is switched to its FSDP mode so that the same
``Accelerator.prepare`` path runs there as on GPUs (this is how the CPU tests exercise it).

Checkpoints hold the adapter only: the trainable tensors and the optimizer state are gathered in full
(every process takes part, the main process writes) and scattered back into the shards on resume.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


def wanted(recipe) -> bool:
    """True when the recipe asks for FSDP and there are several processes to shard over."""
    return recipe.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def plugin(recipe):
    """accelerate's FSDP2 plugin for a recipe (transformer-block groups, no casting of the packed base)."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    # offloaded shards are pinned for fast host-to-device copies; pinning needs an accelerator (CPU runs hold
    # their shards in plain host memory, which is where the offload keeps them anyway)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if recipe.fsdp_cpu_offload else OffloadPolicy()
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        cpu_offload=offload,
        mixed_precision_policy=MixedPrecisionPolicy(),
        state_dict_type="FULL_STATE_DICT",
        # accelerate wraps every decoder layer in torch's non-reentrant CheckpointWrapper; adapter paths skip the
        # wrapper's name (``lora.lora_layers``), so adapters save under the model's own names
        activation_checkpointing=recipe.fsdp_activation_checkpointing,
        cpu_ram_efficient_loading=False,
    )


def accelerator(recipe, mixed_precision: str):
    """An ``Accelerator`` in FSDP2 mode (GPUs: nccl; CPUs: gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    fsdp_plugin = plugin(recipe)
    acc = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), fsdp_plugin=fsdp_plugin)
    if acc.distributed_type == DistributedType.MULTI_CPU:  # see the module docstring
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = fsdp_plugin
    if not acc.is_fsdp2:
        from ..recipe import RecipeError

        raise RecipeError(f"distributed=fsdp could not start FSDP2 ({acc.distributed_type}); use distributed=ddp")
    return acc


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this process holds: {"base": packed codes + scales of quantized layers (local shards),
    "trainable": local shards of trainable parameters, "other": the rest}."""
    from ..nn.quantized import QuantizedLayer

    packed = {id(p) for m in model.modules() if isinstance(m, QuantizedLayer) for p in m.qweight.parameters()}
    out = {"base": 0, "trainable": 0, "other": 0}
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        kind = "trainable" if p.requires_grad else "base" if id(p) in packed else "other"
        out[kind] += t.numel() * t.element_size()
    return out


def _trainable(models: dict[str, nn.Module]):
    for role, model in models.items():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad:
                    yield role, model, module, name, p


class _FullOptimizer:
    """Stands in for an optimizer inside :func:`full_state`: ``state_dict()`` is its full state (gathered
    when the context opened), ``load_state_dict`` is applied to the shards when the context closes."""

    def __init__(self, model: nn.Module, optimizer, gather: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.model, self.optimizer, self.pending = model, getattr(optimizer, "optimizer", optimizer), None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # gathered when loading too: resume checks a checkpoint's optimizer state against this one first
        self.full = get_optimizer_state_dict(model, self.optimizer, options=options)

    def state_dict(self) -> dict:
        return self.full

    def load_state_dict(self, state: dict) -> None:
        self.pending = state

    def apply(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if self.pending is not None:
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, self.pending, options=options)


@contextlib.contextmanager
def full_state(models: dict[str, nn.Module], optimizers: dict, *, saving: bool):
    """Every process: the sharded trainable parameters swapped for full CPU copies, and the optimizers for
    :class:`_FullOptimizer`; yields the optimizers to use. On exit the (possibly loaded) full values go back
    into the shards. The frozen base is never gathered. A no-op for models that are not sharded.
    """
    if not any(is_sharded(m) for m in models.values()):
        yield optimizers
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    full_opts = {role: _FullOptimizer(models[role], opt, saving) for role, opt in optimizers.items()}
    swapped = []
    for _, _, module, name, p in _trainable(models):
        if isinstance(p, DTensor):
            full = nn.Parameter(p.full_tensor().detach().cpu(), requires_grad=True)
            module._parameters[name] = full
            swapped.append((module, name, p, full))
    try:
        yield full_opts
    finally:
        for module, name, p, full in swapped:
            module._parameters[name] = p
            if not saving:
                shard = distribute_tensor(full.detach().to(p.device_mesh.device_type), p.device_mesh, p.placements)
                with torch.no_grad():
                    p.to_local().copy_(shard.to_local())
        if not saving:
            for opt in full_opts.values():
                opt.apply()


def banner_note(models: dict[str, nn.Module]) -> str:
    """`` · FSDP2: base X + adapters Y per process`` for sharded runs, else ""."""
    if not any(is_sharded(m) for m in models.values()):
        return ""
    from .report import fmt_bytes

    held = [local_bytes(m) for m in models.values()]
    base, trainable = sum(h["base"] for h in held), sum(h["trainable"] for h in held)
    return f" · FSDP2: packed base {fmt_bytes(base)} + adapters {fmt_bytes(trainable)} per process"
