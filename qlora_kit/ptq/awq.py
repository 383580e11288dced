"""AWQ (Lin et al., 2023): activation-aware per-channel scaling plus clipping search, then round-to-nearest.

int4 per group (or NF4). Per input channel scales ``s = mean|x|^a`` (a from a grid) are chosen by the output
error of the enclosing block with the layers sharing that input quantized, and folded into the op that
produces the input (RMSNorm / LayerNorm or a previous linear; for convolutions a BatchNorm / GroupNorm or a
previous convolution, also through a ReLU in between; see ``fold.py``); then an optional per-group clipping
search on the layer's input rows. Layers whose input has no such producer get the clipping search only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..configs import BLOCKSIZES_4BIT, COMPUTE_DTYPES, INT4_GROUP_SIZES, Int4WeightConfig, NF4Config
from ..formats.base import check_finite
from ..registry import register_quantize_handler
from .calibration import Scope, calibrate, calibration_batches
from .checks import check_bool, check_choice, check_number, fail
from .fold import InputGroup, collect_groups, fold_scale, rows_key, valid_producers
from .layers import expand_channels, rtn_layer, select_targets, set_weight_2d, warn_rtn, weight_2d
from .numerics import format_fake_quant


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
        check_choice(self, "bits", (4,))
        check_choice(self, "weight_format", ("int4", "nf4"))
        check_choice(self, "group_size", INT4_GROUP_SIZES if self.weight_format == "int4" else BLOCKSIZES_4BIT)
        check_number(self, "grid", 1, 1000, integer=True)
        check_bool(self, "clip")
        check_number(self, "clip_grid", 1, 1000, integer=True)
        check_number(self, "max_shrink", 0, 1, lo_open=True)
        if self.max_shrink >= 1:
            fail("AWQConfig", "max_shrink", "in (0, 1)", self.max_shrink)
        check_number(self, "samples", 1, 1 << 24, integer=True)
        check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def format_config(self):
        if self.weight_format == "nf4":
            return NF4Config(blocksize=self.group_size, double_quant=False, compute_dtype=self.compute_dtype)
        return Int4WeightConfig(group_size=self.group_size, compute_dtype=self.compute_dtype)


def _awq_search_scale(
    scope: Scope, group: InputGroup, fmt, grid: int, reference: list[torch.Tensor], limit: int
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
                se = expand_channels(lin, s)[None, :]
                set_weight_2d(lin, format_fake_quant(w * se, fmt) / se)
            outs = scope.run(limit=limit)
            loss = sum(float(((o.float() - r.float()) ** 2).mean()) for o, r in zip(outs, reference, strict=True))
            if loss < best_loss:
                best, best_loss = s, loss
    finally:
        for (_, lin), w in zip(group.linears, originals, strict=True):
            set_weight_2d(lin, w)
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


@register_quantize_handler(AWQConfig)
@torch.no_grad()
def _run_awq(model, config: AWQConfig, *, filter_fn=None, device=None, calib_data=None):
    calib_data = calibration_batches(calib_data, "AWQ")
    targets = select_targets(model, filter_fn)
    fmt = config.format_config()
    for fqn, module in targets:
        check_finite(weight_2d(module).detach(), f"{fqn}.weight")

    def process(scope: Scope) -> None:
        groups = collect_groups(scope, config.samples, keep_samples=True)
        valid_producers(scope, groups)
        # the scale search runs the scope on the first calibration inputs holding >= config.samples tokens
        tokens = max((g.tokens for g in groups), default=0)
        limit = min(scope.batches, max(1, math.ceil(config.samples * scope.batches / max(tokens, 1))))
        reference = scope.run(limit=limit) if any(g.producer is not None for g in groups) else []
        for group in groups:
            s = None
            if group.producer is not None:
                s = _awq_search_scale(scope, group, fmt, config.grid, reference, limit)
                fold_scale(group, s)
            if config.clip:
                for fqn, lin in group.linears:
                    if any(tag in fqn.rsplit(".", 1)[-1] for tag in _NO_CLIP):
                        continue
                    x = group.samples[rows_key(lin)]
                    if s is not None:  # the layer's inputs after the fold
                        x = x / expand_channels(lin, s)[None, :]
                    w = weight_2d(lin).detach().float()
                    clipped = _clip_search(w, x, fmt, config.group_size, config.clip_grid, config.max_shrink)
                    set_weight_2d(lin, clipped)
        grouped = {id(m) for g in groups for _, m in g.linears}
        for fqn, module in scope.targets:
            scope.replace(fqn, rtn_layer(module, fmt, fqn))
        warn_rtn(
            "AWQ",
            [f for f, m in scope.targets if id(m) not in grouped],
            "AWQ handles Linear, Conv1D and ungrouped Conv1d/Conv2d/ConvTranspose2d layers the calibration reaches",
        )

    calibrate(model, targets, calib_data, device, process, "AWQ")
    if device is not None:
        model.to(device)
    return model
