"""Quantized layers look like the float layers they replace: ``.weight``, in/out features, frozen parameters."""

import pytest
import torch
from torch import nn

import qlora_kit
from qlora_kit.nn.quantized import QuantizedLayer
from qlora_kit.nn.weight_view import DequantizedWeight

F32 = torch.float32


def _conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(24, 40)


LAYERS = {
    "linear": lambda: nn.Linear(40, 24),
    "gpt2_conv1d": _conv1d_gpt2,
    "conv1d": lambda: nn.Conv1d(4, 6, 3, groups=2),
    "conv2d": lambda: nn.Conv2d(4, 8, 3),
    "convT2d": lambda: nn.ConvTranspose2d(6, 4, 4, groups=2),
    "embedding": lambda: nn.Embedding(50, 12),
}
CONFIGS = {
    "nf4": qlora_kit.NF4Config(blocksize=32),
    "fp4": qlora_kit.FP4Config(double_quant=False, compute_dtype=torch.float16),
    "int8": qlora_kit.Int8WeightConfig(compute_dtype=F32),
    "int4": qlora_kit.Int4WeightConfig(group_size=32),
    "fp8": qlora_kit.FP8WeightConfig(),
}


def _quantized(layer_name, fmt):
    torch.manual_seed(0)
    float_layer = LAYERS[layer_name]()
    q = qlora_kit.quantize(nn.Sequential(float_layer), CONFIGS[fmt], filter_fn=lambda m, n: True)[0]
    assert isinstance(q, QuantizedLayer)
    return float_layer, q


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_weight_has_float_layout_compute_dtype_and_dequantized_values(layer_name, fmt):
    float_layer, q = _quantized(layer_name, fmt)
    w = q.weight
    assert isinstance(w, DequantizedWeight) and isinstance(w, torch.Tensor)
    assert w.shape == float_layer.weight.shape
    assert w.dtype == CONFIGS[fmt].compute_dtype and w.device == float_layer.weight.device
    assert not w.requires_grad
    values = w.clone()
    assert type(values) is torch.Tensor
    assert torch.equal(values, q.dequantize_weight(CONFIGS[fmt].compute_dtype))
    assert torch.equal(w.float(), values.float())
    # the values track the layer: after requantizing, the view reads the new codes
    q.set_float_weight(torch.zeros_like(float_layer.weight))
    assert torch.count_nonzero(q.weight.float()) == 0


def test_weight_in_torch_ops_is_the_dequantized_matrix():
    _, q = _quantized("linear", "int8")
    x = torch.randn(3, 40)
    assert torch.equal(torch.nn.functional.linear(x, q.weight, q.bias), q(x))
    assert torch.equal(q.weight.sum(), q.dequantize_weight(F32).sum())
    assert "DequantizedWeight(shape=(24, 40)" in repr(q.weight)


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_packed_codes_are_frozen_parameters_with_unchanged_state_dict_keys(fmt):
    _, q = _quantized("linear", fmt)
    names = dict(q.qweight.named_parameters())
    buffers = dict(q.qweight.named_buffers())  # only NF4 / FP4's 0-dim double-quant offset (FSDP2 shards no 0-dim)
    assert names and all(b.dim() == 0 and n == "offset" for n, b in buffers.items())
    assert all(not p.requires_grad for p in names.values())
    assert set(q.state_dict()) == {f"qweight.{n}" for n in [*names, *buffers]} | {"bias"}
    tensors = [*names.values(), *buffers.values()]
    assert q.qweight.nbytes() == sum(t.numel() * t.element_size() for t in tensors)
    assert q.qweight.device == q.weight.device


def test_in_out_features_on_linear_and_conv1d():
    for name in ("linear", "gpt2_conv1d"):
        _, q = _quantized(name, "nf4")
        assert (q.in_features, q.out_features) == (40, 24)


def test_optimizer_and_counts_see_only_adapters_after_add_lora():
    from qlora_kit import models
    from qlora_kit.train.build import count_params

    model = models.tiny_llama()
    n_float = sum(p.numel() for p in model.parameters())
    qlora_kit.quantize(model, qlora_kit.NF4Config())
    total, _ = count_params(model)
    assert total == n_float  # quantized layers counted at their logical size, packed codes not again
    qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    fp = qlora_kit.memory_footprint(model)
    packed = sum(m.qweight.nbytes() for m in model.modules() if isinstance(m, QuantizedLayer))
    assert fp["nf4"] == packed > 0


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_t5_runs_quantized(fmt):
    """T5 reads ``self.wo.weight.dtype`` in its feed-forward block."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    qlora_kit.quantize(model, CONFIGS[fmt])
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, QuantizedLayer)
    ids = torch.randint(1, 64, (2, 7))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


# ----- layers are matched with isinstance; a chosen layer that cannot be quantized is named in a warning


class _MyLinear(nn.Linear):
    """A user's subclass of nn.Linear."""


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    return FalconForCausalLM(cfg).eval()


def test_falcon_linear_subclasses_are_quantized_without_warnings(recwarn):
    model = _falcon()
    ids = torch.randint(0, 64, (2, 6))
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules()) - 1  # the head stays float
    assert n_linear > 0 and not any(type(m) is nn.Linear for m in model.transformer.modules())
    qlora_kit.quantize(model, qlora_kit.NF4Config())
    assert sum(isinstance(m, QuantizedLayer) for m in model.modules()) == n_linear
    assert qlora_kit.memory_footprint(model)["nf4"] > 0
    assert torch.isfinite(model(ids).logits).all()
    assert not [w for w in recwarn if "cannot quantize" in str(w.message)]


def test_user_subclass_quantized_and_unsupported_layer_named_in_warning():
    model = nn.Sequential(_MyLinear(8, 8), nn.Conv3d(2, 2, 1), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"cannot quantize 1 chosen layer.*1 \(Conv3d"):
        qlora_kit.quantize(model, qlora_kit.NF4Config(), filter_fn=lambda m, n: True)
    assert isinstance(model[0], QuantizedLayer) and isinstance(model[2], QuantizedLayer)
    assert isinstance(model[1], nn.Conv3d)


def test_linear_with_an_integer_weight_is_named_not_skipped_in_silence():
    odd = nn.Linear(8, 8)
    odd.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    model = nn.Sequential(odd, nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"0 \(Linear with a Parameter weight of dtype torch.int8"):
        qlora_kit.quantize(model, qlora_kit.Int8WeightConfig())
    assert model[0] is odd and isinstance(model[1], QuantizedLayer)


def test_qat_prepares_and_converts_subclasses():
    model = nn.Sequential(_MyLinear(16, 8))
    config = qlora_kit.Int8WeightConfig(compute_dtype=F32)
    qlora_kit.prepare_qat(model, config, filter_fn=lambda m, n: True)
    x = torch.randn(3, 16)
    fake = model(x)
    qlora_kit.convert_qat(model)
    assert isinstance(model[0], QuantizedLayer)
    torch.testing.assert_close(model(x), fake, rtol=0, atol=0)
