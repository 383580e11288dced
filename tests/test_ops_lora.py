"""qlora_kit::lora_linear (qlora_kit/ops_lora.py): opcheck of the custom op and its backward, the Triton
backend equal to kernels.lora.lora_linear (interpreter on CPU), and torch.compile(fullgraph=True)."""

import pytest
import torch
from qlora_kit.kernels.reference import lora as ref
from qlora_kit.kernels.reference import quant_4bit as r4
from qlora_kit.kernels.reference import quant_int as ri
from qlora_kit.kernels.reference.matmul import Packed4bit, Quant4bitMeta

from qlora_kit import ops_lora

N, K, R = 37, 64, 4


def _base(kind: str):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.1
    if kind == "float":
        return w
    if kind == "nf4":
        packed, absmax = r4.quantize_4bit(w, 64, "nf4")
        return Packed4bit(packed, Quant4bitMeta((N, K), 64, "nf4", True), None, *r4.double_quantize(absmax))
    if kind == "int4":
        packed, scale, zero = ri.quantize_int4(w, 32)
        return ref.PackedInt(packed, scale, ref.IntQuantMeta((N, K), "int4", 32), zero)
    q, scale = ri.quantize_int8(w)
    return ref.PackedInt(q, scale, ref.IntQuantMeta((N, K), "int8"))


def _inputs(dropout: bool):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, K, generator=g, requires_grad=True)
    a = (torch.randn(R, K, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(N, R, generator=g) * 0.1).requires_grad_()
    bias = torch.randn(N, generator=g).requires_grad_()
    xd = torch.nn.functional.dropout(x, 0.2) if dropout else None
    return x, a, b, bias, xd


BASES = ["float", "nf4", "int4", "int8"]


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_opcheck(kind, dropout):
    x, a, b, bias, xd = _inputs(dropout)
    x2 = x.detach().reshape(-1, K).requires_grad_()
    xd2 = None if xd is None else xd.detach().reshape(-1, K).requires_grad_()
    args = (x2, xd2, a, b, bias, *ops_lora._weight_tensors(_base(kind)), 2.0)
    torch.library.opcheck(torch.ops.qlora_kit.lora_linear, args)


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_matches_reference_forward_and_backward(kind, dropout):
    """CPU (reference backend): values and gradients of x, x_d, A, B and bias equal the plain formula."""
    base = _base(kind)
    torch.manual_seed(0)
    x, a, b, bias, xd = _inputs(dropout)
    y = ops_lora.lora_linear(x, base, bias, a, b, ops_lora.LoraMeta(scale=2.0, dropout=dropout), x_dropped=xd)
    w = ref.dense_weight(base, torch.float32)
    expected = ref.lora_linear(x, w, bias, a, b, 2.0, xd)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, a, b, bias), grad, retain_graph=True)
    theirs = torch.autograd.grad(expected, (x, a, b, bias), grad)
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", BASES)
def test_triton_backend_equals_kernel_function(kind, monkeypatch):
    """QLORA_KIT_BACKEND=triton: the op runs the fused kernels (interpreter) and matches lora_linear's autograd."""
    pytest.importorskip("triton")
    from qlora_kit.kernels import lora as lora_k

    monkeypatch.setenv("QLORA_KIT_BACKEND", "triton")
    base = _base(kind)
    x, a, b, bias, _ = _inputs(False)
    meta = ops_lora.LoraMeta(scale=0.5)
    calls = []
    forward = lora_k.lora_forward
    monkeypatch.setattr(lora_k, "lora_forward", lambda *args: calls.append(args[-2]) or forward(*args))
    y = ops_lora.lora_linear(x, base, bias, a, b, meta)
    assert len(calls) == 1 and type(calls[0]) is type(base)
    expected = lora_k.lora_linear(x, base, bias, a, b, meta)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, a, b, bias), grad)
    theirs = torch.autograd.grad(expected, (x, a, b, bias), grad)
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph():
    base = _base("nf4")
    x, a, b, bias, _ = _inputs(False)
    meta = ops_lora.LoraMeta(scale=2.0)

    def f(x, a, b, bias):
        return ops_lora.lora_linear(x, base, bias, a, b, meta)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, a, b, bias)
    torch.testing.assert_close(y, f(x, a, b, bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and b.grad is not None
