"""PEFT's get_peft_model (and TRL's SFTTrainer) on qlora-kit quantized models, compared with our add_lora."""

import warnings

import peft
import pytest
import torch

import qlora_kit
from qlora_kit import models
from qlora_kit.nn.quantized import QuantizedLayer
from qlora_kit.peft_layers import LoraConfig, QuantizedLoraLinear, linear_layer_names, register_peft_layers

F32 = torch.float32
NF4 = qlora_kit.NF4Config(blocksize=64, compute_dtype=F32)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


MODELS = {"llama": (models.tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (_gpt2, ["c_attn", "c_fc"])}


def _quantized(kind, config=NF4):
    torch.manual_seed(0)
    return qlora_kit.quantize(MODELS[kind][0]().eval(), config)


def _peft(kind, config=NF4, **kw):
    model = _quantized(kind, config)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=MODELS[kind][1], init_lora_weights=False, **kw)
    return peft.get_peft_model(model, cfg)


def _small_adapters(pm):
    """init_lora_weights=False draws B like A, a delta several times the weight; scale it to a trained size."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name:
                p.mul_(0.02)
    return pm


def _copy_into_ours(peft_model, ours):
    """Give our add_lora adapters exactly PEFT's A and B."""
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            path = name.removeprefix("base_model.model.")
            ours.get_parameter(path).data.copy_(p.data)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_get_peft_model_wraps_quantized_layers_with_outputs_equal_to_add_lora(kind):
    pm = _peft(kind)
    wrapped = [m for m in pm.modules() if isinstance(m, QuantizedLoraLinear)]
    assert wrapped and all(isinstance(m.base_layer, QuantizedLayer) for m in wrapped)
    ours = _quantized(kind)
    qlora_kit.add_lora(ours, qlora_kit.LoraConfig(r=4, alpha=8, target_modules=MODELS[kind][1]))
    _copy_into_ours(pm, ours)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, ours(input_ids=ids).logits)
        with pm.disable_adapter():
            assert torch.equal(pm(input_ids=ids).logits, _quantized(kind)(input_ids=ids).logits)


def test_training_step_moves_only_adapters_and_save_reload_is_identical(tmp_path):
    pm = _peft("llama")
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 9))
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)
    pm.eval()
    pm.save_pretrained(tmp_path)
    base = _quantized("llama")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path, config=LoraConfig.from_pretrained(tmp_path))
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        # our load_adapter reads the same directory onto a qlora-kit model
        ours = qlora_kit.load_adapter(_quantized("llama"), tmp_path)
        assert torch.equal(ours(input_ids=ids).logits, expected)


INT8 = qlora_kit.Int8WeightConfig(compute_dtype=F32)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_merge_and_unload_requantizes_and_stays_close(kind, fmt):
    config = NF4 if fmt == "nf4" else INT8
    pm = _small_adapters(_peft(kind, config))
    ids = torch.randint(0, 64, (2, 9))
    ours = _quantized(kind, config)
    qlora_kit.add_lora(ours, qlora_kit.LoraConfig(r=4, alpha=8, target_modules=MODELS[kind][1]))
    _copy_into_ours(pm, ours)
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        with pytest.warns(UserWarning, match="requantizes"):
            merged = pm.merge_and_unload()
        after = merged(input_ids=ids).logits
        base = _quantized(kind, config)(input_ids=ids).logits
    assert not any(isinstance(m, QuantizedLoraLinear) for m in merged.modules())
    n_quantized = sum(isinstance(m, QuantizedLayer) for m in _quantized(kind, config).modules())
    assert sum(isinstance(m, QuantizedLayer) for m in merged.modules()) == n_quantized
    # the same requantized weights as our merge_lora on the same adapters
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        qlora_kit.merge_lora(ours)
        assert torch.equal(ours(input_ids=ids).logits, after)
    if fmt == "int8":  # fine enough a grid that the merged model is clearly the adapted one, not the base
        assert (after - base).norm() > 4 * (after - before).norm()


def test_merge_unmerge_round_trip_is_close():
    pm = _small_adapters(_peft("llama"))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _quantized("llama")(input_ids=ids).logits
        pm.base_model.merge_adapter()
        pm.base_model.unmerge_adapter()
        with pm.disable_adapter():
            back = pm(input_ids=ids).logits
    assert (back - base).norm() / base.norm() < 0.1  # merge + unmerge requantizes twice (NF4 steps)


