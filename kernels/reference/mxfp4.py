"""Pure-PyTorch reference for MXFP4 weights (OCP Microscaling Formats v1.0, the format gpt-oss ships in).

A weight W (N, K) is cut along K into blocks of 32 values. Each block stores one shared scale X = 2**(E - 127)
as an E8M0 byte E (exponent only; 255 would be NaN and is never written) and 32 FP4 E2M1 elements
(1 sign, 2 exponent bits with bias 1, 1 mantissa bit): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, where the 3-bit
magnitude pattern is the index into that list. W ~= element * X.

Quantization (the spec's conversion, section 6.3):
* shared exponent = floor(log2(max |v| of the block)) - 2 (2 = the exponent of FP4's largest normal, 6 = 1.5 * 2**2),
  clamped to [-127, 127]; an all-zero block takes E = 0. floor(log2) is read exactly with ``torch.frexp``.
* each element = v / X (exact: X is a power of two) rounded to the nearest FP4 value, ties to the even pattern
  (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at 6; the sign bit is the
  sign of v (negative values that round to zero keep it: -0).
Layout (gpt-oss / OpenAI ``triton_kernels``): ``packed`` uint8 (N, ceil(K / 32) * 16), element 2i of a row in the
LOW nibble of byte i and 2i + 1 in the high nibble; ``scales`` uint8 (N, ceil(K / 32)). K that is not a multiple
of 32 is padded with zeros (they do not change a block's maximum). 4.25 bits per weight when 32 divides K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32
SCALE_BIAS = 127
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)
# rounding thresholds between consecutive magnitudes; at an exact tie the even pattern wins, so a magnitude moves
# up at ``>=`` when the upper pattern is even (0.75, 1.75, 3.5) and at ``>`` when it is odd (0.25, 1.25, 2.5, 5)
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def padded_k(k: int) -> int:
    """K rounded up to whole blocks of 32."""
    return -(-k // BLOCK) * BLOCK


def shared_exponent(block_absmax: torch.Tensor) -> torch.Tensor:
    """floor(log2(absmax)) - 2 per block, clamped to [-127, 127] (-127 for an all-zero block), as int32."""
    _, e = torch.frexp(block_absmax.float())  # absmax = m * 2**e with m in [0.5, 1): floor(log2) = e - 1
    exp = (e.to(torch.int32) - 1) - 2
    exp = torch.where(block_absmax > 0, exp, torch.full_like(exp, -SCALE_BIAS))
    return exp.clamp(-SCALE_BIAS, SCALE_BIAS)


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 4-bit patterns (uint8 0..15) of already-scaled fp32 values: round to nearest, ties to even, saturate."""
    a = scaled.abs()
    idx = torch.zeros_like(a, dtype=torch.uint8)
    for threshold, up_at_tie in _THRESHOLDS:
        idx += (a >= threshold if up_at_tie else a > threshold).to(torch.uint8)
    sign = torch.signbit(scaled).to(torch.uint8) << 3
    return idx | sign


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, ceil(K/32)*16), scales uint8 E8M0 (N, ceil(K/32))) of a 2-D float matrix."""
    n, k = w.shape
    wf = F.pad(w.float(), (0, padded_k(k) - k)).reshape(n, -1, BLOCK)
    exp = shared_exponent(wf.abs().amax(dim=-1))
    scaled = torch.ldexp(wf, (-exp).unsqueeze(-1).float())
    codes = e2m1_codes(scaled).reshape(n, -1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), (exp + SCALE_BIAS).to(torch.uint8)


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) matrix in ``dtype``: element * 2**(E - 127) in fp32, then cast."""
    n = packed.shape[0]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(n, -1)
    mag = E2M1_MAGNITUDES.to(packed.device)[(codes & 0x7).long()]
    vals = torch.where((codes & 0x8).bool(), -mag, mag).reshape(n, -1, BLOCK)
    w = torch.ldexp(vals, (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1).float())
    return w.reshape(n, -1)[:, :k].to(dtype)


def matmul_mxfp4_ref(x: torch.Tensor, packed, scales, k: int, bias=None) -> torch.Tensor:
    """x @ dequant(W)^T + bias, W dequantized to x's dtype first (as every weight-only reference does)."""
    return F.linear(x, dequantize_mxfp4(packed, scales, k, x.dtype), None if bias is None else bias.to(x.dtype))
