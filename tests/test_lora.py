"""LoRA API: configs, targeting, adapters, merge, init schemes, kbit preparation, save/load and errors."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import qlora_kit
from qlora_kit import models
from qlora_kit.lora import (
    LoraConfig,
    add_lora,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_lora,
    prepare_for_kbit_training,
    save_adapter,
    set_adapter,
    unmerge_lora,
)
from qlora_kit.nn.lora_layers import LoraLayer
from qlora_kit.nn.quantized import QuantizedLayer, QuantLinear


def _randomize(model, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                for p in m.parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))


def _logits(model):
    return model(IDS).logits


# ----- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"), ({"r": -2}, "r"), ({"r": 2.5}, "r"), ({"r": True}, "r"),
        ({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"alpha": "16"}, "alpha"),
        ({"dropout": -0.1}, "dropout"), ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"), ({"target_modules": ""}, "target_modules"),
        ({"target_modules": "q_proj("}, "target_modules"), ({"target_modules": 5}, "target_modules"),
        ({"target_modules": ["q", ""]}, "target_modules"),
        ({"exclude_modules": "all-linear("}, "exclude_modules"), ({"exclude_modules": []}, "exclude_modules"),
        ({"use_dora": "yes"}, "use_dora"), ({"use_rslora": 1}, "use_rslora"),
        ({"init": "xavier"}, "init"),
    ],
)  # fmt: skip
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        LoraConfig(**kwargs)


def test_config_is_frozen_hashable_and_normalised():
    c = LoraConfig(r=8, alpha=32, target_modules=["q_proj", "v_proj"], exclude_modules={"b", "a"})
    assert c.target_modules == ("q_proj", "v_proj") and c.exclude_modules == ("a", "b")
    assert c.scale == 4.0 and LoraConfig(r=16, alpha=8, use_rslora=True).scale == 2.0
    hash(c)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.r = 4


# ----- targeting -------------------------------------------------------------------------------------------
def test_all_linear_skips_output_head():
    model = add_lora(models.tiny_llama(), LoraConfig(r=2))
    names = set(_lora_layers(model))
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names
    assert all(m.kind == "linear" for m in _lora_layers(model).values())
    gpt2 = add_lora(models.tiny_gpt2(), LoraConfig(r=2))
    assert "lm_head" not in _lora_layers(gpt2) and "transformer.h.0.attn.c_attn" in _lora_layers(gpt2)


def test_names_regex_and_exclude():
    m = add_lora(models.tiny_llama(), LoraConfig(r=2, target_modules=r"model\.layers\.1\..*_proj"))
    assert set(_lora_layers(m)) and all(n.startswith("model.layers.1.") for n in _lora_layers(m))
    m = add_lora(
        models.tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "k_proj"], exclude_modules=r".*\.0\..*")
    )
    assert set(_lora_layers(m)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    m = add_lora(models.tiny_llama(), LoraConfig(r=2, target_modules="all-linear", exclude_modules=["mlp.up_proj"]))
    assert not any(n.endswith("up_proj") for n in _lora_layers(m))


def test_targeting_errors():
    with pytest.raises(ValueError, match="matched no layer"):
        add_lora(models.tiny_llama(), LoraConfig(target_modules=["no_such_layer"]))
    with pytest.raises(ValueError, match="LlamaRMSNorm.*cannot adapt"):
        add_lora(models.tiny_llama(), LoraConfig(target_modules=["input_layernorm"]))
    model = add_lora(models.tiny_llama(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_lora(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="adapter_name"):
        add_lora(model, LoraConfig(r=2), adapter_name="a.b")
    with pytest.raises(TypeError, match="LoraConfig"):
        add_lora(model, {"r": 2})


def test_wrapper_forwards_base_attributes():
    model = add_lora(models.tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    emb = model.model.embed_tokens
    assert isinstance(emb, LoraLayer) and emb.weight is emb.base_layer.weight
    assert model.model.layers[0].self_attn.q_proj.in_features == 64


# ----- every layer type: merge formula, DoRA, output_size --------------------------------------------------
class AllKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.lin = nn.Linear(6, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=2, dilation=2)
        self.c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.ct = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.c3 = nn.Conv3d(3, 2, (1, 3, 3))

    def forward(self, ids):
        h = self.lin(self.emb(ids))  # (B, T, 8)
        h = self.c1(h.transpose(1, 2))  # (B, 8, T)
        img = h.reshape(h.shape[0], 2, 4, -1)  # (B, 2, 4, T)
        img = self.c2(img)
        img = self.ct(img)
        return self.c3(img.unsqueeze(2))


def test_every_layer_kind_merges_exactly():
    torch.manual_seed(0)
    model = AllKinds()
    ids = torch.randint(0, 11, (2, 12))
    base = model(ids).detach()
    add_lora(model, LoraConfig(r=2, alpha=3, target_modules=["emb", "lin", "c1", "c2", "ct", "c3"]))
    assert {m.kind for m in _lora_layers(model).values()} == {"embedding", "linear", "conv", "conv_transpose"}
    torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    _randomize(model)
    out = model(ids).detach()
    assert (out - base).abs().max() > 1e-2
    merge_lora(model)
    torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-5)


def test_conv_transpose_output_size_argument():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    x = torch.randn(1, 3, 5, 5)
    holder = nn.Sequential(layer)
    add_lora(holder, LoraConfig(r=2, target_modules=["0"]))
    _randomize(holder)
    y = holder[0](x, output_size=[10, 10])
    assert y.shape == (1, 2, 10, 10)
    merge_lora(holder)
    torch.testing.assert_close(holder[0](x, output_size=[10, 10]), y, rtol=1e-5, atol=1e-5)


def test_grouped_conv_rules():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="divisible by groups"):
        add_lora(net, LoraConfig(r=3, target_modules=["0"]))
    add_lora(net, LoraConfig(r=4, target_modules=["0"]))
    _randomize(net)
    net(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="grouped convolution"):
        merge_lora(net)


def test_dora_starts_at_base_and_merges():
    torch.manual_seed(0)
    model = AllKinds()
    ids = torch.randint(0, 11, (2, 12))
    base = model(ids).detach()
    add_lora(model, LoraConfig(r=2, target_modules=["lin", "c1", "c2"], use_dora=True))
    torch.testing.assert_close(model(ids), base, rtol=1e-5, atol=1e-5)  # m = ||W||, B = 0: unchanged
    assert model.lin.lora_magnitude_vector["default"].weight.shape == (8,)
    assert model.c2.lora_magnitude_vector["default"].weight.shape == (1, 4, 1, 1)  # PEFT's conv layout
    _randomize(model, std=0.1)
    with torch.no_grad():
        model.lin.lora_magnitude_vector["default"].weight.add_(1.0)
    out = model(ids).detach()
    merge_lora(model)
    torch.testing.assert_close(model(ids), out, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="DoRA supports"):
        add_lora(AllKinds(), LoraConfig(r=2, target_modules=["emb"], use_dora=True))


# ----- several adapters --------------------------------------------------------------------------------------
def test_named_adapters_switch_and_train_separately():
    model = models.tiny_llama()
    base = _logits(model).detach()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(model, seed=1)
    out_a = _logits(model).detach()
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="other")
    torch.testing.assert_close(_logits(model), out_a, rtol=0, atol=0)  # added inactive
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    set_adapter(model, "other")
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)  # "other" still has B = 0
    _randomize(model, seed=2)
    out_b = _logits(model).detach()
    assert all(".other" in n for n, p in model.named_parameters() if p.requires_grad)
    set_adapter(model, ["default", "other"])
    both = _logits(model).detach()
    assert (both - out_a).abs().max() > 1e-4 and (both - out_b).abs().max() > 1e-4
    set_adapter(model, "default")
    torch.testing.assert_close(_logits(model), out_a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        set_adapter(model, "missing")
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        set_adapter(model, "other")
    unmerge_lora(model)
    delete_adapter(model, "other")
    assert all(set(m.r) == {"default"} for m in _lora_layers(model).values())
    assert not isinstance(model.model.layers[0].self_attn.v_proj, LoraLayer)  # unwrapped again


def test_disable_adapters_on_merged_model_remerges():
    model = add_lora(models.tiny_llama(), LoraConfig(r=2))
    base_model = models.tiny_llama()
    _randomize(model)
    out = _logits(model).detach()
    merge_lora(model)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model), _logits(base_model), rtol=1e-5, atol=1e-5)
    assert all(m.merged_adapters for m in _lora_layers(model).values())
    torch.testing.assert_close(_logits(model), out, rtol=1e-5, atol=1e-5)


def test_merge_refuses_tied_weights():
    model = add_lora(models.tiny_gpt2(), LoraConfig(r=2, target_modules=["wte", "c_attn"]))
    _randomize(model)
    with pytest.raises(ValueError, match="tied weights"):
        merge_lora(model)


# ----- merge drift ----------------------------------------------------------------------------------------
def _independent_drift(layer, x_fn, merge):
    """||y_merged - y|| / ||y|| of one layer on an input of our own (not merge_lora's probe)."""
    x = x_fn()
    before = layer(x).double()
    merge()
    return ((layer(x).double() - before).norm() / before.norm()).item()


@pytest.mark.parametrize("base", ["float", "nf4", "int8"])
def test_merge_reports_layer_output_drift_without_example_inputs(base):
    model = models.tiny_llama(layers=1)
    if base != "float":
        config = qlora_kit.NF4Config if base == "nf4" else qlora_kit.Int8WeightConfig
        qlora_kit.quantize(model, config(compute_dtype=torch.float32))
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"]))
    _randomize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = merge_lora(model)
    names = set(_lora_layers(model))
    assert set(report.layer_output_drift) == names == set(report.merged)
    assert report.output_drift == max(report.layer_output_drift.values())
    if base == "float":  # rounding only
        assert report.output_drift < 1e-6 and report.weight_drift == {}
    else:  # requantization moved every quantized layer's output; the probe's number matches an independent input
        unmerge_lora(model)
        for name, layer in _lora_layers(model).items():
            if not layer.is_quantized:
                continue
            fan_in = layer._dims()[0]
            own = _independent_drift(layer, lambda n=fan_in: torch.randn(64, n) * 3, lambda la=layer: la.merge())
            assert report.layer_output_drift[name] > 1e-3, name
            assert 0.5 < report.layer_output_drift[name] / own < 2, (name, report.layer_output_drift[name], own)


def test_merge_drift_with_example_inputs_and_without_requantize():
    model = qlora_kit.quantize(models.tiny_llama(layers=1), qlora_kit.NF4Config(compute_dtype=torch.float32))
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.2, target_modules=["q_proj", "down_proj"]))
    _randomize(model)
    model.train()  # merge_lora measures in eval mode: dropout does not count as drift
    expected = _logits(model.eval()).detach()
    model.train()
    with pytest.warns(UserWarning, match=r"outputs moved by up to .*% on the model's example inputs"):
        report = merge_lora(model, example_inputs=IDS)
    assert model.training and all(m.training for m in _lora_layers(model).values())
    got = _logits(model.eval()).detach()
    assert report.output_drift == pytest.approx(((got - expected).norm() / expected.norm()).item(), rel=1e-4)
    assert report.output_drift > 1e-3
    unmerge_lora(model)
    report = merge_lora(model, requantize=False)  # float merge of the fp32 copy: rounding only
    assert report.output_drift < 1e-6 and report.max_weight_drift < 1e-6


