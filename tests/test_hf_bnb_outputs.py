"""qlora-kit NF4 outputs against bitsandbytes' own CPU forward (bitsandbytes 0.50 source, read).

Which path bitsandbytes' ``Linear4bit.forward`` takes on the CPU (``bitsandbytes/nn/modules.py``,
``autograd/_functions.py::matmul_4bit``, ``backends/cpu/ops.py``, ``backends/default/ops.py``):

- CPUs without AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()`` false), any M (1 or more rows), with
  or without grad: ``torch.ops.bitsandbytes.gemm_4bit``, which has no CPU kernel and runs the default one:
  ``dequantize_4bit`` (the C kernel ``cdequantize_blockwise_cpu_nf4_<dtype>``: code * absmax in fp32, cast to
  the compute dtype) then ``torch.nn.functional.linear(x, W, bias)`` in the compute dtype. That is the math
  qlora-kit's CPU path runs, so outputs are bit-identical (tested below for fp32 and bf16, M = 1 and M = 7).
- CPUs with AVX512-BF16, eval mode and no grad: the layer repacks its weight once and runs the fused
  ``gemv_4bit`` kernel for every M: x and the absmax cast to bf16, bf16 output. Different math: see
  :func:`test_avx512bf16_kernel_within_its_rounding_bound` (it runs only on such a CPU).
- Double quantization: bitsandbytes' CPU 8-bit absmax quantizer (``cquantize_blockwise_cpu_fp32``) may pick
  the other code of the bracket holding a value, where qlora-kit (like bitsandbytes' generic path) takes the
  nearest; the bound below (``README``, Hugging Face section) is derived from that and computed per weight.
"""

import pytest
import torch

import qlora_kit
from qlora_kit import functional as F

bnb = pytest.importorskip("bitsandbytes")
F32, BF16 = torch.float32, torch.bfloat16
U = {F32: 2.0**-24, BF16: 2.0**-8}  # unit roundoff


def _pair(out_f, in_f, dtype, double_quant, seed):
    """(bitsandbytes Linear4bit, qlora-kit QuantLinear, the float weight) from the same float layer."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():  # blocks of different scales, as trained weights have
        lin.weight.mul_(torch.rand(out_f, 1) * 4 + 0.05)
    theirs = bnb.nn.Linear4bit(
        in_f, out_f, compute_dtype=dtype, quant_type="nf4", compress_statistics=double_quant
    )  # fmt: skip
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu").eval()
    cfg = qlora_kit.NF4Config(blocksize=64, double_quant=double_quant, compute_dtype=dtype)
    w = lin.weight.detach().clone()
    ours = qlora_kit.quantize(torch.nn.Sequential(lin), cfg)[0].eval()
    return theirs, ours, w


@pytest.mark.skipif(bnb.functional.has_avx512bf16(), reason="this CPU runs bitsandbytes' AVX512-BF16 kernel")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_no_double_quant_is_bit_identical_to_bitsandbytes_forward(dtype):
    for seed, (m, n, k) in enumerate([(1, 96, 256), (7, 96, 256), (1, 40, 320), (7, 130, 192)]):
        theirs, ours, _ = _pair(n, k, dtype, False, seed)
        x = torch.randn(m, k).to(dtype)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), (m, n, k, dtype)
        x = x.clone().requires_grad_(True)  # the autograd path (MatMul4Bit) runs the same dequantize + linear
        assert torch.equal(ours(x), theirs(x))


def _bracket_width(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Width of the interval of the sorted 8-bit map that holds each x (outside the map: distance to its end)."""
    code = code.sort().values
    i = torch.searchsorted(code, x).clamp(1, code.numel() - 1)
    lo, hi = code[i - 1], code[i]
    return torch.maximum(hi - lo, torch.maximum(code[0] - x, x - code[-1]))


def absmax_error_bounds(absmax: torch.Tensor, code: torch.Tensor, nested_blocksize: int = 256):
    """Per-block bounds on |absmax_dq - absmax| for double quantization (bitsandbytes' scheme).

    absmax_dq = code[q] * s + mu, with mu = mean(absmax), s = max |absmax - mu| over the block of 256, and
    q the code for t = (absmax - mu) / s in [-1, 1]. The nearest code is within half the width w(t) of the
    map interval holding t (qlora-kit); either end of that interval within w(t) (bitsandbytes' CPU search).
    fp32 adds at most 4 roundings of size u * (s + |mu|).
    Returns (nearest bound, either-end bound).
    """
    mu = absmax.mean()
    dev = (absmax - mu).reshape(-1)
    pad = (-dev.numel()) % nested_blocksize
    s = torch.nn.functional.pad(dev.abs(), (0, pad)).reshape(-1, nested_blocksize).amax(1)
    s = s.repeat_interleave(nested_blocksize)[: dev.numel()]
    w = _bracket_width(dev / s, code)
    rounding = 4 * U[F32] * (s + mu.abs())
    return s * w / 2 + rounding, s * w + rounding


