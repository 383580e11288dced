"""The qlora_kit custom ops: schema / fake / autograd registration (opcheck), Triton vs reference behind
the same op, ``quantized_linear`` dispatch on every format, and torch.compile(fullgraph=True) on CPU."""

import importlib
import os

import pytest
import torch
from qlora_kit.kernels.reference import matmul as ref
from torch import nn

from qlora_kit import configs, ops
from qlora_kit.formats.base import get_format

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CONFIGS = {
    "nf4": configs.NF4Config(blocksize=64, double_quant=True, compute_dtype=torch.float32),
    "fp4": configs.FP4Config(blocksize=32, double_quant=False, compute_dtype=torch.float32),
    "int4": configs.Int4WeightConfig(group_size=32, compute_dtype=torch.float32),
    "int8": configs.Int8WeightConfig(compute_dtype=torch.float32),
    "fp8": configs.FP8WeightConfig(compute_dtype=torch.float32),
}


class _StandIn(nn.Module):
    """A format object with the contract's buffers, for formats whose class is not in the tree yet."""

    def __init__(self, name, shape, **buffers):
        super().__init__()
        self.name, self.shape = name, tuple(shape)
        for key, value in buffers.items():
            if torch.is_tensor(value):
                self.register_buffer(key, value)
            else:
                setattr(self, key, value)


def _stand_in(name, w):
    n, k = w.shape
    if name == "int8":
        scale = w.abs().amax(1) / 127
        return _StandIn(name, w.shape, qdata=torch.round(w / scale[:, None]).to(torch.int8), scale=scale)
    if name == "fp8":
        scale = w.abs().amax(1) / 448
        return _StandIn(name, w.shape, qdata=(w / scale[:, None]).to(torch.float8_e4m3fn), scale=scale)
    gs = CONFIGS["int4"].group_size
    wg = torch.nn.functional.pad(w, (0, -k % gs)).reshape(n, -1, gs)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).bfloat16()
    zero = torch.round(-lo / scale.float()).clamp(0, 15).bfloat16()
    q = torch.round(wg / scale.float()[..., None] + zero.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = torch.nn.functional.pad(q.reshape(n, -1)[:, :k], (0, k % 2))
    return _StandIn(name, w.shape, packed=(q[:, 0::2] << 4) | q[:, 1::2], scale=scale, zero=zero, group_size=gs)


def make_qweight(name, n=37, k=53, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    try:
        importlib.import_module(f"qlora_kit.formats.{name}")
        return get_format(name).from_float(w, CONFIGS[name])
    except ImportError:
        return _stand_in(name, w)


def dequantized(qweight):
    if hasattr(qweight, "dequantize"):
        return qweight.dequantize(torch.float32)
    if qweight.name == "int4":
        return ref.dequantize_int4(
            qweight.packed, qweight.scale, qweight.zero, qweight.shape[1], qweight.group_size, torch.float32
        )
    return ref.dequantize_channelwise(qweight.qdata, qweight.scale, torch.float32)


FORMATS = list(CONFIGS)


@pytest.mark.parametrize("name", FORMATS)
def test_quantized_linear_matches_dequantize_then_matmul(name):
    qw = make_qweight(name)
    x = torch.randn(2, 3, 53, requires_grad=True)
    bias = torch.randn(37, requires_grad=True)
    out = ops.quantized_linear(x, qw, bias)
    w = dequantized(qw)
    expected = torch.nn.functional.linear(x.detach(), w, bias.detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, grad.sum((0, 1)), rtol=1e-5, atol=1e-5)


def _op_cases():
    x = torch.randn(3, 53)
    bias = torch.randn(37)
    nf4, fp4, int4, int8, fp8 = (make_qweight(name) for name in FORMATS)
    yield (
        "nf4",
        torch.ops.qlora_kit.matmul_4bit,
        (x, nf4.packed, nf4.qabsmax, nf4.nested_absmax, nf4.offset, bias, 37, 53, 64, "nf4"),
    )
    yield "fp4", torch.ops.qlora_kit.matmul_4bit, (x, fp4.packed, fp4.absmax, None, None, None, 37, 53, 32, "fp4")
    yield "int4", torch.ops.qlora_kit.matmul_int4, (x, int4.packed, int4.scale, int4.zero, bias, 32)
    yield "int8", torch.ops.qlora_kit.matmul_channelwise, (x, int8.qdata, int8.scale, bias)
    yield "w8a8", torch.ops.qlora_kit.int8_dynamic_linear, (x, int8.qdata, int8.scale, bias)
    yield "fp8", torch.ops.qlora_kit.fp8_dynamic_linear, (x, fp8.qdata, fp8.scale, None)


OP_CASES = list(_op_cases())


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c[0])
def test_opcheck(case):
    name, op, args = case
    args = (args[0].clone().requires_grad_(True), *args[1:])
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if name == "fp8":  # torch's schema checker compares inputs with allclose, which CPU fp8 tensors lack
        utils = utils[1:]
    torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton runs need TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c[0])
