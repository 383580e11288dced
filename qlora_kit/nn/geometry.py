"""Layer geometry: each supported layer's weight seen as a 2-D (output channels x rest) matrix, and back.

The weight formats store that matrix; fake-quant (QAT), LoRA (merges, PiSSA, LoftQ, DoRA norms) and PTQ
(GPTQ's Hessians, AWQ / SmoothQuant scales) compute on it. This table is the one place that knows how each
layer type lays out its weight:

    layer                          float weight              2-D view
    nn.Linear                      (out, in)                 (out, in)
    transformers Conv1D (GPT-2)    (in, out)                 (out, in)                  transposed
    nn.Conv1d / 2d / 3d            (out, in / groups, *k)    (out, in / groups * prod(k))
    nn.ConvTranspose1d / 2d / 3d   (in, out / groups, *k)    (out / groups, in * prod(k))
    nn.Embedding                   (num, dim)                (num, dim)                 one row per token

A convolution's columns are (input channel, kernel position), channel-major. Quantized layers name their
geometry in a ``geometry`` class attribute; float layers (and their subclasses: fake-quant layers, Falcon's
``FalconLinear``) are matched with ``isinstance``.

Example:
    >>> w2d = to_2d(conv, conv.weight)                 # (out, in * kh * kw)
    >>> w = from_2d(conv, w2d * 2, conv.weight.shape)  # back to (out, in, kh, kw)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """How one kind of layer stores its weight: ``to_2d(w)`` and ``from_2d(w2d, float_shape)``."""

    name: str
    to_2d: Callable[[torch.Tensor], torch.Tensor]
    from_2d: Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def _same(w: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    return w


def _transpose(w: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    return w.t()


def _out_major(w: torch.Tensor) -> torch.Tensor:  # (out, in / groups, *k) -> (out, rest)
    return w.reshape(w.shape[0], -1)


def _out_major_back(w2d: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return w2d.reshape(shape)


def _in_major(w: torch.Tensor) -> torch.Tensor:  # (in, out / groups, *k) -> (out / groups, in * k)
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def _in_major_back(w2d: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return w2d.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)


LINEAR = Geometry("linear", _same, _same)
CONV1D = Geometry("conv1d", _transpose, _transpose)
CONV = Geometry("conv", _out_major, _out_major_back)
CONV_TRANSPOSE = Geometry("conv_transpose", _in_major, _in_major_back)
EMBEDDING = Geometry("embedding", _same, _same)

KINDS = {g.name: g for g in (LINEAR, CONV1D, CONV, CONV_TRANSPOSE, EMBEDDING)}
GEOMETRY: dict[type, Geometry] = {
    nn.Linear: LINEAR,
    nn.Conv1d: CONV,
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
    nn.ConvTranspose1d: CONV_TRANSPOSE,
    nn.ConvTranspose2d: CONV_TRANSPOSE,
    nn.ConvTranspose3d: CONV_TRANSPOSE,
    nn.Embedding: EMBEDDING,
}


def _is_conv1d_class(cls: type) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__)


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D or a subclass (checked by name, so transformers need not be imported)."""
    return _is_conv1d_class(type(module))


def geometry_of(module_or_kind) -> Geometry | None:
    """The geometry of a layer (instance or class), a kind name ("linear", "conv", ...) or a Geometry; None
    when the layer type has no 2-D weight view here."""
    if isinstance(module_or_kind, Geometry):
        return module_or_kind
    if isinstance(module_or_kind, str):
        return KINDS.get(module_or_kind)
    cls = module_or_kind if isinstance(module_or_kind, type) else type(module_or_kind)
    own = getattr(cls, "geometry", None)  # quantized layers: a class attribute
    if isinstance(own, Geometry):
        return own
    if _is_conv1d_class(cls):
        return CONV1D
    return next((g for float_cls, g in GEOMETRY.items() if issubclass(cls, float_cls)), None)


def _require(module_or_kind) -> Geometry:
    geom = geometry_of(module_or_kind)
    if geom is None:
        name = module_or_kind.__name__ if isinstance(module_or_kind, type) else type(module_or_kind).__name__
        raise TypeError(f"{name} has no 2-D weight view; supported: Linear, Conv1D, ConvNd, ConvTransposeNd, Embedding")
    return geom


def to_2d(module_or_kind, w: torch.Tensor) -> torch.Tensor:
    """``w`` (the layer's float weight layout) as its (output channels x rest) matrix; a view where possible.

    Args:
        module_or_kind: a layer, a layer class, a kind name or a :class:`Geometry`.
        w: a weight in that layer's float layout.

    Raises:
        TypeError: the layer type has no 2-D view.
    """
    return _require(module_or_kind).to_2d(w)


def from_2d(module_or_kind, w2d: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`to_2d`: ``w2d`` back in the float layout of a weight of shape ``shape``."""
    return _require(module_or_kind).from_2d(w2d, tuple(shape))


def shape_2d(module_or_kind, shape: Sequence[int]) -> tuple[int, int]:
    """The (rows, cols) of the 2-D view of a weight of float shape ``shape`` (nothing allocated)."""
    return tuple(to_2d(module_or_kind, torch.empty(tuple(shape), device="meta")).shape)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (or a subclass) or transformers' Conv1D: a layer computing x W^T + b on its 2-D view."""
    return isinstance(module, nn.Linear) or is_transformers_conv1d(module)
