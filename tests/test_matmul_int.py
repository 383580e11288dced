"""int4 per-group (W4A16) and per-channel int8 / fp8-code (W8A16) matmuls against fp64 references.

Same criteria as the 4-bit tests: fp32 within K * 2**-23 * (|x| |W|^T) per element; fp16 within twice
PyTorch's own fp16 error; every path; forward and grad_input; N, K not multiples of 16 or of the group.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from qlora_kit.kernels import matmul_int as mi
from qlora_kit.kernels import quant_int
from qlora_kit.kernels.planner import MatmulPlan
from qlora_kit.kernels.reference import matmul as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

PLANS = [MatmulPlan("gemv"), MatmulPlan("gemm"), MatmulPlan("dequant")]


def make_int4(n, k, group_size, fractional_zero=False, seed=0):
    """Asymmetric RTN per group in the Int4Weight layout: packed (n, ceil(k/2)), bf16 scale / zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    ngroups = -(-k // group_size)
    wg = F.pad(w, (0, ngroups * group_size - k)).reshape(n, ngroups, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).bfloat16()
    zero = torch.round(-lo / scale.float()).clamp(0, 15)
    if fractional_zero:  # HQQ-style zero points are not integers
        zero = zero + torch.rand(zero.shape, generator=g) - 0.5
    zero = zero.bfloat16()
    q = torch.round(wg / scale.float()[..., None] + zero.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(n, -1)[:, :k]
    q = F.pad(q, (0, k % 2))
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    return packed.contiguous().to(DEVICE), scale.to(DEVICE), zero.to(DEVICE)


def make_channelwise(n, k, fp8=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qmax = 448.0 if fp8 else 127.0
    scale = w.abs().amax(1) / qmax
    if fp8:
        q = (w / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.to(DEVICE), scale.to(DEVICE)


def dot_bound(a, b, k):
    return k * 2.0**-23 * (a.double().abs() @ b.double().abs())


def assert_matmul_close(out, ref64, torch_out, abs_bound):
    err = (out.double() - ref64).abs()
    if out.dtype == torch.float32:
        assert (err <= abs_bound).all(), f"max excess {(err - abs_bound).max().item():.3e}"
    else:
        torch_err = (torch_out.double() - ref64).abs().max().item()
        assert err.max().item() <= 2 * torch_err + abs_bound.max().item(), (err.max().item(), torch_err)


def check_forward_backward(matmul, grad_input, w32, m, dtype, plan, with_bias):
    n, k = w32.shape
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    out = matmul(x, bias, plan)
    assert out.shape == (m, n) and out.dtype == dtype
    ref64 = x.double() @ w32.double().T + (0 if bias is None else bias.double())
    torch_out = F.linear(x, w32.to(dtype), bias)
    assert_matmul_close(out, ref64, torch_out, dot_bound(x, w32.T, k) + 2.0**-23 * ref64.abs())
    grad = torch.randn(m, n, device=DEVICE).to(dtype)
    gx = grad_input(grad, plan)
    assert gx.shape == (m, k) and gx.dtype == dtype
    assert_matmul_close(gx, grad.double() @ w32.double(), grad @ w32.to(dtype), dot_bound(grad, w32, n))


# (N, K, group_size, fractional zero)
INT4_WEIGHTS = [(37, 53, 32, False), (40, 300, 128, True), (17, 96, 64, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", INT4_WEIGHTS, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.path)
def test_int4(plan, m, weight, dtype):
    n, k, gs, frac = weight
    packed, scale, zero = make_int4(n, k, gs, frac)
    w32 = ref.dequantize_int4(packed, scale, zero, k, gs, torch.float32)
    check_forward_backward(
        lambda x, b, p: mi.matmul_int4(x, packed, scale, zero, gs, b, plan=p),
        lambda g, p: mi.matmul_int4_grad_input(g, packed, scale, zero, k, gs, plan=p),
        w32,
        m,
        dtype,
        plan,
        with_bias=m in (1, 17),
    )


CW_WEIGHTS = [(37, 53, False), (40, 300, False), (33, 70, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", CW_WEIGHTS, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.path)
def test_channelwise(plan, m, weight, dtype):
    n, k, fp8 = weight
    if fp8 and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 codes need sm89+")
    qdata, scale = make_channelwise(n, k, fp8)
    w32 = ref.dequantize_channelwise(qdata, scale, torch.float32)
    check_forward_backward(
        lambda x, b, p: mi.matmul_channelwise(x, qdata, scale, b, plan=p),
        lambda g, p: mi.matmul_channelwise_grad_input(g, qdata, scale, plan=p),
        w32,
        m,
        dtype,
        plan,
        with_bias=m in (3, 64),
    )


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k(split_k):
    plan = MatmulPlan("gemv", split_k)
    x = torch.randn(2, 300, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    packed, scale, zero = make_int4(40, 300, 64)
    w32 = ref.dequantize_int4(packed, scale, zero, 300, 64, torch.float32)
    ref64 = x.double() @ w32.double().T + bias.double()
    out = mi.matmul_int4(x, packed, scale, zero, 64, bias, plan=plan)
    assert ((out.double() - ref64).abs() <= dot_bound(x, w32.T, 300) + 1e-6).all()
    qdata, cscale = make_channelwise(40, 300)
    w32 = ref.dequantize_channelwise(qdata, cscale, torch.float32)
    ref64 = x.double() @ w32.double().T + bias.double()
    out = mi.matmul_channelwise(x, qdata, cscale, bias, plan=plan)
    assert ((out.double() - ref64).abs() <= dot_bound(x, w32.T, 300) + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_int4_dequantize_kernel_bit_exact(dtype):
    packed, scale, zero = make_int4(37, 53, 32, fractional_zero=True)
    expected = ref.dequantize_int4(packed, scale, zero, 53, 32, dtype)
    assert torch.equal(quant_int.dequantize_int4(packed, scale, zero, 53, 32, dtype), expected)


def test_leading_dims_and_errors():
    packed, scale, zero = make_int4(20, 64, 32)
    x = torch.randn(2, 3, 64, device=DEVICE)
    out = mi.matmul_int4(x, packed, scale, zero, 32, plan=MatmulPlan("gemm"))
    torch.testing.assert_close(out, ref.matmul_int4_ref(x, packed, scale, zero, 32), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed must be uint8 of shape"):
        mi.matmul_int4(torch.randn(1, 66, device=DEVICE), packed, scale, zero, 32)
    with pytest.raises(ValueError, match="group_size"):
        mi.matmul_int4(x, packed, scale, zero, 48)
    qdata, cscale = make_channelwise(20, 64)
    with pytest.raises(ValueError, match="one value per output row"):
        mi.matmul_channelwise(x, qdata, cscale[:-1])
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        mi.matmul_channelwise(x, qdata.float(), cscale)
