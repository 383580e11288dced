"""``_dispatch.call``: the forward ops' functions run directly only where the dispatcher has nothing to do.

Directly: plain eager CPU tensors, nothing to record (bit-identical to the op, since the same function runs).
Through the op: autograd recording, a dispatch mode (what FakeTensor, FlopCounter and friends use), torch.compile.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_kit import _dispatch, ops, registry

FORMATS = ["nf4", "int4", "int8", "fp8", "mxfp4"]


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _weight(fmt):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    return registry.get_format(fmt).from_float(w, registry.weight_config(fmt))


@pytest.fixture
def spy(monkeypatch):
    """Counts direct calls of the op functions."""
    calls = []
    for op, fn in list(_dispatch._FUNCTIONS.items()):

        def counted(*args, fn=fn):
            calls.append(fn.__name__)
            return fn(*args)

        monkeypatch.setitem(_dispatch._FUNCTIONS, op, counted)
    return calls


@pytest.mark.parametrize("fmt", FORMATS)
def test_eager_no_grad_runs_the_function_bit_identically(spy, fmt):
    qw = _weight(fmt)
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad():
        y = ops.quantized_linear(x, qw)
    assert spy, "the eager CPU call did not take the direct path"
    with _Log() as log:  # the same call through the op
        y_op = ops.quantized_linear(x, qw)
    assert any("qlora_kit" in name for name in log.ops)
    assert torch.equal(y, y_op)


@pytest.mark.parametrize("fmt", FORMATS)
def test_autograd_goes_through_the_op(spy, fmt):
    qw = _weight(fmt)
    x = torch.randn(2, 128, requires_grad=True)
    y = ops.quantized_linear(x, qw)
    assert not spy and y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dispatch_mode_sees_the_op(spy):
    with torch.no_grad(), _Log() as log:
        ops.quantized_linear(torch.randn(1, 128), _weight("int8"))
    assert not spy and any("qlora_kit.matmul_channelwise" in name for name in log.ops)


def test_compile_traces_the_op(spy):
    qw = _weight("nf4")
    x = torch.randn(2, 128)
    fn = torch.compile(lambda t: ops.quantized_linear(t, qw), fullgraph=True, backend="eager")
    with torch.no_grad():
        y = fn(x)
    assert not spy
    with torch.no_grad():
        assert torch.allclose(y, ops.quantized_linear(x, qw))


def test_jit_trace_records_the_op(spy):
    qw = _weight("int8")

    class Layer(torch.nn.Module):
        def forward(self, x):
            return ops.quantized_linear(x, qw)

    with torch.no_grad():
        traced = torch.jit.trace(Layer(), torch.randn(2, 128), check_trace=False)  # the check reruns it eagerly
    assert not spy and "qlora_kit::matmul_channelwise" in str(traced.graph)
