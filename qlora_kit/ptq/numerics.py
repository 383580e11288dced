"""Quantize-dequantize helpers the PTQ algorithms share with the core formats (one source of numerics).

The searches (AWQ's scale and clipping grids, GPTQ's column loop) quantize many times without packing; every
function here equals what the core format packs and dequantizes, bit for bit (tests check it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import Int4WeightConfig
from ..formats.base import get_format
from ..kernels.reference import quant_int as _qi
from ..registry import format_for_config


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
