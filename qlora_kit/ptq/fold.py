"""Activation statistics and scale folding, shared by AWQ and SmoothQuant.

Layers reading the same input tensor form an :class:`InputGroup`. A per-input-channel scale ``s`` is folded
only where that leaves the model's function unchanged: the producer is found by tensor identity (the op
whose output tensor the layers read, also through a ReLU in between) or by name for inputs that are linear
in a producer's output (``up_proj -> down_proj`` in SwiGLU, ``v_proj -> o_proj`` without grouped KV heads),
and every candidate is checked by running the block with a random scale folded in (post-LN LayerNorms that
also feed a residual fail the check and are left alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calibration import Scope, input_hooks, remove_hooks
from .layers import (
    batched,
    channel_rows,
    expand_channels,
    is_conv,
    is_linear,
    kernel_numel,
    layer_rows,
    set_weight_2d,
    weight_2d,
)


@dataclass
class InputGroup:
    """Layers that read the same input tensor, the op producing it, and statistics of that input.

    ``conv`` groups hold convolutions (channels on dimension 1 of the input), the others linear layers
    (channels last). ``samples`` maps each layer geometry in the group to rows of :func:`layer_rows`.
    """

    key: tuple
    linears: list[tuple[str, nn.Module]]
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    tokens: int = 0
    samples: dict | None = None
    producer: tuple[str, nn.Module] | None = None
    conv: bool = False

    @property
    def channels(self) -> int:
        m = self.linears[0][1]
        return weight_2d(m).shape[1] // kernel_numel(m)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def rows_key(module: nn.Module) -> tuple:
    """What fixes a layer's :func:`layer_rows` for a given input (layers sharing it share the rows)."""
    if is_linear(module):
        return ("linear",)
    attrs = ("kernel_size", "stride", "padding", "dilation", "padding_mode", "output_padding")
    return (type(module).__name__, *(str(getattr(module, a, None)) for a in attrs))


def _is_norm(module: nn.Module, channels: int) -> bool:
    """A per-channel affine normalisation (LayerNorm, RMSNorm, ...) whose weight can absorb 1/s."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() != channels or is_linear(module):
        return False
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.Embedding)):
        return False
    b = getattr(module, "bias", None)
    return "norm" in type(module).__name__.lower() and (b is None or b.numel() == channels)


_CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def _is_channel_norm(module: nn.Module, channels: int) -> bool:
    """An affine normalisation over channel dimension 1 (BatchNorm, GroupNorm): it can absorb 1/s for convs."""
    w = getattr(module, "weight", None)
    return isinstance(module, _CHANNEL_NORMS) and isinstance(w, torch.Tensor) and w.numel() == channels


def _foldable(module: nn.Module, channels: int, conv: bool = False) -> bool:
    if is_linear(module) or is_conv(module):
        return weight_2d(module).shape[0] == channels
    return _is_channel_norm(module, channels) if conv else _is_norm(module, channels)


# producer rules that tensor identity cannot see (the input is a linear function of the producer's output)
_SIBLING_PRODUCERS = {"down_proj": "up_proj", "o_proj": "v_proj", "w2": "w3", "out_proj": "v_proj"}
# ops that commute with a positive per-channel scale: a scale folded before them passes through
_PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def _subsample(group: InputGroup, samples: int) -> None:
    """Keep at most ``samples`` evenly spaced rows of each geometry's gathered input rows."""
    for geom, parts in group.samples.items():
        x = torch.cat(parts)
        idx = torch.linspace(0, x.shape[0] - 1, min(samples, x.shape[0]), device=x.device).round().long()
        group.samples[geom] = x[idx]


def _find_producer(scope: Scope, group: InputGroup, outputs: dict, through: dict) -> tuple[str, nn.Module] | None:
    """The op whose output the group's layers read, if it can absorb a scale: by tensor identity (``outputs``:
    output key -> modules), following pass-through ops (``through``: output key -> input key) back, else by
    name (:data:`_SIBLING_PRODUCERS`) for a single linear layer."""
    members = {id(m) for _, m in group.linears}
    key = group.key[:-1]
    cands = []
    for _ in range(8):  # follow pass-through ops back to a foldable producer
        cands = [(f, m) for f, m in outputs.get(key, []) if id(m) not in members and m is not scope.module]
        cands = [(f, m) for f, m in cands if _foldable(m, group.channels, group.conv)]
        if cands or key not in through:
            break
        key = through[key]
    if cands:
        return max(cands, key=lambda c: c[0].count("."))  # the innermost module
    if len(group.linears) == 1 and not group.conv:
        fqn, _ = group.linears[0]
        parent, _, leaf = fqn.rpartition(".")
        sib = _SIBLING_PRODUCERS.get(leaf)
        sib_fqn = f"{parent}.{sib}" if parent else sib
        sib_mod = next((m for f, m in scope.targets if f == sib_fqn), None)
        if sib_mod is not None and _foldable(sib_mod, group.channels):
            return (sib_fqn, sib_mod)
    return None


