"""The calibration protocol shared by GPTQ, AWQ and SmoothQuant (see ``qlora_kit.ptq``'s docstring).

Prepare (find the repeated blocks), run the calibration inputs up to the first block and keep them, then
block by block: move the block to the device, let the algorithm hook, run and convert it (``process``), and
run it again so that its quantized outputs feed the next block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a hook once the inputs of the first block are captured."""


def _to_device(obj: Any, device) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a module output (a tensor, a tuple, or a transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"the model returned {type(out).__name__} without a tensor; calibration needs tensor outputs")


class _NoCache:
    """Turn off transformers' KV cache while calibrating (a cache would grow with every replayed batch)."""

    def __init__(self, model: nn.Module):
        self.config = getattr(model, "config", None)
        self.saved = getattr(self.config, "use_cache", None)

    def __enter__(self):
        if self.saved is not None:
            self.config.use_cache = False

    def __exit__(self, *exc):
        if self.saved is not None:
            self.config.use_cache = self.saved
        return False


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _find_blocks(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The repeated blocks to calibrate one at a time: the ModuleList of >= 2 same-type children that holds
    the most targets (at least half of them); empty when there is none (e.g. UNets)."""
    best, best_count = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(c) for c in m}) != 1:
            continue
        count = sum(1 for fqn, _ in targets if fqn.startswith(name + "."))
        if count * 2 >= len(targets) and count > best_count:
            best, best_count = name, count
    if best is None:
        return []
    return [(f"{best}.{i}", child) for i, child in enumerate(model.get_submodule(best))]


def _move_outside(model: nn.Module, prefixes: tuple[str, ...], device) -> None:
    """Move the parameters and buffers of every module outside ``prefixes`` to ``device`` (ties kept)."""
    for fqn, module in model.named_modules():
        if fqn and any(fqn == p or fqn.startswith(p + ".") for p in prefixes):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = b.to(device)


@dataclass
class Scope:
    """What an algorithm sees at each calibration step.

    Attributes:
        module: the block being calibrated (or the whole model).
        targets: (fully-qualified name, layer) of the layers to quantize in it.
        run: ``run(limit=None) -> list of output tensors``; runs the block on its kept inputs (or the model
            on the calibration batches), with whatever hooks are registered, without gradients.
        replace: ``replace(fqn, new_module)`` swaps a layer in the model.
        prefix: the model-qualified name of ``module`` plus "." ("" for the whole model).
        batches: how many calibration inputs ``run`` goes through.
    """

    module: nn.Module
    targets: list[tuple[str, nn.Module]]
    run: Callable[..., list[torch.Tensor]]
    replace: Callable[[str, nn.Module], None]
    prefix: str = ""
    batches: int = 1


def calibration_batches(calib_data: Iterable | None, algorithm: str, model: nn.Module | None = None) -> list:
    """``calib_data`` as a list (it is run more than once), or a clear error when there is none or it is of
    the wrong type, dtype, shape or token range for ``model`` (see ``qlora_kit/calib_checks.py``)."""
    from ..calib_checks import check_batches, check_container

    if calib_data is None:
        raise ValueError(f"{algorithm} needs calibration data; pass calib_data=an iterable of model inputs")
    check_container(calib_data, algorithm)
    batches = calib_data if isinstance(calib_data, list) else list(calib_data)
    if not batches:
        raise ValueError(f"{algorithm} got an empty calib_data; pass at least one batch of model inputs")
    if model is not None:
        check_batches(model, batches, algorithm)
    return batches


def calibrate(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    calib_data: Iterable | None,
    device,
    process: Callable[[Scope], None],
    algorithm: str,
) -> None:
    """Run the calibration protocol (see the module docstring), calling ``process`` once per block."""
    batches = calibration_batches(calib_data, algorithm, model)

    def replace(fqn: str, new: nn.Module) -> None:
        model.set_submodule(fqn, new)

    if not targets:
        return
    blocks = _find_blocks(model, targets)
    with _NoCache(model), torch.no_grad():
        remaining = targets
        if blocks:
            remaining = _calibrate_blocks(model, targets, blocks, batches, device, process, replace)
        if remaining:
            if device is not None:
                model.to(device)
            dev = device if device is not None else _model_device(model)
            inputs = [_to_device(b, dev) for b in batches]

            def run_model(limit: int | None = None) -> list[torch.Tensor]:
                return [first_tensor(_call(model, b)) for b in inputs[:limit]]

            process(Scope(model, remaining, run_model, replace, batches=len(inputs)))


def _calibrate_blocks(model, targets, blocks, batches, device, process, replace):
    prefixes = tuple(name for name, _ in blocks)
    if device is not None:
        _move_outside(model, prefixes, device)
    dev = device if device is not None else _model_device(model)
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("past_key_values", None)  # never replay into a cache
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _StopForward

    handle = blocks[0][1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                _call(model, _to_device(b, dev))
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(
            f"calibration reached the first block {prefixes[0]!r} in {len(captured)} of {len(batches)} "
            "batches; every calibration batch must run through the model's blocks"
        )
    inputs = captured
    for name, block in blocks:
        if device is not None:
            block.to(device)

        def run_block(limit: int | None = None, block=block, inputs=inputs) -> list[torch.Tensor]:
            return [first_tensor(block(*a, **k)) for a, k in inputs[:limit]]

        block_targets = [(f, m) for f, m in targets if f.startswith(name + ".")]
        if block_targets:
            process(Scope(block, block_targets, run_block, replace, prefix=name + ".", batches=len(inputs)))
        outs = run_block()
        inputs = [_with_hidden(a, k, o) for (a, k), o in zip(inputs, outs, strict=True)]
    return [(f, m) for f, m in targets if not any(f.startswith(p + ".") for p in prefixes)]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The next block's inputs: the same arguments with the hidden states replaced."""
    if args:
        if args[0].shape != hidden.shape:
            raise RuntimeError(
                f"a block returned shape {tuple(hidden.shape)} for input {tuple(args[0].shape)}; the repeated "
                "blocks do not chain, so layer-by-layer calibration cannot run on this model"
            )
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise RuntimeError("cannot find the hidden states among a block's inputs; pass them positionally or by name")


def input_hooks(targets: list[tuple[str, nn.Module]], fn: Callable[[str, nn.Module, torch.Tensor], None]):
    """Forward pre-hooks calling ``fn(fqn, module, input)`` for each target; returns the handles."""

    def make(fqn):
        def hook(module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            fn(fqn, module, x.detach())

        return hook

    return [m.register_forward_pre_hook(make(f), with_kwargs=True) for f, m in targets]


def remove_hooks(handles) -> None:
    """Remove the hooks :func:`input_hooks` (or any ``register_*_hook``) returned."""
    for h in handles:
        h.remove()
