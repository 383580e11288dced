"""The LoRA contract on every backbone x base: one table (PEFT's contract-test idea).

Backbones (tiny, built from configs): LlamaForCausalLM, GPT2LMHeadModel, BertModel, diffusers
UNet2DModel, a DCGAN generator (ConvTranspose2d). Bases: float, NF4, int8. Checks: an adapter with
non-zero weights changes the output; disable_adapters gives the base output; merged == unmerged on float
bases (and exact unmerge on quantized ones); save/load round trip; only adapters train; a few optimizer
steps lower a loss. Interop with PEFT and diffusers' LoRA loader at the end.
"""

import importlib
import json
import warnings

import pytest
import torch

import qlora_kit
from qlora_kit import models
from qlora_kit.lora import (
    LoraConfig,
    add_lora,
    disable_adapters,
    load_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from qlora_kit.nn.lora_layers import LoraLayer


def _inputs(name: str):
    g = torch.Generator().manual_seed(1)
    if name in ("llama", "gpt2", "bert"):
        return {"input_ids": torch.randint(0, 256, (2, 7), generator=g)}
    if name == "unet":
        return {"sample": torch.randn(2, 1, 8, 8, generator=g), "timestep": torch.tensor([3, 700])}
    return {"z": torch.randn(3, 16, generator=g)}


# backbone -> (builder, target_modules, kinds of layer the targets must cover)
BACKBONES = {
    "llama": (models.tiny_llama, ("q_proj", "v_proj", "down_proj", "embed_tokens"), {"linear", "embedding"}),
    "gpt2": (models.tiny_gpt2, "all-linear", {"linear"}),
    "bert": (models.tiny_bert, "all-linear", {"linear"}),
    "unet": (
        lambda: models.tiny_unet(block_out_channels=(16, 32), attention_head_dim=8),
        r".*(to_q|to_v|to_out\.0|resnets\.0\.conv\d|time_emb_proj)",
        {"linear", "conv"},
    ),
    "dcgan": (models.dcgan_generator, ("net.0", "net.3", "net.6", "net.9"), {"conv_transpose"}),
}


def _quant_config(base: str):
    if base == "float":
        return None
    if base == "int8":
        try:
            importlib.import_module("qlora_kit.formats.int8")
        except ModuleNotFoundError:
            pytest.skip("the int8 weight format (qlora_kit/formats/int8.py) does not exist yet")
        return qlora_kit.Int8WeightConfig(compute_dtype=torch.float32)
    return qlora_kit.NF4Config(compute_dtype=torch.float32)


def _build(backbone: str, base: str):
    builder, _, _ = BACKBONES[backbone]
    model = builder()
    config = _quant_config(base)
    if config is not None:
        qlora_kit.quantize(model, config)
    return model


def _output(model, backbone: str) -> torch.Tensor:
    out = model(**_inputs(backbone))
    for key in ("logits", "sample", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


def _randomize_adapters(model, std=0.2):
    torch.manual_seed(123)
    with torch.no_grad():
        for _, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                for p in layer.parameters():
                    if p.requires_grad:
                        p.normal_(0, std)


def _adapted(backbone: str, base: str, randomize=True):
    model = _build(backbone, base)
    reference = _output(model, backbone).detach()
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=BACKBONES[backbone][1]))
    if randomize:
        _randomize_adapters(model)
    return model, reference


CASES = [(b, q) for b in BACKBONES for q in ("float", "nf4", "int8")]


@pytest.mark.parametrize("backbone,base", CASES)
def test_wraps_expected_layers_and_quantized_bases(backbone, base):
    model, _ = _adapted(backbone, base, randomize=False)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert {m.kind for m in layers} == BACKBONES[backbone][2]
    if base != "float":
        assert any(m.is_quantized for m in layers), "no adapter sits on a quantized layer"


