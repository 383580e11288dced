"""What every weight format provides.

A format object is a small ``nn.Module`` that owns the packed codes and scales of one weight as
frozen parameters (``nn.Parameter(..., requires_grad=False)``: ``.to(device)``, ``state_dict`` and
safetensors work unchanged, and FSDP2, which shards parameters but replicates buffers, shards them)
plus a little JSON metadata. Formats see a 2-D matrix: rows are output channels, columns the reduction dimension;
quantized layers reshape conv / Conv1D / ConvTranspose weights to that view and back.

Contract (each format class, one file each; :class:`WeightFormat` gives the defaults shared by all, and a
family of formats may share one more base, as NF4 / FP4 do in ``_fourbit`` and int8 / fp8 in ``_channelwise``):

- ``name``: the format's key ("nf4", "fp4", "int8", "int4", "fp8", ...).
- ``configs``: the config classes that produce it (the first is the weight-only one); ``@register_format``
  records the class under its name and each config (``qlora_kit.registry``).
- ``config_from_options(**options)``: that weight-only config from the recipe / CLI knobs
  (``compute_dtype``, ``blocksize``, ``double_quant``, ``group_size``; each format takes the ones it has).
- ``available()``: whether this installation can hold the format (fp8 needs torch's float8 dtypes).
- ``linear(x, bias, activation=None)``: y = x W^T + bias through the format's ``qlora_kit.ops`` custom op.
- ``describe(config)``: the format with its settings in words ("nf4 (blocks of 64, double quant)").
- ``nbytes_for(shape, config)``: bytes a (rows, cols) matrix takes, from its shape alone (memory estimates).
- ``kernel_weight()``: the weight as the fused LoRA kernel's operand (``kernels/lora.py``), or None when that
  kernel does not take this format (LoRA then adds its update to the format's own ``linear``).
- ``from_float(w, config, *, tensor_name="weight")``: quantize a 2-D float matrix. NaN or Inf in
  ``w`` raises ValueError naming ``tensor_name``.
- ``dequantize(dtype)``: the 2-D matrix back in ``dtype``.
- ``metadata()``: JSON-serialisable dict with "format" and "shape" and what else is needed to
  rebuild the object (blocksize, group size, ...).
- ``from_metadata(meta)``: an object with correctly shaped, empty tensors, ready for
  ``load_state_dict``.
- ``nbytes()``: bytes of the packed codes and their scales together.
- ``device``: where the codes live (PEFT reads ``layer.qweight.device``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import get_format, register_format

__all__ = [
    "WeightFormat",
    "check_finite",
    "check_matrix",
    "config_from_options",
    "get_format",
    "numel",
    "packed_nbytes",
    "refuse_activation",
    "register_format",
    "register_frozen",
]


def config_from_options(config_cls: type, **options):
    """``config_cls`` built from the options it has (recipe / CLI knobs it lacks, e.g. ``group_size`` for NF4,
    are ignored); ``None`` values are left to the config's defaults."""
    fields = config_cls.__dataclass_fields__
    return config_cls(**{k: v for k, v in options.items() if k in fields and v is not None})


def refuse_activation(name: str, activation: str) -> None:
    """ValueError for an activation mode (W8A8 / fp8 rowwise) that a format's weights cannot run."""
    raise ValueError(
        f"activation={activation!r} needs an {activation!r} weight, got {name!r}; requantize the weight with the "
        "matching config or use activation=None"
    )


def check_finite(w: torch.Tensor, tensor_name: str) -> None:
    """Raise a clear ValueError when ``w`` holds NaN or Inf (quantizing them is meaningless)."""
    if not torch.isfinite(w).all():
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise ValueError(
            f"cannot quantize {tensor_name!r}: it holds {n_nan} NaN and {n_inf} Inf values; "
            "fix the weights (or exclude this layer with filter_fn) before quantizing"
        )


def check_matrix(w: torch.Tensor, tensor_name: str) -> None:
    """Formats quantize 2-D floating-point matrices; say so clearly otherwise."""
    if w.dim() != 2:
        raise ValueError(f"{tensor_name!r} must be a 2-D matrix for quantization, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{tensor_name!r} must be a floating-point tensor, got {w.dtype}")
    check_finite(w, tensor_name)


def register_frozen(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register packed codes or scales as a frozen parameter (never trained, never given to an optimizer
    that filters on ``requires_grad``; a parameter rather than a buffer so that FSDP2 shards it)."""
    module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def packed_nbytes(module: torch.nn.Module) -> int:
    """Bytes of the packed codes and scales of a format module (its own frozen parameters and buffers)."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


def numel(shape) -> int:
    return math.prod(int(s) for s in shape)


class WeightFormat(nn.Module):
    """The defaults of the contract above; a format sets ``name``, ``listing_order`` (its position in CLI choices
    and reports), ``configs``, ``meta_fields`` (constructor arguments after ``shape`` that its metadata carries)
    and overrides what differs."""

    name = ""
    listing_order = 99
    configs: tuple[type, ...] = ()
    meta_fields: tuple[str, ...] = ()

    @classmethod
    def config_from_options(cls, **options):
        """The weight-only config (``configs[0]``) from the recipe / CLI knobs it has."""
        return config_from_options(cls.configs[0], **options)

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def describe(cls, config) -> str:
        return cls.name

    def kernel_weight(self):
        """None: the fused LoRA kernel does not take this format (LoRA adds its update to ``linear``'s output)."""
        return None

    def metadata(self) -> dict:
        return {"format": self.name, "shape": list(self.shape), **{f: getattr(self, f) for f in self.meta_fields}}

    @classmethod
    def from_metadata(cls, meta: dict):
        return cls(meta["shape"], *(meta[f] for f in cls.meta_fields))

    @property
    def device(self) -> torch.device:
        """Where the codes live (PEFT reads ``layer.qweight.device`` of layers that have a ``qweight``)."""
        return next(self.parameters(recurse=False)).device

    def nbytes(self) -> int:
        return packed_nbytes(self)

    def extra_repr(self) -> str:
        return ", ".join([f"shape={self.shape}", *(f"{f}={getattr(self, f)}" for f in self.meta_fields)])
