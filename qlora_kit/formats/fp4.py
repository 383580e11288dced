"""FP4: 4-bit float (1 sign, 2 exponent, 1 mantissa bit), byte-compatible with bitsandbytes' ``quant_type="fp4"``."""

from __future__ import annotations

from ..configs import FP4Config
from ._fourbit import Blockwise4bitWeight
from .base import register_format


@register_format
class FP4Weight(Blockwise4bitWeight):
    """FP4 weight: bitsandbytes' 16-entry FP4 table, fp32 absmax per block, optional double quantization."""

    name = "fp4"
    listing_order = 1  # position in CLI choices and reports
    quant_type = "fp4"
    configs = (FP4Config,)
