"""load_adapter reads LoRA files written by the real diffusers (StableDiffusionPipeline.save_lora_weights).

The reference is diffusers' own loader on the same file (UNet2DConditionModel.load_lora_adapter,
StableDiffusionPipeline.load_lora_into_text_encoder); on a float base the outputs are equal, bit for bit.
"""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import qlora_kit
from qlora_kit.hf_diffusers import DIFFUSERS_WEIGHTS_NAME

diffusers = pytest.importorskip("diffusers")
SD = diffusers.StableDiffusionPipeline
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # Linear attention layers and a Conv2d


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16)  # fmt: skip
    return CLIPTextModel(cfg).eval()


def _adapted(model, **lora):
    """diffusers' own way of adding a LoRA (add_adapter with a peft.LoraConfig), with non-zero B."""
    cfg = LoraConfig(init_lora_weights=False, **lora)
    if hasattr(model, "add_adapter") and isinstance(model, diffusers.ModelMixin):
        model.add_adapter(cfg)
    else:
        from peft import inject_adapter_in_model

        model = inject_adapter_in_model(cfg, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    return model, cfg


def _unet_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7]), torch.randn(2, 5, 16, generator=g)


def _save(directory, unet_cfg=None, unet=None, te=None, te_cfg=None, metadata=True):
    kw = {}
    if unet is not None:
        kw["unet_lora_layers"] = get_peft_model_state_dict(unet)
        kw["unet_lora_adapter_metadata"] = unet_cfg.to_dict() if metadata else None
    if te is not None:
        kw["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
        kw["text_encoder_lora_adapter_metadata"] = te_cfg.to_dict() if metadata else None
    SD.save_lora_weights(directory, **kw)
    assert not (directory / "adapter_config.json").exists()


def _diffusers_unet(directory):
    unet = _unet()
    unet.load_lora_adapter(directory, prefix="unet", weight_name=DIFFUSERS_WEIGHTS_NAME)
    return unet


@pytest.mark.parametrize("metadata", [True, False], ids=["with-metadata", "alpha-is-rank"])
def test_unet_lora_written_by_diffusers_loads_with_diffusers_outputs(tmp_path, metadata):
    """lora_alpha=8 with r=4: with the metadata the scale is 2; without it diffusers loads scale 1, as we must."""
    trained, cfg = _adapted(_unet(), r=4, lora_alpha=8, target_modules=UNET_TARGETS)
    _save(tmp_path, cfg, unet=trained, metadata=metadata)
    theirs = _diffusers_unet(tmp_path)
    ours = qlora_kit.load_adapter(_unet(), tmp_path)
    x, t, e = _unet_inputs()
    with torch.no_grad():
        expected = theirs(x, t, e).sample
        assert not torch.equal(expected, _unet()(x, t, e).sample)
        assert torch.equal(ours(x, t, e).sample, expected)
        assert torch.equal(expected, trained(x, t, e).sample) == metadata  # no metadata: diffusers' scale 1
    n_lora = sum(1 for _, layer in qlora_kit.lora.lora_layers(ours))
    assert n_lora == sum(1 for k in get_peft_model_state_dict(trained) if k.endswith("lora_A.weight"))


def test_each_component_of_a_pipeline_file_loads_its_own_part(tmp_path):
    """One file with unet. and text_encoder. keys: a CLIP text encoder takes the text_encoder part."""
    unet, unet_cfg = _adapted(_unet(), r=4, lora_alpha=4, target_modules=["to_q", "to_v"])
    te, te_cfg = _adapted(_text_encoder(), r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _save(tmp_path, unet_cfg, unet=unet, te=te, te_cfg=te_cfg)
    state, alphas, meta = SD.lora_state_dict(
        str(tmp_path), weight_name=DIFFUSERS_WEIGHTS_NAME, return_lora_metadata=True
    )
    theirs = _text_encoder()
    SD.load_lora_into_text_encoder(state, alphas, theirs, prefix="text_encoder", metadata=meta)
    ours = qlora_kit.load_adapter(_text_encoder(), tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
        assert not torch.equal(expected, _text_encoder()(input_ids=ids).last_hidden_state)
        assert torch.equal(ours(input_ids=ids).last_hidden_state, expected)
        x, t, e = _unet_inputs()
        assert torch.equal(
            qlora_kit.load_adapter(_unet(), tmp_path)(x, t, e).sample, _diffusers_unet(tmp_path)(x, t, e).sample
        )


def test_quantized_unet_takes_the_diffusers_lora(tmp_path):
    """The same file onto an NF4 UNet: the adapters are the file's tensors and they move the output."""
    trained, cfg = _adapted(_unet(), r=4, lora_alpha=8, target_modules=UNET_TARGETS)
    _save(tmp_path, cfg, unet=trained)
    nf4 = qlora_kit.NF4Config(blocksize=64, compute_dtype=torch.float32)
    ours = qlora_kit.load_adapter(qlora_kit.quantize(_unet(), nf4), tmp_path)
    reference = get_peft_model_state_dict(trained)
    params = dict(ours.named_parameters())
    for key, value in reference.items():
        assert torch.equal(params[key.replace(".weight", ".default.weight")], value)
    x, t, e = _unet_inputs()
    with torch.no_grad():
        base = qlora_kit.quantize(_unet(), nf4)(x, t, e).sample
        assert not torch.equal(ours(x, t, e).sample, base)


def test_other_layouts_and_components_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    kohya = tmp_path / "kohya"
    kohya.mkdir()
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              kohya / DIFFUSERS_WEIGHTS_NAME)  # fmt: skip
    with pytest.raises(ValueError, match="kohya / A1111 keys"):
        qlora_kit.load_adapter(_unet(), kohya)
    te_only = tmp_path / "te"
    te, te_cfg = _adapted(_text_encoder(), r=2, lora_alpha=2, target_modules=["q_proj"])
    _save(te_only, te=te, te_cfg=te_cfg)
    with pytest.raises(ValueError, match=r"\['text_encoder'\], none for 'unet'"):
        qlora_kit.load_adapter(_unet(), te_only)
    bias = tmp_path / "bias"
    unet, cfg = _adapted(_unet(), r=2, lora_alpha=2, target_modules=["to_q"], lora_bias=True)
    _save(bias, cfg, unet=unet)
    assert cfg.lora_bias and any(k.endswith("lora_B.bias") for k in get_peft_model_state_dict(unet))
    with pytest.raises(ValueError, match="lora_bias=True"):
        qlora_kit.load_adapter(_unet(), bias)