def test_triton_behind_the_op_matches_reference(case, monkeypatch):
    _, op, args = case
    grads = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("QLORA_KIT_BACKEND", backend)
        x = args[0].clone().requires_grad_(True)
        out = op(x, *args[1:])
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), x.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-5)


def test_activation_modes():
    x = torch.randn(4, 53)
    int8, nf4 = make_qweight("int8"), make_qweight("nf4")
    out = ops.quantized_linear(x, int8, activation="int8")
    torch.testing.assert_close(out, ref.int8_dynamic_linear_ref(x, int8.qdata, int8.scale))
    with pytest.raises(ValueError, match="needs an 'int8' weight"):
        ops.quantized_linear(x, nf4, activation="int8")
    with pytest.raises(ValueError, match="does not support weight format"):
        ops.quantized_linear(x, _StandIn("int3", (1, 1)))


class _TinyQuantMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = make_qweight("nf4", 40, 53)
        self.down = make_qweight("int4", 53, 40, seed=1)
        self.register_buffer("bias", torch.randn(40))

    def forward(self, x):
        h = torch.nn.functional.silu(ops.quantized_linear(x, self.up, self.bias))
        return ops.quantized_linear(h, self.down) + x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = _TinyQuantMLP()
    x = torch.randn(2, 5, 53)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [model(xs[0]), compiled(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)  # inductor fuses the pointwise ops
    for out in outs:
        out.square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-4)


MODEL_CONFIGS = {
    **CONFIGS,
    "w8a8": configs.Int8DynamicActivationConfig(compute_dtype=torch.float32),
    "fp8_rowwise": configs.FP8DynamicActivationConfig(compute_dtype=torch.float32),
}


@pytest.mark.parametrize("fmt", list(MODEL_CONFIGS))
def test_compile_quantized_llama_fullgraph_through_the_ops(fmt):
    """quantize() a transformers Llama, torch.compile(fullgraph=True): every quantized linear layer is one
    qlora_kit custom-op node in the captured graph (no graph break), and the outputs equal eager mode."""
    import qlora_kit
    from qlora_kit import models
    from qlora_kit.nn.quantized import QuantizedLayer

    torch._dynamo.reset()
    model = qlora_kit.quantize(models.tiny_llama(), MODEL_CONFIGS[fmt]).eval()
    n_linear = sum(
        isinstance(m, QuantizedLayer) and m.qweight.shape[1] == m.in_features
        for m in model.modules()
        if hasattr(m, "in_features")
    )
    assert n_linear > 0
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend=record)
    with torch.no_grad():
        expect = model(ids).logits
        got = compiled(ids).logits
    assert torch.equal(got, expect)
    assert len(graphs) == 1
    op_nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "qlora_kit" in str(n.target)]
    assert len(op_nodes) == n_linear
