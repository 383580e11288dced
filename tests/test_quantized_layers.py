"""Each quantized layer computes exactly the float op on its dequantized weight (layout checks)."""

import copy

import pytest
import torch
from torch import nn

import qlora_kit
from qlora_kit.nn.quantized import QuantizedLayer

F32 = torch.float32


def _conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs


LAYERS = {
    "linear": (lambda: nn.Linear(40, 24), lambda: torch.randn(3, 5, 40)),
    "linear_nobias": (lambda: nn.Linear(33, 7, bias=False), lambda: torch.randn(2, 33)),
    "gpt2_conv1d": (_conv1d_gpt2, lambda: torch.randn(2, 5, 40)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), lambda: torch.randn(2, 4, 9)),
    "conv2d": (
        lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, padding_mode="reflect"),
        lambda: torch.randn(2, 4, 9, 9),
    ),
    "convT2d": (lambda: nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2), lambda: torch.randn(2, 6, 5, 5)),
    "embedding": (lambda: nn.Embedding(50, 12, padding_idx=0), lambda: torch.randint(0, 50, (3, 7))),
}
CONFIGS = {
    "nf4": qlora_kit.NF4Config(blocksize=32, compute_dtype=F32),
    "fp4": qlora_kit.FP4Config(blocksize=64, double_quant=False, compute_dtype=F32),
    "int8": qlora_kit.Int8WeightConfig(compute_dtype=F32),
    "int4": qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32),
    "fp8": qlora_kit.FP8WeightConfig(compute_dtype=F32),
}


@pytest.mark.parametrize("fmt", list(CONFIGS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_equals_float_op_on_dequantized_weight(kind, fmt):
    torch.manual_seed(0)
    build, make_input = LAYERS[kind]
    float_layer = build()
    x = make_input()
    holder = nn.Sequential(copy.deepcopy(float_layer))
    qlora_kit.quantize(holder, CONFIGS[fmt], filter_fn=lambda m, n: True)
    q = holder[0]
    assert isinstance(q, QuantizedLayer)
    w = q.dequantize_weight(F32)
    assert w.shape == float_layer.weight.shape
    # quantization error is small relative to the weight
    err = (w - float_layer.weight).norm() / float_layer.weight.norm()
    assert err < {"nf4": 0.15, "fp4": 0.25, "int8": 0.01, "int4": 0.15, "fp8": 0.05}[fmt]
    with torch.no_grad():
        float_layer.weight.copy_(w)
        expect = float_layer(x)
        got = q(x)
    assert got.dtype == expect.dtype
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_bf16_compute_returns_input_dtype():
    holder = nn.Sequential(nn.Linear(16, 8))
    qlora_kit.quantize(holder, qlora_kit.NF4Config(), filter_fn=lambda m, n: True)
    assert holder(torch.randn(2, 16)).dtype == torch.float32
    assert holder(torch.randn(2, 16, dtype=torch.float16)).dtype == torch.float16


def test_set_float_weight_requantizes():
    holder = nn.Sequential(nn.Linear(16, 8))
    qlora_kit.quantize(holder, qlora_kit.NF4Config(compute_dtype=F32), filter_fn=lambda m, n: True)
    new = torch.randn(8, 16)
    holder[0].set_float_weight(new)
    assert (holder[0].dequantize_weight(F32) - new).norm() / new.norm() < 0.15
