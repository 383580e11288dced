"""Preparing a (quantized) model for adapter training: frozen base, fp32 norms, checkpointing."""

from __future__ import annotations

import torch
from torch import nn


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = True, norms_in_fp32: bool = True
) -> nn.Module:
    """The usual preparation of a (quantized) model for adapter training.

    Freezes every parameter, optionally casts normalisation layers to fp32 (stabler training in half
    precision), makes the input embeddings' output require grad (so checkpointed blocks see an input
    that requires grad), and enables non-reentrant gradient checkpointing when the model supports it.

    Returns:
        The same model.

    Example:
        >>> model = prepare_for_kbit_training(quantize(model, NF4Config()))
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if norms_in_fp32:
        for module in model.modules():
            is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
                "norm" in type(module).__name__.lower() and not list(module.children())
            )
            if is_norm:
                for p in module.parameters(recurse=False):
                    if p.is_floating_point() and p.dtype != torch.float32:
                        p.data = p.data.float()
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        try:
            enable()
        except (NotImplementedError, AttributeError):
            _hook_input_grads(model)
    else:
        _hook_input_grads(model)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing through the model's own switch, without the warnings the user
    did not cause: transformers >= 5.2 renamed gradient_checkpointing_enable (the old name warns), and a KV
    cache is useless (and warned about) while training with checkpointing."""
    if not getattr(model, "supports_gradient_checkpointing", True):
        return
    new = getattr(model, "activation_checkpointing_enable", None)
    old = getattr(model, "gradient_checkpointing_enable", None)
    if callable(new):
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    elif callable(old):
        try:
            old(gradient_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:
            old()
    else:
        return
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False


def _hook_input_grads(model: nn.Module) -> None:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, nn.Module):
        emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
