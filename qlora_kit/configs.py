"""Weight-format configs: frozen dataclasses validated on construction.

Each subclasses :class:`WeightConfig`; the format class that lists it in its ``configs``
(``qlora_kit/formats``) produces its weights, found through ``qlora_kit.registry.format_for_config``.
Invalid values raise ValueError listing the allowed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT4_GROUP_SIZES = (32, 64, 128)
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_compute_dtype(cls_name: str, dtype) -> None:
    """ValueError naming the allowed compute dtypes when ``dtype`` is not one of them."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{cls_name}.compute_dtype must be one of {[str(d) for d in COMPUTE_DTYPES]}, got {dtype!r}")


def _check_choice(cls_name: str, field: str, value, allowed) -> None:
    if type(value) is not type(allowed[0]) or value not in allowed:  # 64.0 and True are not sizes
        raise ValueError(f"{cls_name}.{field} must be one of {list(allowed)}, got {value!r}")


class WeightConfig:
    """Base of every weight-format config: ``quantize(model, config)`` rounds each chosen layer's weight to the
    format registered for the config's type (``qlora_kit.registry``); ``compute_dtype`` is the dtype layers compute in.
    Algorithm configs (GPTQ, AWQ, ...) are not WeightConfigs: they carry one as their ``weight`` field."""

    compute_dtype: torch.dtype


@dataclass(frozen=True)
class NF4Config(WeightConfig):
    """4-bit NormalFloat weights, bitsandbytes-compatible (QLoRA's format).

    Args:
        blocksize: values per absmax block: 32, 64, 128, ..., 4096.
        double_quant: quantize the absmax values again (8-bit, blocks of 256): ~0.37 bits/param saved.
        compute_dtype: dtype the layer computes in (weights dequantize to it).
    """

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        _check_choice(type(self).__name__, "blocksize", self.blocksize, BLOCKSIZES_4BIT)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"NF4Config.double_quant must be one of [True, False], got {self.double_quant!r}")
        check_compute_dtype(type(self).__name__, self.compute_dtype)


@dataclass(frozen=True)
class FP4Config(WeightConfig):
    """4-bit float weights (1 sign, 2 exponent, 1 mantissa bit), bitsandbytes-compatible.

    Args: as :class:`NF4Config`.
    """

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        _check_choice(type(self).__name__, "blocksize", self.blocksize, BLOCKSIZES_4BIT)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"FP4Config.double_quant must be one of [True, False], got {self.double_quant!r}")
        check_compute_dtype(type(self).__name__, self.compute_dtype)


@dataclass(frozen=True)
class Int8WeightConfig(WeightConfig):
    """int8 weight-only, symmetric per output channel (W8A16)."""

    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        check_compute_dtype(type(self).__name__, self.compute_dtype)


@dataclass(frozen=True)
class Int4WeightConfig(WeightConfig):
    """int4 weight-only, asymmetric per group of input channels with scales and zero points (W4A16).

    Args:
        group_size: input channels per (scale, zero) pair: 32, 64 or 128.
    """

    group_size: int = 128
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        _check_choice(type(self).__name__, "group_size", self.group_size, INT4_GROUP_SIZES)
        check_compute_dtype(type(self).__name__, self.compute_dtype)


@dataclass(frozen=True)
class FP8WeightConfig(WeightConfig):
    """fp8 e4m3 weight-only, one fp32 scale per output channel."""

    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        check_compute_dtype(type(self).__name__, self.compute_dtype)


@dataclass(frozen=True)
class Int8DynamicActivationConfig(WeightConfig):
    """W8A8: int8 weights per output channel (the int8 format), activations quantized per token on every call.

    Linear-like layers (nn.Linear, transformers' Conv1D) run the int8 x int8 GEMM with int32 accumulation
    (``qlora_kit.ops.int8_dynamic_linear``); convolutions and embeddings get the int8 weight format only.
    Gradients pass the activation quantizer straight through.
    """

    compute_dtype: torch.dtype = torch.bfloat16
    activation = "int8"  # class attribute, not a field: the activation mode the layers run

    def __post_init__(self):
        check_compute_dtype(type(self).__name__, self.compute_dtype)


@dataclass(frozen=True)
class FP8DynamicActivationConfig(WeightConfig):
    """fp8 e4m3 rowwise: e4m3 weights per output channel, activations quantized per token to e4m3 on every call.

    Runs on CUDA GPUs of compute capability 8.9+ (a clear error on older ones); on the CPU the reference
    emulates the same numerics. Linear-like layers only, as :class:`Int8DynamicActivationConfig`.
    """

    compute_dtype: torch.dtype = torch.bfloat16
    activation = "fp8"

    def __post_init__(self):
        check_compute_dtype(type(self).__name__, self.compute_dtype)