@pytest.mark.parametrize("backbone,base", CASES)
def test_nonzero_adapter_changes_output(backbone, base):
    model, reference = _adapted(backbone, base, randomize=False)
    torch.testing.assert_close(_output(model, backbone), reference, rtol=0, atol=0)  # default init: no change
    _randomize_adapters(model)
    assert (_output(model, backbone) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("backbone,base", CASES)
def test_disable_adapters_gives_base_output(backbone, base):
    model, reference = _adapted(backbone, base)
    with disable_adapters(model):
        torch.testing.assert_close(_output(model, backbone), reference, rtol=0, atol=0)
    assert (_output(model, backbone) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("backbone,base", CASES)
def test_merge_unmerge(backbone, base):
    model, _ = _adapted(backbone, base)
    quantized = {n: {k: v.clone() for k, v in m.base_layer.qweight.state_dict().items()}
                 for n, m in model.named_modules() if isinstance(m, LoraLayer) and m.is_quantized}  # fmt: skip
    with torch.no_grad():
        unmerged = _output(model, backbone)
        if base == "float":
            report = merge_lora(model, example_inputs=_inputs(backbone))
        else:
            with pytest.warns(UserWarning, match="requantized"):
                report = merge_lora(model, example_inputs=_inputs(backbone))
        merged = _output(model, backbone)
        if base == "float":
            torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
            assert report.weight_drift == {}
        else:  # requantization moves the weights; the report says by how much
            assert set(report.weight_drift) == set(quantized) and min(report.weight_drift.values()) > 0
            assert report.output_drift is not None and report.output_drift > 0
        unmerge_lora(model)
        again = _output(model, backbone)
    torch.testing.assert_close(again, unmerged, rtol=1e-4, atol=1e-5)
    modules = dict(model.named_modules())
    for name, state in quantized.items():  # quantized bases get their original packed weights back exactly
        restored = modules[name].base_layer.qweight.state_dict()
        assert all(torch.equal(restored[k], v) for k, v in state.items()), name


@pytest.mark.parametrize("backbone,base", CASES)
def test_save_then_load_into_fresh_model(backbone, base, tmp_path):
    model, _ = _adapted(backbone, base)
    expected = _output(model, backbone).detach()
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    fresh = _build(backbone, base)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_output(fresh, backbone), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backbone,base", CASES)
def test_only_adapters_train_and_loss_decreases(backbone, base):
    model, _ = _adapted(backbone, base, randomize=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), trainable
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.manual_seed(0)
    target = torch.randn_like(_output(model, backbone))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = (_output(model, backbone) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-4, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


# ----- configs axis: the same five properties for LoraConfig options (tiny Llama x bases x configs) ----------
LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj", "embed_tokens")
CONFIGS = {
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},  # DoRA has no embedding adapters
    "dropout": {"dropout": 0.3},  # checked in train mode (dropout on) where the property allows it
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},  # float base only: PiSSA over a quantized base cannot be saved exactly
}
CONFIG_CASES = [(c, b) for c in CONFIGS for b in ("float", "nf4", "int8") if c != "pissa" or b == "float"]


def _one_layer_llama(base: str):
    model = models.tiny_llama(layers=1)
    config = _quant_config(base)
    if config is not None:
        qlora_kit.quantize(model, config)
    return model


def _out(model) -> torch.Tensor:
    return _output(model, "llama")


@pytest.mark.parametrize("name,base", CONFIG_CASES)
def test_config_contract(name, base, tmp_path):
    """The five contract properties for one LoraConfig option over one base (a one-layer Llama keeps it cheap)."""
    model = _one_layer_llama(base)
    reference = _out(model).detach()
    config = LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS[:-1] if name == "dora" else LLAMA_TARGETS,
                        **CONFIGS[name])  # fmt: skip
    add_lora(model, config)

    # 1. the initialised adapter keeps the output (PiSSA / DoRA up to rounding); a non-zero one changes it
    torch.testing.assert_close(_out(model), reference, rtol=0, atol={"pissa": 1e-4, "dora": 1e-5}.get(name, 0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    _randomize_adapters(model)
    assert (_out(model) - reference).abs().max() > 1e-3
    if name == "dropout":  # train mode drops adapter inputs at random; eval mode is deterministic
        model.train()
        assert (_out(model) - _out(model)).abs().max() > 1e-4
        model.eval()
        torch.testing.assert_close(_out(model), _out(model), rtol=0, atol=0)
    adapted = _out(model).detach()

    # 2. disable_adapters gives the base model's output (train mode with dropout: it is on the adapter path only)
    base_output = reference
    if name == "pissa":  # the base is now the residual W - s B0 A0: the adapters with B = 0 leave exactly it
        saved = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k or "lora_embedding_A" in k}
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in saved:
                    v.zero_()
        base_output = _out(model).detach()
        assert (base_output - reference).abs().max() > 1e-3  # so the check below is not the original base's
        model.load_state_dict(saved, strict=False)
    model.train(name == "dropout")
    with disable_adapters(model):
        torch.testing.assert_close(_out(model), base_output, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(_out(model), adapted, rtol=0, atol=0)

    # 3. merged == unmerged on float bases; quantized bases report the requantization drift; unmerge restores
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the requantization warning (checked in the backbone table)
        report = merge_lora(model)
        if base == "float":
            torch.testing.assert_close(_out(model), adapted, rtol=1e-4, atol=1e-5)
            assert report.output_drift < 1e-5
        else:
            assert set(report.layer_output_drift) == set(report.merged) and report.output_drift > 1e-3
        unmerge_lora(model)
        torch.testing.assert_close(_out(model), adapted, rtol=1e-4, atol=1e-5)

    # 4. save_adapter then load_adapter into a fresh model: the same outputs (PiSSA: saved as a rank-2r update
    # of the original base, PEFT's conversion, so rounding differs)
    save_adapter(model, tmp_path)
    fresh = _one_layer_llama(base)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_out(fresh), adapted, rtol=0, atol=1e-5 if name == "pissa" else 0)

    # 5. only adapter parameters require grad, and a few optimizer steps lower a loss
    assert trainable and all(".lora_" in n for n in trainable), trainable
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert name != "dora" or any("lora_magnitude_vector" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train(name == "dropout")
    target = torch.randn(adapted.shape, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = (_out(model) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-4, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ----- interoperability -----------------------------------------------------------------------------------
INTEROP = ["llama", "gpt2", "bert", "unet"]  # PEFT has no LoRA for ConvTranspose2d (the DCGAN generator)


@pytest.mark.parametrize("backbone", INTEROP)
def test_adapter_saved_here_loads_in_peft(backbone, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = _adapted(backbone, "float")
    expected = _output(model, backbone).detach()
    save_adapter(model, tmp_path)
    fresh = BACKBONES[backbone][0]()
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    got = _output(peft_model.base_model.model, backbone)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "backbone,extra",
    [("llama", {}), ("llama", {"use_dora": True}), ("llama", {"use_rslora": True}), ("gpt2", {}), ("bert", {}),
     ("unet", {}), ("llama", {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 3}})],
)  # fmt: skip
def test_peft_saved_adapter_loads_here(backbone, extra, tmp_path):
    peft = pytest.importorskip("peft")
    targets = BACKBONES[backbone][1]
    if targets == "all-linear" or extra.get("use_dora"):
        targets = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"]}.get(
            backbone, ["q_proj", "down_proj"]
        )
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False, **extra)
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(BACKBONES[backbone][0](), config)
    if extra.get("use_dora"):  # make the magnitudes differ from the weight norms
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.5)
    expected = _output(peft_model.base_model.model, backbone).detach()
    peft_model.save_pretrained(str(tmp_path))
    fresh = BACKBONES[backbone][0]()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_output(fresh, backbone), expected, rtol=0, atol=1e-5)


def test_diffusers_lora_file_loads_with_load_lora_weights(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    def unet():
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
        ).eval()  # fmt: skip

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]))
    kwargs = {"encoder_hidden_states": torch.randn(1, 3, 16, generator=g)}
    ours = unet()
    add_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]))
    _randomize_adapters(ours)
    expected = ours(*args, **kwargs).sample.detach()
    save_adapter(ours, tmp_path)  # a diffusers model: the diffusers file is written too
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    class Pipeline(StableDiffusionLoraLoaderMixin):  # the loader half of StableDiffusionPipeline
        def __init__(self, unet):
            self.unet, self.text_encoder, self.hf_device_map = unet, None, None

        @property
        def components(self):
            return {"unet": self.unet}

    pipe = Pipeline(unet())
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(pipe.unet(*args, **kwargs).sample, expected, rtol=0, atol=1e-5)


def test_saved_config_is_peft_loadable_json(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = _adapted("gpt2", "float")
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]  # lm_head is not "linear" here
    assert config["fan_in_fan_out"] is True
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert loaded.r == 4 and set(loaded.target_modules) == {"c_attn", "c_fc", "c_proj"}
