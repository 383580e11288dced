"""Post-training quantization algorithms: HQQ, GPTQ, AWQ, SmoothQuant (and dynamic W8A8 through the core).

Each algorithm is a frozen config that ``qlora_kit.quantize`` runs through the handler registered for its
type (``qlora_kit.registry.register_quantize_handler``). The outputs are the core's packed formats, so the
fused kernels run them:

* :class:`HQQConfig`: int4 per group; the zero point of every group is optimised with HQQ's
  half-quadratic solver (an lp-norm, p < 1, of the weight error; no data). Zero points may be fractional.
* :class:`GPTQConfig`: int4 per group or int8 per channel; each layer's weight is quantized column by
  column with the error fed back through the inverse Hessian ``H = 2 X^T X / n`` of its calibration
  inputs (damping, blocks of 128 columns, optional act-order). Linear, GPT-2 Conv1D and ungrouped
  Conv1d / Conv2d / ConvTranspose2d layers: a convolution is a matmul of its 2-D weight view (the core
  formats' (out, in * kernel) view) with unfolded input patches, so X holds one patch row per output pixel
  (:func:`layer_rows`; a transposed convolution's patches are those of its zero-inserted input under the
  flipped kernel).
* :class:`AWQConfig`: int4 per group (or NF4); per input channel scales ``s = mean|x|^a`` (a from a grid)
  chosen by the output error of the enclosing block with the layers sharing that input quantized, folded
  into the op that produces the input (RMSNorm / LayerNorm or a previous linear; for convolutions a
  BatchNorm / GroupNorm or a previous convolution, also through a ReLU in between), then an optional
  per-group clipping search on the layer's input rows; round-to-nearest after that. Layers whose input has
  no such producer get the clipping search only.
* :class:`SmoothQuantConfig`: migrates activation outliers into the weights (``s = max|x|^a / max|w|^(1-a)``,
  folded the same way), then W8A8: int8 weights per channel, int8 activations per token at run time.
  :func:`smooth_activations` runs the migration alone.

A scale is only folded where that leaves the model's function unchanged: the producer is found by tensor
identity (the op whose output tensor the linears read) or by name for inputs that are linear in a
producer's output (``up_proj -> down_proj`` in SwiGLU, ``v_proj -> o_proj`` without grouped KV heads), and
every candidate is checked by running the block with a random scale folded in (post-LN LayerNorms that
also feed a residual fail the check and are left alone).

Dynamic quantization (weights quantized ahead of time, activations per call) is the core's
``Int8DynamicActivationConfig`` (W8A8) or ``FP8DynamicActivationConfig``; SmoothQuant produces those layers.

Calibration protocol (GPTQ, AWQ, SmoothQuant): prepare (find the repeated blocks, e.g. the decoder
layers), run ``calib_data`` (an iterable of model inputs: tensors, tuples or dicts of keyword
arguments) up to the first block and keep those inputs, then block by block: move the block to
``device``, hook its layers, run it on the kept inputs, quantize (convert) its layers, and run it again so
that its quantized outputs feed the next block. Only one float block is on the device at a time, so a
model larger than the device still calibrates. Models without a repeated block (UNets, GANs) calibrate
in one whole-model pass; layers outside the blocks are calibrated in a final whole-model pass.
Layers the algorithm does not handle (embeddings, grouped convolutions, layers the calibration data
never reaches) are quantized with round-to-nearest in the same format, with a warning naming them.
SmoothQuant smooths and runs W8A8 on Linear layers only (the core's W8A8 covers linear layers); its other
layers get int8 weight-only quantization, with a warning.

Example:
    >>> calib = [tokens[i : i + 4] for i in range(0, 32, 4)]
    >>> qlora_kit.quantize(model, qlora_kit.GPTQConfig(bits=4, group_size=128), calib_data=calib)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import (
    BLOCKSIZES_4BIT,
    COMPUTE_DTYPES,
    INT4_GROUP_SIZES,
    Int4WeightConfig,
    Int8WeightConfig,
    NF4Config,
)
from .formats.base import check_finite, get_format
from .kernels.reference import quant_int as _qi
from .nn.quantized import QuantizedLayer, is_transformers_conv1d, quantized_class_for
from .registry import format_for_config, register_quantize_handler

FilterFn = Callable[[nn.Module, str], bool]

# ----------------------------------------------------------------------------------------- validation


def _fail(cls: str, field: str, allowed: str, value) -> None:
    raise ValueError(f"{cls}.{field} must be {allowed}, got {value!r}")


def _check_choice(obj, field: str, allowed) -> None:
    value = getattr(obj, field)
    if isinstance(value, bool) or value not in allowed:
        _fail(type(obj).__name__, field, f"one of {list(allowed)}", value)


def _check_number(obj, field: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False) -> None:
    value = getattr(obj, field)
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        what = "an integer" if integer else "a number"
        _fail(type(obj).__name__, field, f"{what} in {'(' if lo_open else '['}{lo}, {hi}]", value)


def _check_bool(obj, field: str) -> None:
    if not isinstance(getattr(obj, field), bool):
        _fail(type(obj).__name__, field, "True or False", getattr(obj, field))


# -------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class HQQConfig:
    """Half-Quadratic Quantization (Badri & Shaji, 2023): int4 per group, zero points optimised without data.

    Args:
        bits: 4 (the int4 per-group format).
        group_size: input channels per (scale, zero) pair: 32, 64 or 128.
        iters: solver iterations per group (stops early when the error grows).
        lp_norm: p of the sparsity-promoting lp error norm, 0 < p <= 1.
        beta: initial penalty weight of the half-quadratic splitting; grows by ``kappa`` each iteration.
        kappa: growth factor of ``beta`` (> 1).
        compute_dtype: dtype the quantized layers compute in.

    Example:
        >>> qlora_kit.quantize(model, HQQConfig(group_size=64))
    """

    bits: int = 4
    group_size: int = 128
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        _check_choice(self, "bits", (4,))
        _check_choice(self, "group_size", INT4_GROUP_SIZES)
        _check_number(self, "iters", 1, 10_000, integer=True)
        _check_number(self, "lp_norm", 0, 1, lo_open=True)
        _check_number(self, "beta", 0, 1e9, lo_open=True)
        _check_number(self, "kappa", 1, 100, lo_open=True)
        _check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self) -> Int4WeightConfig:
        """The core format config of the layers this produces."""
        return Int4WeightConfig(group_size=self.group_size, compute_dtype=self.compute_dtype)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al., 2022): Hessian-aware column-by-column quantization with error feedback.

    Args:
        bits: 4 (int4 per group, asymmetric) or 8 (int8 per output channel, symmetric).
        group_size: input channels per group for ``bits=4``: 32, 64 or 128 (ignored for ``bits=8``).
        damp: dampening added to the Hessian diagonal, as a fraction of its mean (0 < damp < 1).
        block_size: columns processed together (lazy batch updates); 128 as in the paper.
        act_order: process columns by decreasing Hessian diagonal. The group parameters are then fixed
            from the weights before quantization (static groups), so the packed layout stays the core's.
        compute_dtype: dtype the quantized layers compute in.

    Example:
        >>> qlora_kit.quantize(model, GPTQConfig(bits=4, group_size=128), calib_data=batches)
    """

    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        _check_choice(self, "bits", (4, 8))
        _check_choice(self, "group_size", INT4_GROUP_SIZES)
        _check_number(self, "damp", 0, 1, lo_open=True)
        _check_number(self, "block_size", 1, 1 << 20, integer=True)
        _check_bool(self, "act_order")
        if self.bits == 4 and self.block_size % self.group_size:
            raise ValueError(
                f"GPTQConfig.block_size must be a multiple of group_size ({self.group_size}), got {self.block_size}"
            )
        _check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self):
        if self.bits == 8:
            return Int8WeightConfig(compute_dtype=self.compute_dtype)
        return Int4WeightConfig(group_size=self.group_size, compute_dtype=self.compute_dtype)