def test_add_lora_to_eval_model_keeps_adapter_dropout_off():
    for base in ("float", "nf4"):  # quantize() builds new layers (in train mode) inside the eval model
        model = models.tiny_llama(layers=1)
        if base == "nf4":
            qlora_kit.quantize(model, qlora_kit.NF4Config(compute_dtype=torch.float32))
        add_lora(model, LoraConfig(r=4, dropout=0.5, target_modules=["q_proj"]))
        _randomize(model)
        assert not any(m.training for la in _lora_layers(model).values() for m in la.modules()), base
        torch.testing.assert_close(_logits(model), _logits(model), rtol=0, atol=0)


# ----- quantized bases ------------------------------------------------------------------------------------
def test_merge_without_requantize_keeps_float_and_unmerges_to_quantized():
    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config(compute_dtype=torch.float32))
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(model)
    out = _logits(model).detach()
    report = merge_lora(model, requantize=False)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer) is nn.Linear and report.max_weight_drift < 1e-6
    torch.testing.assert_close(_logits(model), out, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    assert isinstance(q.base_layer, QuantLinear)
    torch.testing.assert_close(_logits(model), out, rtol=0, atol=0)


def test_qlora_bf16_compute_trains_fp32_adapters():
    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config())  # compute in bf16
    prepare_for_kbit_training(model)
    assert model.is_gradient_checkpointing and not any(p.requires_grad for p in model.parameters())
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_prepare_for_kbit_training_norms_and_input_grads():
    model = models.tiny_llama().to(torch.bfloat16)
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings()(IDS).requires_grad


