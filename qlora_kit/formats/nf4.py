"""NF4: 4-bit NormalFloat (QLoRA), byte-compatible with bitsandbytes' ``quant_type="nf4"``."""

from __future__ import annotations

from ..configs import NF4Config
from ._fourbit import Blockwise4bitWeight
from .base import register_format


@register_format
class NF4Weight(Blockwise4bitWeight):
    """NF4 weight: 16 normal-quantile codes, fp32 absmax per block, optional double quantization.

    Example:
        >>> q = NF4Weight.from_float(w, NF4Config(blocksize=64))
        >>> w_hat = q.dequantize(torch.bfloat16)
    """

    name = "nf4"
    listing_order = 0  # position in CLI choices and reports
    quant_type = "nf4"
    configs = (NF4Config,)