def test_register_on_a_plain_peft_config_and_all_linear_names():
    model = _quantized("llama")
    names = linear_layer_names(model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    cfg = register_peft_layers(peft.LoraConfig(r=2, target_modules=names))
    pm = peft.get_peft_model(model, cfg)
    assert sum(isinstance(m, QuantizedLoraLinear) for m in pm.modules()) == 7 * len(model.model.layers)
    with pytest.raises(ValueError, match="linear_layer_names"):
        LoraConfig(r=2, target_modules="all-linear")


def test_fused_kernel_path_matches_peft_forward(monkeypatch):
    """QLORA_KIT_BACKEND=triton (interpreter on the CPU): the fused kernel gives PEFT's values and gradients."""
    pm = _peft("llama", config=qlora_kit.NF4Config(blocksize=64, double_quant=False, compute_dtype=F32))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, requires_grad=True)
    ref = layer(x)
    ref.sum().backward()
    ref_grads = [x.grad.clone(), layer.lora_A["default"].weight.grad.clone()]
    x.grad = None
    layer.lora_A["default"].weight.grad = None
    monkeypatch.setenv("QLORA_KIT_BACKEND", "triton")
    calls = []
    original = QuantizedLoraLinear._fused_forward
    monkeypatch.setattr(QuantizedLoraLinear, "_fused_forward", lambda s, t: calls.append(1) or original(s, t))
    out = layer(x)
    out.sum().backward()
    assert calls and out.grad_fn is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, ref_grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_trl_sft_trainer_trains_a_qlora_kit_model(tmp_path):
    """TRL's SFTTrainer(peft_config=...) end to end on the CPU: a tiny Llama in NF4, a few steps."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    _, tokenizer = models.minilm()
    tokenizer.eos_token = tokenizer.sep_token
    model = qlora_kit.quantize(models.tiny_llama(vocab_size=len(tokenizer)), NF4)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if ".qweight." in n}
    text = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 8
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", max_length=24, bf16=False, fp16=False,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": text}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert any(isinstance(m, QuantizedLoraLinear) for m in trainer.model.modules())
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and result.global_step == 4
    assert losses[-1] < losses[0]
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in lora_before.items())  # adapters trained
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in after.items()}
    for n, p in packed.items():  # the quantized base did not move
        assert torch.equal(after[n], p)


def test_plain_peft_lora_config_trains_saves_reloads_and_merges_like_add_lora(tmp_path):
    """No qlora-kit config class, no registration call: PEFT's own LoraConfig, get_peft_model, PeftModel."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODELS["llama"][1], init_lora_weights=False)
    assert cfg._custom_modules is None
    pm = _small_adapters(peft.get_peft_model(_quantized("llama"), cfg))
    wrapped = [m for m in pm.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(wrapped) == len(MODELS["llama"][1]) * 2 and all(
        isinstance(m.base_layer, QuantizedLayer) for m in wrapped
    )
    assert not any(type(m) is peft.tuners.lora.Linear for m in pm.modules())
    ids = torch.randint(0, 64, (2, 9))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    packed = {n: p.detach().clone() for n, p in pm.named_parameters() if ".qweight." in n}
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert packed and all(torch.equal(p, packed[n]) for n, p in pm.named_parameters() if n in packed)
    pm.eval()
    ours = _quantized("llama")
    qlora_kit.add_lora(ours, qlora_kit.LoraConfig(r=4, alpha=8, target_modules=MODELS["llama"][1]))
    _copy_into_ours(pm, ours)
    pm.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_quantized("llama"), tmp_path)  # PEFT reads a plain config
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert torch.equal(pm(input_ids=ids).logits, expected)
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        with pytest.warns(UserWarning, match="requantizes"):
            merged = reloaded.merge_and_unload()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qlora_kit.merge_lora(ours)
        assert torch.equal(merged(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert sum(isinstance(m, QuantizedLayer) for m in merged.modules()) == 7 * len(merged.model.layers)


def test_plain_peft_dispatch_leaves_float_layers_to_peft():
    """The dispatch hook only registers for qlora-kit layers: a float model gets PEFT's own lora.Linear."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"])
    pm = peft.get_peft_model(models.tiny_llama().eval(), cfg)
    assert cfg._custom_modules is None
    assert any(type(m) is peft.tuners.lora.Linear for m in pm.modules())
