"""Int8DynamicActivationConfig (W8A8) and FP8DynamicActivationConfig through quantize(): the layers quantize
their activations per token on every call, with the numerics of qlora_kit.ops' references."""

import pytest
import torch
from qlora_kit.kernels.reference import matmul as ref
from torch import nn

import qlora_kit
from qlora_kit import models
from qlora_kit.nn.quantized import QuantConv1D, QuantLinear

F32 = torch.float32


@pytest.mark.parametrize(
    ("config", "fmt", "ref_fn"),
    [
        (qlora_kit.Int8DynamicActivationConfig(compute_dtype=F32), "int8", ref.int8_dynamic_linear_ref),
        (qlora_kit.FP8DynamicActivationConfig(compute_dtype=F32), "fp8", ref.fp8_dynamic_linear_ref),
    ],
    ids=["w8a8", "fp8"],
)
def test_linear_quantizes_activations_per_token(config, fmt, ref_fn):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    layer = qlora_kit.quantize(nn.Sequential(lin), config, filter_fn=lambda m, n: True)[0]
    assert isinstance(layer, QuantLinear) and layer.format_name == fmt
    x = torch.randn(5, 40) * torch.linspace(0.1, 8, 40)  # uneven channels, so activation rounding shows
    q = layer.qweight
    got = layer(x)
    assert torch.equal(got, ref_fn(x, q.qdata, q.scale, layer.bias))
    # the activation quantizer is really there: weight-only on the same codes differs
    weight_only = x @ q.dequantize(F32).t() + layer.bias
    assert not torch.equal(got, weight_only)
    assert torch.allclose(got, weight_only, rtol=0.1, atol=0.1 * weight_only.abs().max().item())


def test_w8a8_gradients_pass_straight_through():
    lin = nn.Linear(16, 8)
    layer = qlora_kit.quantize(
        nn.Sequential(lin), qlora_kit.Int8DynamicActivationConfig(compute_dtype=F32), filter_fn=lambda m, n: True
    )[0]
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    w = layer.qweight.dequantize(F32)
    assert torch.allclose(x.grad, torch.ones(3, 8) @ w, atol=1e-6)


def test_w8a8_on_gpt2_conv1d_and_generate():
    model = models.tiny_gpt2()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = model(ids).logits
    qlora_kit.quantize(model, qlora_kit.Int8DynamicActivationConfig(compute_dtype=F32))
    assert any(isinstance(m, QuantConv1D) for m in model.modules())
    with torch.no_grad():
        got = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref_logits.flatten(), dim=0)
    assert cos > 0.999  # measured 0.99997 (int8 per-token activations, int8 per-channel weights)
    out = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_configs_validate():
    with pytest.raises(ValueError, match="compute_dtype"):
        qlora_kit.Int8DynamicActivationConfig(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="compute_dtype"):
        qlora_kit.FP8DynamicActivationConfig(compute_dtype="bf16")