@pytest.mark.parametrize("seed", range(40))
def test_double_quant_weight_error_within_the_derived_bound(seed):
    """Many seeds and scale spreads: each dequantized weight's relative error, ours and bitsandbytes', holds
    the bound computed from the formula (relative to the weight dequantized with the exact absmax)."""
    g = torch.Generator().manual_seed(seed)
    n, k = [(64, 256), (96, 320), (200, 512), (33, 128)][seed % 4]
    spread = [0.1, 1.0, 4.0, 20.0][seed // 4 % 4]
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) * spread + 0.01)
    p_b, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, absmax = F.quantize_nf4(w, 64)
    assert torch.equal(packed.flatten(), p_b.flatten())  # the 4-bit codes use the exact absmax in both
    q, nested, offset = F.double_quantize(absmax)
    ours = F.double_dequantize(q, nested, offset)
    theirs = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    near, either = absmax_error_bounds(absmax, qs.state2.code)
    assert ((ours - absmax).abs() <= near).all()
    assert ((theirs - absmax).abs() <= either).all()
    assert ((q.int() - qs.absmax.int()).abs() <= 1).all()
    # per weight: w_dq = code4 * absmax_dq, so the relative error of a weight is that of its block's absmax
    exact = F.dequantize_nf4(packed, absmax, (n, k), 64, F32).reshape(-1, 64)
    for dq, bound in ((ours, near), (theirs, either)):
        got = F.dequantize_nf4(packed, dq, (n, k), 64, F32).reshape(-1, 64)
        rel_bound = (bound / absmax).unsqueeze(1) + U[F32]
        nz = exact != 0
        assert ((got - exact).abs()[nz] / exact.abs()[nz] <= rel_bound.expand_as(exact)[nz]).all()


@pytest.mark.skipif(bnb.functional.has_avx512bf16(), reason="this CPU runs bitsandbytes' AVX512-BF16 kernel")
@pytest.mark.parametrize("seed", range(10))
def test_double_quant_outputs_within_the_derived_bound(seed):
    """y_ours - y_bnb = x (W_ours - W_bnb)^T + rounding, where |W_ours - W_bnb| <= |code4| * (near + either)
    per block (both absmax errors above, from the exact absmax), and each fp32 x W^T + b rounds within
    gamma_{K+1} * (|x| |W|^T + |b|)."""
    n, k, m = 96, 256, [1, 7][seed % 2]
    theirs, ours, w = _pair(n, k, F32, True, seed)
    x = torch.randn(m, k)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs()
    _, absmax = F.quantize_nf4(w, 64)
    near, either = absmax_error_bounds(absmax, theirs.weight.quant_state.state2.code)
    code4 = F.dequantize_nf4(ours.qweight.packed, torch.ones_like(absmax), (n, k), 64, F32).abs()
    dw = (code4.reshape(-1, 64) * (near + either).unsqueeze(1)).reshape(n, k)
    w_ours = ours.qweight.dequantize(F32).abs()
    gamma = (k + 1) * U[F32] / (1 - (k + 1) * U[F32])
    bias = theirs.bias.abs()
    bound = x.abs() @ dw.T + gamma * (x.abs() @ (2 * w_ours + dw).T + 2 * bias)
    assert (diff <= bound).all()


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes' AVX512-BF16 kernel needs that CPU")
@pytest.mark.parametrize("m", [1, 7])
def test_avx512bf16_kernel_within_its_rounding_bound(m):
    """bitsandbytes' fused CPU kernel rounds x and the absmax to bf16 and writes bf16: three bf16 roundings of
    each product's factors and one of the result, accumulation in fp32 (gamma_K)."""
    n, k = 96, 256
    theirs, ours, _ = _pair(n, k, F32, False, m)
    x = torch.randn(m, k)
    with torch.no_grad():
        y_o, y_b = ours(x), theirs(x)
    w_abs = ours.qweight.dequantize(F32).abs()
    u, gamma = U[BF16], k * U[F32] / (1 - k * U[F32])
    bound = (3 * u + 3 * u * u + gamma) * (x.abs() @ w_abs.T) + u * (y_o.abs() + theirs.bias.abs()) + 2 * u * u
    assert ((y_o - y_b).abs() <= bound * (1 + 2 * u)).all()
