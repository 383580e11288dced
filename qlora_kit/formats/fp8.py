"""fp8 e4m3 weight-only, one fp32 scale per output channel (fp8 rowwise with per-token dynamic activations)."""

from __future__ import annotations

import torch

from ..configs import FP8DynamicActivationConfig, FP8WeightConfig
from ._channelwise import ChannelwiseWeight
from .base import register_format


@register_format
class FP8Weight(ChannelwiseWeight):
    """float8_e4m3fn codes [rows, cols] and one fp32 scale per row: W ~= qdata.float() * scale[:, None].

    scale = absmax_row / 448 (1.0 for an all-zero row), qdata = e4m3fn(W / scale), round to nearest even.

    Example:
        >>> q = FP8Weight.from_float(w, FP8WeightConfig(), tensor_name="fc1.weight")
        >>> w_hat = q.dequantize(torch.bfloat16)
    """

    name = "fp8"
    listing_order = 4  # position in CLI choices and reports
    configs = (FP8WeightConfig, FP8DynamicActivationConfig)
    code_dtype = getattr(torch, "float8_e4m3fn", None)
    activation, activation_op = "fp8", "fp8_dynamic_linear"

    @classmethod
    def available(cls) -> bool:
        return cls.code_dtype is not None
