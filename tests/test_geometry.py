"""The layer-geometry table (qlora_kit/nn/geometry.py): one 2-D view per layer type, used alike by the
quantized, fake-quant and LoRA layers and by PTQ."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import qlora_kit
from qlora_kit.nn import geometry
from qlora_kit.nn.fake_quant import to_fake_quant
from qlora_kit.nn.lora_layers import lora_kind, wrap_with_lora
from qlora_kit.nn.quantized import quantized_class_for

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (5, 6)),
    "conv1d_hf": (lambda: Conv1D(5, 6), (5, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (6, 12)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, (3, 2), groups=2), (6, 12)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (3, 16)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3), (6, 12)),
    "convT2d_groups": (lambda: nn.ConvTranspose2d(4, 6, (3, 2), groups=2), (3, 24)),
    "embedding": (lambda: nn.Embedding(7, 5), (7, 5)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_view_shape_and_round_trip(name):
    make, shape2d = LAYERS[name]
    layer = make()
    w = torch.randn(layer.weight.shape)
    w2d = geometry.to_2d(layer, w)
    assert tuple(w2d.shape) == shape2d == geometry.shape_2d(layer, w.shape)
    assert torch.equal(geometry.from_2d(layer, w2d, w.shape), w)
    assert geometry.geometry_of(type(layer)) is geometry.geometry_of(layer)
    assert lora_kind(layer) is not None


@pytest.mark.parametrize("name", ["linear", "conv1d_hf", "conv1d", "convT2d_groups", "embedding"])
def test_quantized_and_fake_quant_layers_share_the_view(name):
    """Output channel i of the view is output channel i of the layer: scaling row i of the view scales
    output i of the float layer, and the quantized / fake-quant layers resolve to the same geometry."""
    make, _ = LAYERS[name]
    layer = make()
    geom = geometry.geometry_of(layer)
    assert geometry.geometry_of(quantized_class_for(layer)) is geom
    fake = to_fake_quant(layer, "int8", qlora_kit.Int8WeightConfig(compute_dtype=torch.float32))
    assert geometry.geometry_of(fake) is geom
    config = qlora_kit.Int8WeightConfig(compute_dtype=torch.float32)
    q = quantized_class_for(layer).from_float(layer, config, "int8")
    assert q.logical_weight_shape() == tuple(layer.weight.shape)
    assert tuple(q.qweight.shape) == geometry.shape_2d(layer, layer.weight.shape)
    lora = wrap_with_lora(q)
    assert tuple(lora._w_to_2d(q.dequantize_weight(torch.float32)).shape) == (
        geometry.shape_2d(layer, layer.weight.shape) if name != "embedding" else (5, 7)
    )


def test_conv_transpose_view_rows_are_output_channels():
    layer = nn.ConvTranspose2d(3, 4, 2, bias=False)
    x = torch.randn(1, 3, 5, 5)
    scale = torch.arange(1.0, 5.0)
    w2d = geometry.to_2d(layer, layer.weight.detach())
    with torch.no_grad():
        ref = layer(x) * scale[None, :, None, None]
        layer.weight.copy_(geometry.from_2d(layer, w2d * scale[:, None], layer.weight.shape))
        torch.testing.assert_close(layer(x), ref)


def test_unsupported_layer_says_so():
    assert geometry.geometry_of(nn.LayerNorm(4)) is None and lora_kind(nn.LayerNorm(4)) is None
    with pytest.raises(TypeError, match="LayerNorm has no 2-D weight view"):
        geometry.to_2d(nn.LayerNorm(4), torch.ones(4))