@dataclass(frozen=True)
class AWQConfig:
    """AWQ (Lin et al., 2023): activation-aware per-channel scaling plus clipping search, then round-to-nearest.

    Args:
        bits: 4.
        group_size: input channels per group (int4: 32, 64, 128; nf4: the blocksize, 32 .. 4096).
        weight_format: "int4" (asymmetric per group) or "nf4" (bitsandbytes NF4, no double quantization).
        grid: number of exponents a in [0, 1) tried for s = mean|x|^a (a = 0 is plain RTN).
        clip: also search a per-group clipping ratio of the weight range.
        clip_grid: number of clipping ratios tried in [1 - max_shrink, 1].
        max_shrink: largest fraction of the range the clipping search may cut (0 < max_shrink < 1).
        samples: calibration tokens the searches use (the first calibration batches holding that many).
        compute_dtype: dtype the quantized layers compute in.

    Example:
        >>> qlora_kit.quantize(model, AWQConfig(group_size=128), calib_data=batches)
    """

    bits: int = 4
    group_size: int = 128
    weight_format: str = "int4"
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    samples: int = 1024
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        _check_choice(self, "bits", (4,))
        _check_choice(self, "weight_format", ("int4", "nf4"))
        _check_choice(self, "group_size", INT4_GROUP_SIZES if self.weight_format == "int4" else BLOCKSIZES_4BIT)
        _check_number(self, "grid", 1, 1000, integer=True)
        _check_bool(self, "clip")
        _check_number(self, "clip_grid", 1, 1000, integer=True)
        _check_number(self, "max_shrink", 0, 1, lo_open=True)
        if self.max_shrink >= 1:
            _fail("AWQConfig", "max_shrink", "in (0, 1)", self.max_shrink)
        _check_number(self, "samples", 1, 1 << 24, integer=True)
        _check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self):
        if self.weight_format == "nf4":
            return NF4Config(blocksize=self.group_size, double_quant=False, compute_dtype=self.compute_dtype)
        return Int4WeightConfig(group_size=self.group_size, compute_dtype=self.compute_dtype)


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then W8A8.

    Args:
        alpha: migration strength in [0, 1]: s = max|x|^alpha / max|w|^(1 - alpha) per input channel.
        compute_dtype: dtype the W8A8 layers return and compute their epilogue in.

    Example:
        >>> qlora_kit.quantize(model, SmoothQuantConfig(alpha=0.5), calib_data=batches)
    """

    alpha: float = 0.5
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        _check_number(self, "alpha", 0, 1)
        _check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self):
        from . import configs

        cls = getattr(configs, "Int8DynamicActivationConfig", None)
        if cls is None:
            raise RuntimeError(
                "SmoothQuant needs qlora_kit.configs.Int8DynamicActivationConfig (W8A8), which this installation lacks"
            )
        return cls(compute_dtype=self.compute_dtype)


# ---------------------------------------------------------------------- numerics (shared with the core)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int4 codes with per-element (broadcast) scale and zero: clamp(round(w / s + z), 0, 15) in fp32.

    The formula of ``kernels/reference/quant_int.int4_quantize_with_params`` (tests check they agree bit
    for bit), written for broadcast operands so GPTQ can quantize one column at a time.
    """
    return _qi.int4_codes(w, scale, zero)


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - zero) * scale in fp32, the format's dequantization (broadcast operands)."""
    return (q - zero.float()) * scale.float()


