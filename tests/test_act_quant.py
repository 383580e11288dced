"""Dynamic per-token activation quantization and the scaled int8 / fp8 GEMMs (W8A8, fp8 rowwise).

Quantizers: bit-exact against the reference (codes and scales), fp8 rounding checked on every e4m3
midpoint (ties to even). int8 GEMM: exact int32 sums, so the result equals the reference bit for bit.
fp8 GEMM: fp32 sums, within the dot-product bound. Any M (1..16 included) and N, K off multiples of 16.
"""

import os

import pytest
import torch
from qlora_kit.kernels import act_quant as aq
from qlora_kit.kernels.reference import matmul as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
HAS_FP8 = DEVICE == "cpu" or torch.cuda.get_device_capability() >= (8, 9)
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="fp8 matmuls need sm89+")


def activations(m, k, dtype):
    x = torch.randn(m, k) * 3
    x[0, : min(k, 4)] = torch.tensor([1e-4, -3e-3, 7.0, -0.0])[: min(k, 4)]
    if m > 2:
        x[2] = 0.0  # an all-zero row gets scale 1.0
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 300), (17, 53), (5, 2000)])
def test_quantize_per_token_int8_bit_exact(shape, dtype):
    x = activations(*shape, dtype)
    q, s = aq.quantize_per_token_int8(x)
    q_ref, s_ref = ref.quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 300), (17, 53)])
def test_quantize_per_token_fp8_bit_exact(shape, dtype):
    x = activations(*shape, dtype)
    q, s = aq.quantize_per_token_fp8(x)
    q_ref, s_ref = ref.quantize_per_token_fp8(x)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_int8_rounding_ties_to_even():
    # scale = 127 / 127 = 1: the row holds exact halves
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=DEVICE)
    q, s = aq.quantize_per_token_int8(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


def test_fp8_encoding_every_midpoint_and_subnormal():
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
    mids = (codes[:-1] + codes[1:]) / 2
    values = torch.cat([codes, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
    values = torch.cat([values, -values, torch.tensor([448.0])])  # 448 in the row: scale is exactly 1
    q, s = aq.quantize_per_token_fp8(values[None].to(DEVICE))
    q_ref, _ = ref.quantize_per_token_fp8(values[None])
    assert s.item() == 1.0
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8))


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("nk", [(37, 53), (40, 300), (16, 32)])
def test_int8_gemm_exact(m, nk):
    n, k = nk
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEVICE)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    xs, ws, bias = torch.rand(m, device=DEVICE), torch.rand(n, device=DEVICE), torch.randn(n, device=DEVICE)
    for b in (bias, None):
        out = aq.scaled_gemm(xq, xs, wq, ws, b, torch.float32)
        assert torch.equal(out, ref.scaled_gemm_ref(xq, xs, wq, ws, b, torch.float32))
    out16 = aq.scaled_gemm(xq, xs * 1e-3, wq, ws, bias.half(), torch.float16)
    assert torch.equal(out16, ref.scaled_gemm_ref(xq, xs * 1e-3, wq, ws, bias.half(), torch.float16))


@needs_fp8
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_fp8_gemm(m):
    n, k = 37, 53
    xq = (torch.randn(m, k, device=DEVICE) * 40).to(torch.float8_e4m3fn)
    wq = (torch.randn(n, k, device=DEVICE) * 40).to(torch.float8_e4m3fn)
    xs, ws, bias = torch.rand(m, device=DEVICE), torch.rand(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = aq.scaled_gemm(xq, xs, wq, ws, bias, torch.float32)
    expected = ref.scaled_gemm_ref(xq, xs, wq, ws, bias, torch.float32).double()
    bound = k * 2.0**-23 * (xq.double().abs() @ wq.double().abs().T) * xs.double()[:, None] * ws.double()[None]
    assert ((out.double() - expected).abs() <= bound + 2.0**-22 * expected.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_int8_dynamic_linear_end_to_end(m, dtype):
    n, k = 37, 53
    x = torch.randn(2, m, k, device=DEVICE).to(dtype)
    w = torch.randn(n, k, device=DEVICE)
    ws = w.abs().amax(1) / 127
    wq = torch.round(w / ws[:, None]).clamp(-127, 127).to(torch.int8)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    out = aq.int8_dynamic_linear(x, wq, ws, bias)
    assert out.shape == (2, m, n) and out.dtype == dtype
    assert torch.equal(out, ref.int8_dynamic_linear_ref(x, wq, ws, bias))
    # and it approximates the float product: dynamic int8 error is about |x| |w| / 127 per term
    exact = x.double() @ w.double().T + bias.double()
    assert (out.double() - exact).abs().max() < 0.05 * exact.abs().max()


@needs_fp8
def test_fp8_dynamic_linear_end_to_end():
    x = torch.randn(5, 53, device=DEVICE)
    w = torch.randn(37, 53, device=DEVICE)
    ws = w.abs().amax(1) / 448
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    out = aq.fp8_dynamic_linear(x, wq, ws)
    torch.testing.assert_close(out, ref.fp8_dynamic_linear_ref(x, wq, ws), rtol=1e-5, atol=1e-5)


def test_fp8_needs_sm89(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match="compute capability 8.9 or newer.*sm_80"):
        aq._check_fp8_device(torch.device("cuda"))


def test_errors():
    xq = torch.zeros(2, 8, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="both be int8"):
        aq.scaled_gemm(xq, torch.ones(2), xq.float(), torch.ones(2))
    with pytest.raises(ValueError, match=r"xq \(M, K\) and wq \(N, K\)"):
        aq.scaled_gemm(xq, torch.ones(2), xq[:, :4], torch.ones(2))