# ----- initialisation ----------------------------------------------------------------------------------------
def test_gaussian_init():
    model = add_lora(models.tiny_llama(hidden_size=128), LoraConfig(r=8, init="gaussian", target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight
    assert abs(a.std().item() - 1 / 8) < 0.02 and torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_pissa_keeps_output_and_puts_top_singular_space_in_adapter():
    model = models.tiny_llama()
    base = _logits(model).detach()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    add_lora(model, LoraConfig(r=4, alpha=4, init="pissa", target_modules=["q_proj"]))
    torch.testing.assert_close(_logits(model), base, rtol=1e-4, atol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    top = torch.linalg.svdvals(w)[:4]
    adapter_svals = torch.linalg.svdvals(layer.delta_weight("default"))
    torch.testing.assert_close(adapter_svals[:4], top, rtol=1e-4, atol=1e-5)
    assert adapter_svals[4:].max() < 1e-4 * top[0]  # rank 4


def test_loftq_init_float_base_then_quantize():
    model = models.tiny_llama()
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    add_lora(model, LoraConfig(r=8, alpha=8, init="loftq", target_modules=["down_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    approx = layer.base_layer.weight + layer.delta_weight("default")
    from qlora_kit.functional import dequantize_nf4, quantize_nf4

    plain = dequantize_nf4(*quantize_nf4(w, 64), w.shape, 64, torch.float32)
    assert (approx - w).norm() < 0.9 * (plain - w).norm()  # LoftQ beats plain NF4 + zero adapter
    qlora_kit.quantize(model, qlora_kit.NF4Config(blocksize=64, double_quant=False, compute_dtype=torch.float32))
    assert isinstance(layer.base_layer, QuantizedLayer)
    torch.testing.assert_close(
        layer.base_layer.dequantize_weight(torch.float32), approx - layer.delta_weight("default")
    )
    assert not any(isinstance(m, QuantizedLayer) for n, m in model.named_modules() if ".lora_" in n)


def test_loftq_refuses_quantized_base():
    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config())
    with pytest.raises(ValueError, match="float weights"):
        add_lora(model, LoraConfig(init="loftq"))


def test_dropout_only_in_training():
    model = add_lora(models.tiny_llama(), LoraConfig(r=4, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    model.eval()
    torch.testing.assert_close(_logits(model), _logits(model), rtol=0, atol=0)
    model.train()
    assert (_logits(model) - _logits(model)).abs().max() > 0


# ----- the fused path ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["float", "nf4", "gpt2"])
def test_layers_use_fused_kernel_and_match_reference(base, monkeypatch):
    """QLORA_KIT_BACKEND=triton runs the fused kernel (interpreter on CPU): same values and gradients."""
    kernels = pytest.importorskip("qlora_kit.kernels.lora")
    model = models.tiny_gpt2(layers=1) if base == "gpt2" else models.tiny_llama(layers=1)
    if base == "nf4":
        qlora_kit.quantize(model, qlora_kit.NF4Config(compute_dtype=torch.float32))
    add_lora(
        model,
        LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"] if base == "gpt2" else ["q_proj", "down_proj"]),
    )
    _randomize(model)

    def run():
        model.zero_grad()
        out = model(IDS, labels=IDS)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_out, ref_grads = run()
    calls = []
    apply = kernels.lora_forward  # (x, x_d, A, B, bias, base, scale): the fused forward of every caller
    monkeypatch.setattr(kernels, "lora_forward", lambda *a: calls.append(a[-2]) or apply(*a))
    monkeypatch.setenv("QLORA_KIT_BACKEND", "triton")
    out, grads = run()
    assert len(calls) == 2 and all(isinstance(c, kernels.Packed4bit) == (base == "nf4") for c in calls)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-6)


@pytest.mark.cuda
def test_qlora_fused_bf16_matches_unfused_on_gpu():
    model = qlora_kit.quantize(models.tiny_llama(hidden_size=128), qlora_kit.NF4Config()).cuda()
    add_lora(model, LoraConfig(r=8, alpha=16))
    _randomize(model, std=0.05)
    ids = IDS.cuda()

    def run(fuse):
        for m in _lora_layers(model).values():
            m.fuse = fuse
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.float(), [p.grad.float() for p in model.parameters() if p.requires_grad]

    fused_out, fused_grads = run(True)
    ref_out, ref_grads = run(False)
    torch.testing.assert_close(fused_out, ref_out, rtol=0.05, atol=0.05)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


# ----- save / load ----------------------------------------------------------------------------------------
def test_saved_files_use_peft_keys_and_leave_no_temp_files(tmp_path):
    model = add_lora(models.tiny_llama(), LoraConfig(r=2, alpha=4, target_modules=["q_proj", "embed_tokens"]))
    save_adapter(model, tmp_path)
    saved = ["adapter_config.json", "adapter_model.safetensors", "qlora-kit-manifest.json"]
    assert sorted(os.listdir(tmp_path)) == saved
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["embed_tokens", "q_proj"] and config["lora_alpha"] == 4
    save_adapter(model, tmp_path)  # overwriting works and stays clean
    assert sorted(os.listdir(tmp_path)) == saved
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_saved_target_spec_is_exact_when_names_are_ambiguous(tmp_path):
    model = add_lora(models.tiny_llama(), LoraConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.0.self_attn.q_proj"
    ]


def test_load_into_quantized_model_and_frozen(tmp_path):
    model = add_lora(models.tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(model)
    save_adapter(model, tmp_path)
    qmodel = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config(compute_dtype=torch.float32))
    load_adapter(qmodel, tmp_path, adapter_name="x", is_trainable=False)
    layer = qmodel.model.layers[0].self_attn.q_proj
    assert layer.is_quantized and layer.active_adapters == ["x"]
    torch.testing.assert_close(
        layer.lora_B["x"].weight, model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    )
    assert not any(p.requires_grad for p in qmodel.parameters())


def _train_a_little(model, std=0.05, seed=3):
    """Move every trainable adapter tensor away from its initial value (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


PISSA_TARGETS = ["q_proj", "down_proj", "embed_tokens"]


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_adapter_is_saved_for_the_original_base(rslora, tmp_path):
    """PiSSA rewrote the base into a residual: the saved adapter is PEFT's rank-2r conversion, exact on the
    original float model here and in peft.PeftModel.from_pretrained (<= 1e-5 in fp32)."""
    peft = pytest.importorskip("peft")
    model = models.tiny_llama(layers=1)
    add_lora(model, LoraConfig(r=4, alpha=8, init="pissa", use_rslora=rslora, target_modules=PISSA_TARGETS))
    layer = model.model.layers[0].self_attn.q_proj
    a0, b0 = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    _train_a_little(model)
    expected = _logits(model).detach()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * 2**0.5 if rslora else 16)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["init_lora_weights"] is True
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(state[f"{key}.lora_A.weight"][4:], a0, rtol=0, atol=0)  # A' = [A; A0]
    torch.testing.assert_close(state[f"{key}.lora_B.weight"][:, 4:], -b0, rtol=0, atol=0)  # B' = [B, -B0]
    assert state["base_model.model.model.embed_tokens.lora_embedding_A"].shape[0] == 8

    fresh = models.tiny_llama(layers=1)
    assert (_logits(fresh) - expected).abs().max() > 1e-2  # the training step moved the output
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=1e-5)
    peft_model = peft.PeftModel.from_pretrained(models.tiny_llama(layers=1), str(tmp_path))
    torch.testing.assert_close(peft_model.base_model.model(IDS).logits, expected, rtol=0, atol=1e-5)
    merged = add_lora(models.tiny_llama(layers=1), LoraConfig(r=4, alpha=8, init="pissa", use_rslora=rslora,
                                                      target_modules=PISSA_TARGETS[:2]))  # fmt: skip
    merge_lora(merged)  # a merged PiSSA adapter is saved the same way (the base holds W_res + s B A)
    save_adapter(merged, tmp_path / "merged")
    plain = load_adapter(models.tiny_llama(layers=1), tmp_path / "merged")
    torch.testing.assert_close(_logits(plain), _logits(merged), rtol=0, atol=1e-5)


def test_adapter_on_a_pissa_residual_is_saved_for_the_original_base(tmp_path):
    model = models.tiny_llama(layers=1)
    add_lora(model, LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj"]))
    add_lora(model, LoraConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"]), adapter_name="other")
    set_adapter(model, "other")
    _train_a_little(model, std=0.1)
    expected = _logits(model).detach()  # the residual base + "other"
    save_adapter(model, tmp_path, adapter_name="other")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    q_projs = {"model.layers.0.self_attn.q_proj": 6}  # 2 + PiSSA's 4
    assert config["r"] == 2 and config["rank_pattern"] == q_projs and config["alpha_pattern"] == {k: 9 for k in q_projs}
    fresh = load_adapter(models.tiny_llama(layers=1), tmp_path)
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(models.tiny_llama(layers=1), str(tmp_path))
    torch.testing.assert_close(peft_model.base_model.model(IDS).logits, expected, rtol=0, atol=1e-5)


def test_pissa_over_quantized_base_refuses_to_save(tmp_path):
    nf4 = qlora_kit.NF4Config(compute_dtype=torch.float32)
    quantized_then_pissa = add_lora(qlora_kit.quantize(models.tiny_llama(), nf4),
                                    LoraConfig(r=4, init="pissa", target_modules=["q_proj"]))  # fmt: skip
    pissa_then_quantized = qlora_kit.quantize(
        add_lora(models.tiny_llama(), LoraConfig(r=4, init="pissa", target_modules=["q_proj"])), nf4
    )
    for model in (quantized_then_pissa, pissa_then_quantized):
        with pytest.raises(ValueError, match="quantized PiSSA residual.*init='loftq'"):
            save_adapter(model, tmp_path)
        assert not os.listdir(tmp_path)  # nothing half-written
    save_adapter(pissa_then_quantized, tmp_path, as_trained=True)  # the tensors as trained, for this base only
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    state = load_file(tmp_path / "adapter_model.safetensors")
    layer = pissa_then_quantized.model.layers[0].self_attn.q_proj
    assert torch.equal(
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], layer.lora_A["default"].weight
    )


def test_loftq_adapter_saves_only_over_its_nf4_base(tmp_path):
    model = add_lora(models.tiny_gpt2(), LoraConfig(r=4, alpha=8, init="loftq", target_modules=["c_attn", "c_fc"]))
    with pytest.raises(ValueError, match=r"init='loftq'.*NF4Config\(blocksize=64\)"):
        save_adapter(model, tmp_path)  # float base: it holds nf4(W), not W
    nf4 = qlora_kit.NF4Config(blocksize=64, compute_dtype=torch.float32)
    qlora_kit.quantize(model, nf4)
    _train_a_little(model)
    expected = model(IDS).logits.detach()
    save_adapter(model, tmp_path)
    fresh = load_adapter(qlora_kit.quantize(models.tiny_gpt2(), nf4), tmp_path)
    torch.testing.assert_close(fresh(IDS).logits, expected, rtol=0, atol=0)
    other = add_lora(models.tiny_gpt2(), LoraConfig(r=4, init="loftq", target_modules=["c_attn"]))
    qlora_kit.quantize(other, qlora_kit.NF4Config(blocksize=128))
    with pytest.raises(ValueError, match="blocksize 64"):
        save_adapter(other, tmp_path / "b128")


def test_load_errors(tmp_path):
    model = add_lora(models.tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(models.tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        save_adapter(model, tmp_path, adapter_name="nope")
    save_adapter(model, tmp_path)
    os.remove(tmp_path / "qlora-kit-manifest.json")  # edited by hand below: no manifest, as PEFT saves it
    with pytest.raises(ValueError, match="lacks"):
        load_adapter(models.tiny_gpt2(), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(models.tiny_llama(hidden_size=32), tmp_path)
    with pytest.raises(ValueError, match="already has an adapter"):
        load_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LORA"):
        load_adapter(models.tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "adapter_model.safetensors")
    save_file({**state, "base_model.model.model.norm.modules_to_save.weight": torch.zeros(64)},
              tmp_path / "adapter_model.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match="modules_to_save"):
        load_adapter(models.tiny_llama(), tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(models.tiny_llama(), tmp_path)


def test_import_does_not_pull_triton_or_diffusers():
    code = (
        "import sys, qlora_kit, qlora_kit.lora, qlora_kit.nn.lora_layers;"
        "bad = [m for m in ('triton', 'diffusers', 'bitsandbytes', 'peft') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
