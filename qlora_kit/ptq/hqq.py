"""HQQ (Badri & Shaji, 2023): int4 per group, the zero point of every group optimised without data.

HQQ's half-quadratic solver minimises an lp-norm (p < 1) of the weight error; zero points may be fractional.
The output is the core ``Int4Weight`` format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configs import COMPUTE_DTYPES, INT4_GROUP_SIZES, Int4WeightConfig
from ..formats.base import check_finite
from ..kernels.reference import quant_int as _qi
from ..registry import register_quantize_handler
from .checks import check_choice, check_number
from .layers import layer_from_qweight, select_targets, weight_2d
from .numerics import int4_weight


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
        check_choice(self, "bits", (4,))
        check_choice(self, "group_size", INT4_GROUP_SIZES)
        check_number(self, "iters", 1, 10_000, integer=True)
        check_number(self, "lp_norm", 0, 1, lo_open=True)
        check_number(self, "beta", 0, 1e9, lo_open=True)
        check_number(self, "kappa", 1, 100, lo_open=True)
        check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self) -> Int4WeightConfig:
        """The core format config of the layers this produces."""
        return Int4WeightConfig(group_size=self.group_size, compute_dtype=self.compute_dtype)


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


@register_quantize_handler(HQQConfig)
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