def collect_groups(scope: Scope, samples: int, keep_samples: bool, convs: bool = True) -> list[InputGroup]:
    """Run the scope once: group the layers by input tensor, find each input's producer, gather statistics.

    Linear layers always take part; ungrouped convolutions when ``convs``.
    """
    linears = [(f, m) for f, m in scope.targets if is_linear(m) or (convs and is_conv(m))]
    if not linears:
        return []
    first_batch = {"active": True}
    by_key: dict[tuple, InputGroup] = {}
    key_of: dict[str, tuple] = {}
    outputs: dict[tuple, list[tuple[str, nn.Module]]] = {}
    through: dict[tuple, tuple] = {}  # output key -> input key of pass-through ops (ReLU, ...)
    module_names = {id(sub): scope.prefix + sub_name for sub_name, sub in scope.module.named_modules() if sub_name}
    alive: list[torch.Tensor] = []  # first-batch tensors stay referenced so no two share an address

    def observe(fqn, module, x):
        conv = not is_linear(module)
        if fqn not in key_of:
            alive.append(x)
            key = (*_tensor_key(x), conv)
            key_of[fqn] = key
            if key not in by_key:
                c = x.shape[-1] if not conv else batched(module, x).shape[1]
                by_key[key] = InputGroup(
                    key,
                    [],
                    abs_sum=torch.zeros(c, device=x.device),
                    abs_max=torch.zeros(c, device=x.device),
                    samples={},
                    conv=conv,
                )
            by_key[key].linears.append((fqn, module))
        group = by_key[key_of[fqn]]
        geom = rows_key(module)
        if keep_samples and next(f for f, m in group.linears if rows_key(m) == geom) == fqn:
            group.samples.setdefault(geom, []).append(layer_rows(module, x).float())
        if group.linears[0][0] != fqn:
            return  # statistics once per input
        x2 = channel_rows(module, x).float()
        group.abs_sum += x2.abs().sum(0)
        group.abs_max = torch.maximum(group.abs_max, x2.abs().amax(0))
        group.tokens += x2.shape[0]

    def record_output(module, args, out):
        if first_batch["active"] and isinstance(out, torch.Tensor):
            alive.append(out)
            outputs.setdefault(_tensor_key(out), []).append((module_names.get(id(module), ""), module))
            if isinstance(module, _PASS_THROUGH) and args and isinstance(args[0], torch.Tensor):
                if args[0].data_ptr() != out.data_ptr():  # in-place ops keep the key already
                    alive.append(args[0])
                    through[_tensor_key(out)] = _tensor_key(args[0])

    def end_first_batch(module, args, out):
        first_batch["active"] = False

    handles = input_hooks(linears, observe)
    handles += [m.register_forward_hook(record_output) for m in scope.module.modules() if m is not scope.module]
    handles.append(scope.module.register_forward_hook(end_first_batch))
    try:
        scope.run()
    finally:
        remove_hooks(handles)
        alive.clear()
    groups = list(by_key.values())
    for group in groups:
        if keep_samples:
            _subsample(group, samples)
        group.producer = _find_producer(scope, group, outputs, through)
    # a producer feeding two groups (e.g. a linear and a conv reading one tensor) would get both scales
    producer_ids = [id(g.producer[1]) for g in groups if g.producer is not None]
    for g in groups:
        if g.producer is not None and producer_ids.count(id(g.producer[1])) > 1:
            g.producer = None
    return groups


def fold_scale(group: InputGroup, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the layers' input channels by ``s``: the
    composed function is unchanged (checked by :func:`_fold_is_exact` before use)."""
    _, prod = group.producer
    with torch.no_grad():
        if is_linear(prod) or is_conv(prod):
            set_weight_2d(prod, weight_2d(prod).float() / s[:, None])
        else:
            prod.weight.copy_((prod.weight.float() / s).to(prod.weight.dtype))
        b = getattr(prod, "bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_((b.float() / s).to(b.dtype))
        for _, lin in group.linears:
            set_weight_2d(lin, weight_2d(lin).float() * expand_channels(lin, s)[None, :])


def _fold_is_exact(scope: Scope, group: InputGroup, reference: list[torch.Tensor]) -> bool:
    """True when folding a scale through ``group.producer`` leaves the scope's outputs unchanged (tested with a
    random scale on the first calibration batch, then undone)."""
    mods = [group.producer[1]] + [m for _, m in group.linears]
    saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in mods]
    gen = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(group.channels).uniform_(-0.5, 0.5, generator=gen)).to(reference[0].device)
    try:
        fold_scale(group, s)
        out = scope.run(limit=1)[0].float()
    finally:
        for m, state in zip(mods, saved, strict=True):
            m.load_state_dict(state)
    ref = reference[0].float()
    tol = 1e-3 if ref.dtype == torch.float32 and mods[0].weight.dtype == torch.float32 else 3e-2
    return bool(torch.linalg.norm(out - ref) <= tol * torch.linalg.norm(ref).clamp(min=1e-12))


def valid_producers(scope: Scope, groups: list[InputGroup]) -> None:
    """Drop producers whose fold would change the scope's outputs (e.g. a LayerNorm that also feeds a residual)."""
    if not any(g.producer is not None for g in groups):
        return
    reference = scope.run(limit=1)
    for g in groups:
        if g.producer is not None and not _fold_is_exact(scope, g, reference):
            g.producer = None
