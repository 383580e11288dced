"""int8 weight-only, symmetric per output channel (W8A16; W8A8 with per-token dynamic activations)."""

from __future__ import annotations

import torch

from ..configs import Int8DynamicActivationConfig, Int8WeightConfig
from ._channelwise import ChannelwiseWeight
from .base import register_format


@register_format
class Int8Weight(ChannelwiseWeight):
    """int8 codes [rows, cols] and one fp32 scale per row: W ~= qdata * scale[:, None].

    scale = absmax_row / 127 (1.0 for an all-zero row), qdata = clamp(round(W / scale), -127, 127).

    Example:
        >>> q = Int8Weight.from_float(w, Int8WeightConfig(), tensor_name="fc1.weight")
        >>> w_hat = q.dequantize(torch.bfloat16)
    """

    name = "int8"
    listing_order = 2  # position in CLI choices and reports
    configs = (Int8WeightConfig, Int8DynamicActivationConfig)
    code_dtype = torch.int8
    activation, activation_op = "int8", "int8_dynamic_linear"