def int4_fake_quant(w2d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """w2d quantized to int4 with the given per-group (scale, zero) and dequantized, in fp32.

    Goes through the format's own pack / dequantize references, so the result equals what an
    ``Int4Weight`` with these parameters dequantizes to.
    """
    cols = w2d.shape[1]
    packed = _qi.int4_quantize_with_params(w2d.float(), scale, zero, group_size)
    return _qi.dequantize_int4(packed, scale, zero, cols, group_size, torch.float32)


def int4_weight(w2d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> nn.Module:
    """An ``Int4Weight`` (core format) holding ``w2d`` quantized with the given bf16 per-group scale and zero."""
    scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
    packed = _qi.int4_quantize_with_params(w2d.float(), scale, zero, group_size)
    return get_format("int4").from_parts(packed, scale, zero, tuple(w2d.shape), group_size)


def int8_weight(qdata: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """An ``Int8Weight`` (core format) from int8 codes [rows, cols] and fp32 row scales."""
    fmt = get_format("int8")
    obj = fmt.from_metadata({"format": "int8", "shape": list(qdata.shape)}).to(qdata.device)
    obj.qdata.copy_(qdata.to(torch.int8))
    obj.scale.copy_(scale.float())
    return obj


def format_fake_quant(w2d: torch.Tensor, fmt_config) -> torch.Tensor:
    """Quantize-dequantize ``w2d`` with the core format of ``fmt_config`` (round to nearest), in fp32."""
    if isinstance(fmt_config, Int4WeightConfig):
        return _int4_rtn_fake_quant(w2d, fmt_config.group_size)
    fmt = format_for_config(fmt_config)
    return fmt.from_float(w2d.float().contiguous(), fmt_config, tensor_name="weight").dequantize(torch.float32)


def _int4_rtn_fake_quant(w2d: torch.Tensor, group_size: int) -> torch.Tensor:
    """The int4 format's round-to-nearest quantize-dequantize (``quant_int.int4_params`` then
    ``int4_quantize_with_params`` then ``dequantize_int4``) computed on a grouped view, without packing;
    the searches call it many times (tests check it equals the format bit for bit)."""
    rows, cols = w2d.shape
    ngroups = math.ceil(cols / group_size)
    pad = ngroups * group_size - cols
    wf = w2d.float()
    if pad:  # repeat the last column, as int4_params does: min and max of the partial group are unchanged
        wf = torch.cat([wf, wf[:, -1:].expand(rows, pad)], dim=1)
    wg = wf.reshape(rows, ngroups, group_size)
    mn = wg.amin(dim=2, keepdim=True).clamp(max=0)
    mx = wg.amax(dim=2, keepdim=True).clamp(min=0)
    scale = ((mx - mn) / _qi.INT4_MAX).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    zero = torch.clamp(torch.round(-mn / scale), 0, _qi.INT4_MAX).to(torch.bfloat16).float()
    out = int4_dequantize(int4_codes(wg, scale, zero), scale, zero)
    return out.reshape(rows, -1)[:, :cols]


# -------------------------------------------------------------------------------------- layer helpers


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_transformers_conv1d(module)


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def _is_conv(module: nn.Module) -> bool:
    """An ungrouped Conv1d / Conv2d / ConvTranspose2d: per output pixel, its 2-D weight view times a column of
    unfolded input patches (see :func:`layer_rows`)."""
    return type(module) in _CONV_TYPES and module.groups == 1


def _kernel_numel(module: nn.Module) -> int:
    return math.prod(module.kernel_size) if type(module) in _CONV_TYPES else 1


def _expand(module: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """A per-input-channel vector as the per-column vector of the layer's 2-D weight view (a convolution's
    columns are (in_channel, kernel position), channel-major)."""
    k = _kernel_numel(module)
    return s if k == 1 else s.repeat_interleave(k)


def _batched(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input with the batch dimension (unbatched inputs are allowed by torch)."""
    spatial = 1 if type(module) is nn.Conv1d else 2
    return x.unsqueeze(0) if x.dim() == spatial + 1 else x


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows (N, K) of the reduction dimension its 2-D weight view multiplies, so that
    ``rows @ weight_2d(module).T`` (+ bias) are the layer's outputs, one row per token or output pixel.

    Linear / Conv1D: the tokens. Conv1d / Conv2d: the unfolded input patches (padding applied as the layer
    does, string paddings and padding modes included). ConvTranspose2d: the patches of the stride-dilated
    (zero-inserted) input under the spatially flipped kernel, the convolution the transposed one equals;
    rows of output pixels a kernel tap does not reach hold zeros there.
    """
    if is_linear(module):
        return x.reshape(-1, x.shape[-1])
    x = _batched(module, x)
    kernel, dil, stride = module.kernel_size, module.dilation, module.stride
    if type(module) is not nn.ConvTranspose2d:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if type(module) is nn.Conv1d:  # as a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, dil, stride = (1, *kernel), (1, *dil), (1, *stride)
    if type(module) is nn.ConvTranspose2d:
        n, c, h, w = x.shape
        up = x.new_zeros(n, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1)
        up[:, :, :: stride[0], :: stride[1]] = x
        pads = []
        for i in (1, 0):  # F.pad order: last dimension first
            edge = dil[i] * (kernel[i] - 1) - module.padding[i]
            pads += [edge, edge + module.output_padding[i]]
        cols = F.unfold(F.pad(up, pads), kernel, dilation=dil)  # negative pads crop
        cols = cols.reshape(n, c, kernel[0], kernel[1], -1).flip(2, 3).reshape(n, c * kernel[0] * kernel[1], -1)
    else:
        cols = F.unfold(x, kernel, dilation=dil, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _channel_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (N, channels): tokens for linear layers, pixels (channel dimension 1) for convs."""
    if is_linear(module):
        return x.reshape(-1, x.shape[-1])
    x = _batched(module, x)
    return x.transpose(1, -1).reshape(-1, x.shape[1])


def _warn_rtn(algorithm: str, names: list[str], why: str) -> None:
    """Say which layers a calibrated algorithm quantized with plain round-to-nearest instead."""
    if names:
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        warnings.warn(f"{algorithm}: {len(names)} layer(s) got round-to-nearest instead ({why}): {shown}", stacklevel=3)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The (out, reduction) view of a layer's weight, as the core formats see it (a view, not a copy)."""
    w = module.weight
    if is_transformers_conv1d(module):
        return w.t()
    if isinstance(module, nn.ConvTranspose2d):
        return w.transpose(0, 1).reshape(w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


def _set_weight_2d(module: nn.Module, w2d: torch.Tensor) -> None:
    """Write a (out, reduction) matrix (the :func:`weight_2d` view) back into a layer's weight, in place."""
    w = module.weight
    if is_transformers_conv1d(module):
        w2d = w2d.t()
    elif isinstance(module, nn.ConvTranspose2d):
        i, o, kh, kw = w.shape
        w2d = w2d.reshape(o, i, kh, kw).transpose(0, 1)
    else:
        w2d = w2d.reshape(w.shape)
    with torch.no_grad():
        w.copy_(w2d.to(w.dtype))


def layer_from_qweight(module: nn.Module, qweight: nn.Module, fmt_config) -> QuantizedLayer:
    """The core quantized layer for ``module`` holding the given format object (bias copied)."""
    cls = quantized_class_for(module)
    layer = cls.empty_like_float(module, fmt_config, qweight.metadata())
    layer.qweight = qweight
    return layer.to(module.weight.device)


def _rtn_layer(module: nn.Module, fmt_config, fqn: str) -> QuantizedLayer:
    cls = quantized_class_for(module)
    return cls.from_float(module, fmt_config, format_for_config(fmt_config).name, tensor_name=f"{fqn}.weight")


def select_targets(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    """The layers ``quantize`` would pick: supported, kept by the filter, not nested in another target."""
    from .api import default_filter

    keep = filter_fn or default_filter(model)
    targets: list[tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules():
        if not fqn or isinstance(module, QuantizedLayer) or quantized_class_for(module) is None:
            continue
        if not keep(module, fqn) or any(fqn.startswith(t + ".") for t, _ in targets):
            continue
        targets.append((fqn, module))
    return targets


# ------------------------------------------------------------------------------------------------ HQQ


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal operator of the lp "norm" (p < 1), as in HQQ."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * torch.pow(x.abs() + 1e-8, p - 1))


def _hqq_groups(w: torch.Tensor, config: HQQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ on a (n, g) matrix of groups: returns (scale, zero) per group, fp32 [n]."""
    w = w.float()
    wmin = w.amin(dim=1, keepdim=True)
    wmax = w.amax(dim=1, keepdim=True)
    inv = _qi.INT4_MAX / (wmax - wmin).clamp(min=1e-8)  # HQQ works with the inverse scale
    zero = -wmin * inv
    best_zero, best_err = zero.clone(), torch.full_like(zero, float("inf"))
    beta = config.beta
    for _ in range(config.iters):
        wq = torch.clamp(torch.round(w * inv + zero), 0, _qi.INT4_MAX)
        wr = (wq - zero) / inv
        err = (w - wr).abs().mean(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
        we = _shrink_lp(w - wr, beta, config.lp_norm)
        zero = torch.mean(wq - (w - we) * inv, dim=1, keepdim=True)
        beta *= config.kappa
    return (1.0 / inv).reshape(-1), best_zero.reshape(-1)


def hqq_params(w2d: torch.Tensor, config: HQQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ (scale, zero) for every group of ``w2d``: bf16 [rows, ceil(cols / group_size)] each.

    The last group may be partial (it is solved on its own columns only).
    """
    rows, cols = w2d.shape
    g = config.group_size
    full = cols // g
    scales, zeros = [], []
    if full:
        s, z = _hqq_groups(w2d[:, : full * g].reshape(rows * full, g), config)
        scales.append(s.reshape(rows, full))
        zeros.append(z.reshape(rows, full))
    if cols % g:
        s, z = _hqq_groups(w2d[:, full * g :], config)
        scales.append(s.reshape(rows, 1))
        zeros.append(z.reshape(rows, 1))
    scale = torch.cat(scales, dim=1).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.cat(zeros, dim=1).to(torch.bfloat16)


@torch.no_grad()
def _run_hqq(model, config: HQQConfig, *, filter_fn=None, device=None, calib_data=None):
    fmt_config = config.format_config()
    for fqn, module in select_targets(model, filter_fn):
        if device is not None:
            module.to(device)
        w2d = weight_2d(module).detach()
        check_finite(w2d, f"{fqn}.weight")
        scale, zero = hqq_params(w2d, config)
        layer = layer_from_qweight(module, int4_weight(w2d, scale, zero, config.group_size), fmt_config)
        model.set_submodule(fqn, layer)
    if device is not None:
        model.to(device)
    return model


# -------------------------------------------------------------------------------- calibration protocol


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
    from .calib_checks import check_batches, check_container

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


def _input_hooks(targets: list[tuple[str, nn.Module]], fn: Callable[[str, nn.Module, torch.Tensor], None]):
    """Forward pre-hooks calling ``fn(fqn, module, input)`` for each target; returns the handles."""

    def make(fqn):
        def hook(module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            fn(fqn, module, x.detach())

        return hook

    return [m.register_forward_pre_hook(make(f), with_kwargs=True) for f, m in targets]


def _remove(handles) -> None:
    for h in handles:
        h.remove()


# ----------------------------------------------------------------------------------------------- GPTQ


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; the damping grows until H is positive definite."""
    diag = torch.arange(h.shape[0], device=h.device)
    base = damp * torch.mean(torch.diag(h)).clamp(min=1e-8)
    for attempt in range(6):
        hd = h.clone()
        hd[diag, diag] += base * (10**attempt)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            chol_inv, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return chol_inv
    raise RuntimeError("the GPTQ Hessian is not positive definite even with strong damping; pass more calibration data")


def gptq_quantize(w2d: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig):
    """GPTQ on one weight matrix.

    Args:
        w2d: (rows, cols) weight (any float dtype; computed in fp32).
        hessian: (cols, cols) ``2 X^T X / n`` of the layer's calibration inputs.
        config: bits, group size, damping, block size, act-order.

    Returns:
        (w_hat, params): ``w_hat`` the quantized-dequantized weight (fp32, original column order), exactly
        what the packed format dequantizes to; ``params`` = (scale, zero) bf16 [rows, ngroups] for int4, or
        the fp32 row scale for int8.
    """
    w = w2d.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    g = config.group_size
    if config.bits == 8:
        row_scale = _qi._row_scale(w, _qi.INT8_MAX)  # the int8 format's symmetric per-row scale
        scale = zero = None
    else:
        ngroups = math.ceil(cols / g)
        scale = torch.ones(rows, ngroups, dtype=torch.bfloat16, device=w.device)
        zero = torch.zeros(rows, ngroups, dtype=torch.bfloat16, device=w.device)
        if config.act_order:  # static groups: parameters from the weights before any update
            scale, zero = _qi.int4_params(w, g)
    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, config.damp)
    q_all = torch.zeros_like(w)
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            x = w1[:, i]
            if config.bits == 8:
                q = torch.clamp(torch.round(x / row_scale), -_qi.INT8_MAX, _qi.INT8_MAX) * row_scale
            else:
                k = orig // g
                if not config.act_order and orig % g == 0:  # group parameters from the updated weights
                    s_k, z_k = _qi.int4_params(w1[:, i : i + min(g, cols - orig)], g)
                    scale[:, k], zero[:, k] = s_k[:, 0], z_k[:, 0]
                q = int4_dequantize(int4_codes(x, scale[:, k], zero[:, k]), scale[:, k], zero[:, k])
            q_all[:, col] = q
            e = (x - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    return q_all, (row_scale if config.bits == 8 else (scale, zero))


def _gptq_supports(module: nn.Module) -> bool:
    """Linear, transformers Conv1D, and ungrouped Conv1d / Conv2d / ConvTranspose2d (inputs unfold into rows)."""
    return is_linear(module) or _is_conv(module)


def _gptq_layer(module: nn.Module, hessian: torch.Tensor, config: GPTQConfig) -> QuantizedLayer:
    w2d = weight_2d(module).detach()
    w_hat, params = gptq_quantize(w2d, hessian, config)
    if config.bits == 8:
        qdata = torch.round(w_hat / params[:, None]).to(torch.int8)
        qweight = int8_weight(qdata, params)
    else:
        scale, zero = params
        qweight = int4_weight(w_hat, scale, zero, config.group_size)
    return layer_from_qweight(module, qweight, config.format_config())


@torch.no_grad()
def _run_gptq(model, config: GPTQConfig, *, filter_fn=None, device=None, calib_data=None):
    calib_data = calibration_batches(calib_data, "GPTQ")
    targets = select_targets(model, filter_fn)
    for fqn, module in targets:
        check_finite(weight_2d(module).detach(), f"{fqn}.weight")

    def process(scope: Scope) -> None:
        linears = [(f, m) for f, m in scope.targets if _gptq_supports(m)]
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def observe(fqn, module, x):
            x2 = layer_rows(module, x).float()
            if fqn not in sums:
                sums[fqn] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                counts[fqn] = 0
            sums[fqn].addmm_(x2.t(), x2)
            counts[fqn] += x2.shape[0]

        handles = _input_hooks(linears, observe)
        try:
            scope.run()
        finally:
            _remove(handles)
        fmt = config.format_config()
        unsupported = [f for f, m in scope.targets if not _gptq_supports(m)]
        unreached = [f for f, m in scope.targets if _gptq_supports(m) and f not in sums]
        for fqn, module in scope.targets:
            if fqn in sums:
                layer = _gptq_layer(module, sums.pop(fqn) * (2.0 / counts[fqn]), config)
            else:  # an unsupported layer type, or never reached by the calibration data
                layer = _rtn_layer(module, fmt, fqn)
            scope.replace(fqn, layer)
        _warn_rtn("GPTQ", unsupported, "GPTQ handles Linear, Conv1D and ungrouped Conv1d/Conv2d/ConvTranspose2d")
        _warn_rtn("GPTQ", unreached, "the calibration data never reached them")

    calibrate(model, targets, calib_data, device, process, "GPTQ")
    if device is not None:
        model.to(device)
    return model


# ------------------------------------------------------------ activation statistics and scale folding


@dataclass
class _InputGroup:
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
        return weight_2d(m).shape[1] // _kernel_numel(m)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _geometry(module: nn.Module) -> tuple:
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
    if is_linear(module) or _is_conv(module):
        return weight_2d(module).shape[0] == channels
    return _is_channel_norm(module, channels) if conv else _is_norm(module, channels)


# producer rules that tensor identity cannot see (the input is a linear function of the producer's output)
_SIBLING_PRODUCERS = {"down_proj": "up_proj", "o_proj": "v_proj", "w2": "w3", "out_proj": "v_proj"}
# ops that commute with a positive per-channel scale: a scale folded before them passes through
_PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def _collect_groups(scope: Scope, samples: int, keep_samples: bool, convs: bool = True) -> list[_InputGroup]:
    """Run the scope once: group the layers by input tensor, find each input's producer, gather statistics.

    Linear layers always take part; ungrouped convolutions when ``convs``.
    """
    linears = [(f, m) for f, m in scope.targets if is_linear(m) or (convs and _is_conv(m))]
    if not linears:
        return []
    first_batch = {"active": True}
    by_key: dict[tuple, _InputGroup] = {}
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
                c = x.shape[-1] if not conv else _batched(module, x).shape[1]
                by_key[key] = _InputGroup(
                    key,
                    [],
                    abs_sum=torch.zeros(c, device=x.device),
                    abs_max=torch.zeros(c, device=x.device),
                    samples={},
                    conv=conv,
                )
            by_key[key].linears.append((fqn, module))
        group = by_key[key_of[fqn]]
        geom = _geometry(module)
        if keep_samples and next(f for f, m in group.linears if _geometry(m) == geom) == fqn:
            group.samples.setdefault(geom, []).append(layer_rows(module, x).float())
        if group.linears[0][0] != fqn:
            return  # statistics once per input
        x2 = _channel_rows(module, x).float()
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

    handles = _input_hooks(linears, observe)
    handles += [m.register_forward_hook(record_output) for m in scope.module.modules() if m is not scope.module]
    handles.append(scope.module.register_forward_hook(end_first_batch))
    try:
        scope.run()
    finally:
        _remove(handles)
        alive.clear()
    groups = list(by_key.values())
    for group in groups:
        if keep_samples:
            for geom, parts in group.samples.items():
                x = torch.cat(parts)
                idx = torch.linspace(0, x.shape[0] - 1, min(samples, x.shape[0]), device=x.device).round().long()
                group.samples[geom] = x[idx]
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
            group.producer = max(cands, key=lambda c: c[0].count("."))  # the innermost module
        elif len(group.linears) == 1 and not group.conv:
            fqn, _ = group.linears[0]
            parent, _, leaf = fqn.rpartition(".")
            sib = _SIBLING_PRODUCERS.get(leaf)
            sib_fqn = f"{parent}.{sib}" if parent else sib
            sib_mod = next((m for f, m in scope.targets if f == sib_fqn), None)
            if sib_mod is not None and _foldable(sib_mod, group.channels):
                group.producer = (sib_fqn, sib_mod)
    # a producer feeding two groups (e.g. a linear and a conv reading one tensor) would get both scales
    producer_ids = [id(g.producer[1]) for g in groups if g.producer is not None]
    for g in groups:
        if g.producer is not None and producer_ids.count(id(g.producer[1])) > 1:
            g.producer = None
    return groups


def _fold_scale(group: _InputGroup, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the layers' input channels by ``s``: the
    composed function is unchanged (checked by :func:`_fold_is_exact` before use)."""
    _, prod = group.producer
    with torch.no_grad():
        if is_linear(prod) or _is_conv(prod):
            _set_weight_2d(prod, weight_2d(prod).float() / s[:, None])
        else:
            prod.weight.copy_((prod.weight.float() / s).to(prod.weight.dtype))
        b = getattr(prod, "bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_((b.float() / s).to(b.dtype))
        for _, lin in group.linears:
            _set_weight_2d(lin, weight_2d(lin).float() * _expand(lin, s)[None, :])


def _fold_is_exact(scope: Scope, group: _InputGroup, reference: list[torch.Tensor]) -> bool:
    """True when folding a scale through ``group.producer`` leaves the scope's outputs unchanged (tested with a
    random scale on the first calibration batch, then undone)."""
    mods = [group.producer[1]] + [m for _, m in group.linears]
    saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in mods]
    gen = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(group.channels).uniform_(-0.5, 0.5, generator=gen)).to(reference[0].device)
    try:
        _fold_scale(group, s)
        out = scope.run(limit=1)[0].float()
    finally:
        for m, state in zip(mods, saved, strict=True):
            m.load_state_dict(state)
    ref = reference[0].float()
    tol = 1e-3 if ref.dtype == torch.float32 and mods[0].weight.dtype == torch.float32 else 3e-2
    return bool(torch.linalg.norm(out - ref) <= tol * torch.linalg.norm(ref).clamp(min=1e-12))


def _valid_producers(scope: Scope, groups: list[_InputGroup]) -> None:
    """Drop producers whose fold would change the scope's outputs (e.g. a LayerNorm that also feeds a residual)."""
    if not any(g.producer is not None for g in groups):
        return
    reference = scope.run(limit=1)
    for g in groups:
        if g.producer is not None and not _fold_is_exact(scope, g, reference):
            g.producer = None


# ------------------------------------------------------------------------------------------------ AWQ


def _awq_search_scale(
    scope: Scope, group: _InputGroup, fmt, grid: int, reference: list[torch.Tensor], limit: int
) -> torch.Tensor:
    """Best s = mean|x|^a (normalised) over the grid of a: the one whose quantized linears change the scope's
    outputs least (MSE against the float outputs ``reference`` on the calibration inputs), as llm-awq measures
    the enclosing module. a = 0 (s = 1) is round-to-nearest, so the search never does worse on these inputs."""
    x_mean = group.abs_sum / max(group.tokens, 1)
    originals = [weight_2d(m).detach().float().clone() for _, m in group.linears]
    best, best_loss = torch.ones_like(x_mean), float("inf")
    try:
        for i in range(grid):
            s = x_mean.pow(i / grid).clamp(min=1e-4)
            s = s / torch.sqrt(s.max() * s.min())
            for (_, lin), w in zip(group.linears, originals, strict=True):
                se = _expand(lin, s)[None, :]
                _set_weight_2d(lin, format_fake_quant(w * se, fmt) / se)
            outs = scope.run(limit=limit)
            loss = sum(float(((o.float() - r.float()) ** 2).mean()) for o, r in zip(outs, reference, strict=True))
            if loss < best_loss:
                best, best_loss = s, loss
    finally:
        for (_, lin), w in zip(group.linears, originals, strict=True):
            _set_weight_2d(lin, w)
    return best


def _clip_search(w: torch.Tensor, x: torch.Tensor, fmt, group_size: int, steps: int, max_shrink: float) -> torch.Tensor:
    """Per (row, group) clipping ratio of the weight range minimising that group's output error on ``x``;
    returns the clipped weight (fp32)."""
    rows, cols = w.shape
    g = group_size
    ngroups = math.ceil(cols / g)
    pad = ngroups * g - cols
    wp = torch.cat([w, w[:, -1:].expand(rows, pad)], 1) if pad else w
    xp = torch.cat([x, x.new_zeros(x.shape[0], pad)], 1) if pad else x
    wg = wp.reshape(rows, ngroups, g)
    xg = xp.reshape(x.shape[0], ngroups, g)
    ref = torch.einsum("ngk,rgk->nrg", xg, wg)
    wmin = wg.amin(2, keepdim=True).clamp(max=0)
    wmax = wg.amax(2, keepdim=True).clamp(min=0)
    symmetric = not isinstance(fmt, Int4WeightConfig)
    best_err = torch.full((rows, ngroups), float("inf"), device=w.device)
    best = wg.clone()
    for i in range(steps):
        ratio = 1.0 - max_shrink * i / steps
        if symmetric:
            amax = torch.maximum(-wmin, wmax) * ratio
            clipped = torch.maximum(torch.minimum(wg, amax), -amax)
        else:
            clipped = torch.maximum(torch.minimum(wg, wmax * ratio), wmin * ratio)
        wq = format_fake_quant(clipped.reshape(rows, -1)[:, :cols], fmt)
        wq = torch.cat([wq, wq[:, -1:].expand(rows, pad)], 1) if pad else wq
        out = torch.einsum("ngk,rgk->nrg", xg, wq.reshape(rows, ngroups, g))
        err = ((out - ref) ** 2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[:, :, None], clipped, best)
    return best.reshape(rows, -1)[:, :cols]


_NO_CLIP = ("q_proj", "k_proj", "query", "key", "qkv", "c_attn", "to_q", "to_k")


@torch.no_grad()
def _run_awq(model, config: AWQConfig, *, filter_fn=None, device=None, calib_data=None):
    calib_data = calibration_batches(calib_data, "AWQ")
    targets = select_targets(model, filter_fn)
    fmt = config.format_config()
    for fqn, module in targets:
        check_finite(weight_2d(module).detach(), f"{fqn}.weight")

    def process(scope: Scope) -> None:
        groups = _collect_groups(scope, config.samples, keep_samples=True)
        _valid_producers(scope, groups)
        # the scale search runs the scope on the first calibration inputs holding >= config.samples tokens
        tokens = max((g.tokens for g in groups), default=0)
        limit = min(scope.batches, max(1, math.ceil(config.samples * scope.batches / max(tokens, 1))))
        reference = scope.run(limit=limit) if any(g.producer is not None for g in groups) else []
        for group in groups:
            s = None
            if group.producer is not None:
                s = _awq_search_scale(scope, group, fmt, config.grid, reference, limit)
                _fold_scale(group, s)
            if config.clip:
                for fqn, lin in group.linears:
                    if any(tag in fqn.rsplit(".", 1)[-1] for tag in _NO_CLIP):
                        continue
                    x = group.samples[_geometry(lin)]
                    if s is not None:  # the layer's inputs after the fold
                        x = x / _expand(lin, s)[None, :]
                    w = weight_2d(lin).detach().float()
                    clipped = _clip_search(w, x, fmt, config.group_size, config.clip_grid, config.max_shrink)
                    _set_weight_2d(lin, clipped)
        grouped = {id(m) for g in groups for _, m in g.linears}
        for fqn, module in scope.targets:
            scope.replace(fqn, _rtn_layer(module, fmt, fqn))
        _warn_rtn(
            "AWQ",
            [f for f, m in scope.targets if id(m) not in grouped],
            "AWQ handles Linear, Conv1D and ungrouped Conv1d/Conv2d/ConvTranspose2d layers the calibration reaches",
        )

    calibrate(model, targets, calib_data, device, process, "AWQ")
    if device is not None:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------- SmoothQuant


def smooth_activations(
    model: nn.Module, config: SmoothQuantConfig, calib_data: Iterable, *, filter_fn: FilterFn | None = None, device=None
) -> nn.Module:
    """SmoothQuant's migration step alone: per input channel s = max|x|^alpha / max|w|^(1 - alpha) divided out of
    the op producing the input and multiplied into the linears; the float model computes the same function.

    ``quantize(model, SmoothQuantConfig(...), calib_data=...)`` runs this and then makes W8A8 layers; this
    function is for inspecting the migration or pairing it with another activation quantizer.

    Args:
        model: the float model, changed in place.
        config: its ``alpha`` is used.
        calib_data: calibration inputs (see the module docstring).
        filter_fn: which layers count (default: ``qlora_kit.default_filter``).
        device: as in ``quantize``.

    Returns:
        The same model, smoothed.
    """
    return _smoothquant(model, config, filter_fn=filter_fn, device=device, calib_data=calib_data, convert=False)


def _run_smoothquant(model, config: SmoothQuantConfig, *, filter_fn=None, device=None, calib_data=None):
    return _smoothquant(model, config, filter_fn=filter_fn, device=device, calib_data=calib_data, convert=True)


@torch.no_grad()
def _smoothquant(model, config: SmoothQuantConfig, *, filter_fn, device, calib_data, convert: bool):
    calib_data = calibration_batches(calib_data, "SmoothQuant")
    targets = select_targets(model, filter_fn)
    w8a8 = config.format_config() if convert else None
    weight_only = Int8WeightConfig(compute_dtype=config.compute_dtype)
    for fqn, module in targets:
        check_finite(weight_2d(module).detach(), f"{fqn}.weight")

    def process(scope: Scope) -> None:
        groups = _collect_groups(scope, 0, keep_samples=False, convs=False)
        _valid_producers(scope, groups)
        at_run_time: dict[str, torch.Tensor] = {}  # layers without a foldable producer: x / s in their forward
        for group in groups:
            w_max = torch.stack([weight_2d(m).detach().float().abs().amax(0) for _, m in group.linears]).amax(0)
            s = group.abs_max.clamp(min=1e-5).pow(config.alpha) / w_max.clamp(min=1e-5).pow(1 - config.alpha)
            s = torch.where(group.abs_max > 0, s, torch.ones_like(s)).clamp(min=1e-5)
            if group.producer is not None:
                _fold_scale(group, s)
            elif convert:
                at_run_time.update(_scale_weights_for_run_time(group, s))
            else:
                names = ", ".join(f for f, _ in group.linears)
                warnings.warn(f"SmoothQuant: no op folds the scale of {names}; left unsmoothed", stacklevel=3)
        if not convert:
            return
        # the core's quantize() builds the W8A8 layers (dynamic per-token activations), whatever their form
        from .api import quantize

        linear_ids = {id(m) for _, m in scope.targets if is_linear(m)}
        other_ids = {id(m) for _, m in scope.targets} - linear_ids
        quantize(scope.module, w8a8, filter_fn=lambda m, fqn: id(m) in linear_ids)
        _apply_run_time_scales(scope, at_run_time)
        if other_ids:
            quantize(scope.module, weight_only, filter_fn=lambda m, fqn: id(m) in other_ids)
            warnings.warn(
                f"SmoothQuant: {len(other_ids)} layer(s) that are not Linear (convolutions, embeddings) got int8 "
                "weight-only quantization without smoothing: W8A8 covers Linear layers only",
                stacklevel=2,
            )

    calibrate(model, targets, calib_data, device, process, "SmoothQuant")
    if device is not None:
        model.to(device)
    return model


def _scale_weights_for_run_time(group: _InputGroup, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Multiply the group's weights by ``s`` per input channel; their quantized layers divide the input by
    ``s`` at run time (:func:`_apply_run_time_scales`), so the function is unchanged."""
    out = {}
    for fqn, lin in group.linears:
        _set_weight_2d(lin, weight_2d(lin).float() * s[None, :])
        out[fqn] = s
    return out


def _apply_run_time_scales(scope: Scope, scales: dict[str, torch.Tensor]) -> None:
    """Swap each W8A8 layer named in ``scales`` for one that divides its input by the scale."""
    from .nn.smooth import with_input_scale

    for fqn, s in scales.items():
        rel = fqn[len(scope.prefix) :]
        scope.module.set_submodule(rel, with_input_scale(scope.module.get_submodule(rel), s))


for _config_cls, _handler in (
    (HQQConfig, _run_hqq),
    (GPTQConfig, _run_gptq),
    (AWQConfig, _run_awq),
    (SmoothQuantConfig, _run_smoothquant),
):
    register_quantize_handler(_config_cls)(_handler)
