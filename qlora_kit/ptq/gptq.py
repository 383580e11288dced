"""GPTQ (Frantar et al., 2022): Hessian-aware column-by-column quantization with error feedback.

Each layer's weight is quantized column by column with the error fed back through the inverse Hessian
``H = 2 X^T X / n`` of its calibration inputs (damping, blocks of 128 columns, optional act-order); int4 per
group or int8 per channel. Linear, GPT-2 Conv1D and ungrouped Conv1d / Conv2d / ConvTranspose2d layers: a
convolution is a matmul of its 2-D weight view with unfolded input patches, so X holds one patch row per
output pixel (:func:`~qlora_kit.ptq.layers.layer_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..configs import COMPUTE_DTYPES, INT4_GROUP_SIZES, Int4WeightConfig, Int8WeightConfig
from ..formats.base import check_finite
from ..kernels.reference import quant_int as _qi
from ..nn.quantized import QuantizedLayer
from ..registry import register_quantize_handler
from .calibration import Scope, calibrate, calibration_batches, input_hooks, remove_hooks
from .checks import check_bool, check_choice, check_number
from .layers import is_conv, is_linear, layer_from_qweight, layer_rows, rtn_layer, select_targets, warn_rtn, weight_2d
from .numerics import int4_codes, int4_dequantize, int4_weight, int8_weight


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
        check_choice(self, "bits", (4, 8))
        check_choice(self, "group_size", INT4_GROUP_SIZES)
        check_number(self, "damp", 0, 1, lo_open=True)
        check_number(self, "block_size", 1, 1 << 20, integer=True)
        check_bool(self, "act_order")
        if self.bits == 4 and self.block_size % self.group_size:
            raise ValueError(
                f"GPTQConfig.block_size must be a multiple of group_size ({self.group_size}), got {self.block_size}"
            )
        check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self):
        if self.bits == 8:
            return Int8WeightConfig(compute_dtype=self.compute_dtype)
        return Int4WeightConfig(group_size=self.group_size, compute_dtype=self.compute_dtype)


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
    return is_linear(module) or is_conv(module)


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


@register_quantize_handler(GPTQConfig)
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

        handles = input_hooks(linears, observe)
        try:
            scope.run()
        finally:
            remove_hooks(handles)
        fmt = config.format_config()
        unsupported = [f for f, m in scope.targets if not _gptq_supports(m)]
        unreached = [f for f, m in scope.targets if _gptq_supports(m) and f not in sums]
        for fqn, module in scope.targets:
            if fqn in sums:
                layer = _gptq_layer(module, sums.pop(fqn) * (2.0 / counts[fqn]), config)
            else:  # an unsupported layer type, or never reached by the calibration data
                layer = rtn_layer(module, fmt, fqn)
            scope.replace(fqn, layer)
        warn_rtn("GPTQ", unsupported, "GPTQ handles Linear, Conv1D and ungrouped Conv1d/Conv2d/ConvTranspose2d")
        warn_rtn("GPTQ", unreached, "the calibration data never reached them")

    calibrate(model, targets, calib_data, device, process, "GPTQ")
    if device is not None:
        model.to(device)
    return model
