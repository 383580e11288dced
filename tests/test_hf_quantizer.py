"""from_pretrained(quantization_config=qlora_kit.hf.QuantizationConfig(...)) across transformers architectures.

Each model is built from a tiny config and saved with save_pretrained to a temporary directory (no hub).
Checked per architecture and format (NF4, int8): the layers quantized equal those transformers + bitsandbytes
quantize (bitsandbytes matches exact nn.Linear only, so Falcon's FalconLinear layers are the one documented
difference: we quantize them, bitsandbytes leaves them float); NF4 without double quantization holds
bitsandbytes' bytes and absmax exactly; forward, generate, a QLoRA step through peft.get_peft_model, and
save_pretrained / from_pretrained (no arguments) bit-identical.
"""

import json

import peft
import pytest
import torch
import transformers as tf

import qlora_kit
import qlora_kit.hf
from qlora_kit.nn.quantized import QuantizedLayer

F32 = torch.float32
CONFIGS = {
    "nf4": qlora_kit.NF4Config(blocksize=64, double_quant=False, compute_dtype=F32),
    "int8": qlora_kit.Int8WeightConfig(compute_dtype=F32),
}
V, H = 64, 64
_DEC = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _ids():
    return torch.randint(3, V, (2, 7))


def _lm(ids):
    return {"input_ids": ids, "labels": ids}


ARCHS = {
    "gpt2": (
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=H, n_layer=2, n_head=4)),
        _lm,
    ),
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DEC, num_key_value_heads=2)), _lm),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_DEC, num_key_value_heads=2)), _lm),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DEC, num_key_value_heads=2)), _lm),
    "phi3": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_DEC, pad_token_id=0, bos_token_id=1, eos_token_id=2)), _lm),
    "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_DEC, num_key_value_heads=1, head_dim=16)), _lm),
    "opt": (
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=V,
                hidden_size=H,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=H,
                max_position_embeddings=64,
            )  # fmt: skip
        ),
        _lm,
    ),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=H, n_layer=2, n_head=4)), _lm),
    "falcon": (
        lambda: tf.FalconForCausalLM(
            tf.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4)
        ),
        _lm,
    ),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_DEC)), _lm),
    "bert": (
        lambda: tf.BertForSequenceClassification(tf.BertConfig(**_DEC, num_labels=3)),
        lambda ids: {"input_ids": ids, "labels": torch.tensor([0, 2])},
    ),
    "t5": (
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)
        ),
        lambda ids: {"input_ids": ids, "labels": ids},
    ),
    "vit": (
        lambda: tf.ViTForImageClassification(
            tf.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=H,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                num_labels=3,
            )  # fmt: skip
        ),
        lambda ids: {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])},
    ),
    "whisper": (
        lambda: tf.WhisperForConditionalGeneration(
            tf.WhisperConfig(
                vocab_size=V,
                d_model=H,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                num_mel_bins=16,
                max_source_positions=16,
                max_target_positions=32,
                decoder_start_token_id=1,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                suppress_tokens=[],
                begin_suppress_tokens=[],
            )  # fmt: skip
        ),
        lambda ids: {"input_features": torch.randn(2, 16, 32), "labels": ids},
    ),
}
GENERATES = {
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "phi3",
    "gemma",
    "opt",
    "bloom",
    "falcon",
    "gpt_neox",
    "t5",
    "whisper",
}
FAST = {"gpt2", "llama", "t5"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> directory of a float checkpoint written by save_pretrained (built once per module)."""
    out = {}

    def get(arch):
        if arch not in out:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(arch)
            ARCHS[arch][0]().save_pretrained(path)
            out[arch] = path
        return out[arch]

    return get


def _load(arch, path, config=None):
    cls = type(ARCHS[arch][0]()) if config is None else None
    cls = cls or tf.AutoConfig.from_pretrained(path).architectures[0]
    cls = getattr(tf, cls) if isinstance(cls, str) else cls
    kwargs = {} if config is None else {"quantization_config": qlora_kit.hf.QuantizationConfig(config)}
    return cls.from_pretrained(path, **kwargs).eval()


def _quantized_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _bnb_layers(arch, path):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=F32
    )
    cls = getattr(tf, tf.AutoConfig.from_pretrained(path).architectures[0])
    model = cls.from_pretrained(path, quantization_config=cfg, device_map="cpu")
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _check_arch(arch, fmt, checkpoints, tmp_path):
    path = checkpoints(arch)
    model = _load(arch, path, CONFIGS[fmt])
    names = _quantized_names(model)
    assert names, arch
    assert model.config.quantization_config.quant_method == "qlora_kit"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".qweight." in n)
    if fmt == "nf4":  # the same layers as transformers + bitsandbytes, holding the same bytes
        theirs = _bnb_layers(arch, path)
        if arch == "falcon":  # bitsandbytes matches exact nn.Linear and leaves FalconLinear float
            assert set(theirs) <= names
            assert all(type(model.get_submodule(n)).__name__ == "QuantLinear" for n in names - set(theirs))
        else:
            assert names == set(theirs), (arch, sorted(names ^ set(theirs))[:4])
        for n, layer in theirs.items():
            q = model.get_submodule(n).qweight
            assert torch.equal(q.packed.flatten(), layer.weight.data.flatten()), n
            assert torch.equal(q.absmax, layer.weight.quant_state.absmax), n
    if arch == "t5":  # _keep_in_fp32_modules: wo stays float, as with bitsandbytes
        assert not any(n.endswith(".wo") for n in names)
    torch.manual_seed(1)
    inputs = ARCHS[arch][1](_ids())
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    if arch in GENERATES:
        gen_in = {k: v for k, v in inputs.items() if k != "labels"}
        seq = model.generate(**gen_in, max_new_tokens=3, do_sample=False)
        assert seq.shape[-1] >= 3
    # save / reload without arguments: bit-identical state and outputs
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qlora_kit" and saved["format_config"]["class"] == type(CONFIGS[fmt]).__name__
    reloaded = _load(arch, tmp_path / "q")
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, out.logits)
    # a QLoRA step through peft.get_peft_model
    targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    pm = peft.get_peft_model(reloaded, qlora_kit.hf.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    pm.train()
    loss = pm(**inputs).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
@pytest.mark.parametrize("arch", sorted(FAST))
def test_from_pretrained_fast(arch, fmt, checkpoints, tmp_path):
    _check_arch(arch, fmt, checkpoints, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(CONFIGS))
@pytest.mark.parametrize("arch", sorted(set(ARCHS) - FAST))
def test_from_pretrained_all_architectures(arch, fmt, checkpoints, tmp_path):
    _check_arch(arch, fmt, checkpoints, tmp_path)


def test_outputs_are_the_float_op_on_bitsandbytes_dequantized_weights(checkpoints):
    """NF4 without double quant: our forward equals the float model whose linear weights are bitsandbytes'
    dequantized NF4 weights (and bitsandbytes' own forward: test_outputs_equal_bitsandbytes_own_forward)."""
    bnb = pytest.importorskip("bitsandbytes")
    path = checkpoints("llama")
    ours = _load("llama", path, CONFIGS["nf4"])
    theirs = _bnb_layers("llama", path)
    ref = _load("llama", path)
    with torch.no_grad():
        for n, layer in theirs.items():
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            ref.get_submodule(n).weight.copy_(w)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=["fp32", "bf16"])
def test_outputs_equal_bitsandbytes_own_forward(checkpoints, dtype):
    """The whole model, NF4 without double quant, compute dtype fp32 / bf16, one token and seven: logits equal
    those of transformers + bitsandbytes' own CPU forward (its paths: tests/test_hf_bnb_outputs.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    if bnb.functional.has_avx512bf16():
        pytest.skip("this CPU runs bitsandbytes' AVX512-BF16 kernel (bound: tests/test_hf_bnb_outputs.py)")
    path = checkpoints("llama")
    bnb_cfg = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype
    )
    theirs = tf.LlamaForCausalLM.from_pretrained(path, quantization_config=bnb_cfg, device_map="cpu").eval()
    ours = _load("llama", path, qlora_kit.NF4Config(blocksize=64, double_quant=False, compute_dtype=dtype))
    for m in (1, 7):
        ids = torch.randint(3, V, (2, m))
        with torch.no_grad():
            assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits), m


def test_modules_to_not_convert_and_device_map_and_dtype(checkpoints):
    path = checkpoints("llama")
    # as bitsandbytes' llm_int8_skip_modules: names or patterns, replacing transformers' default skips
    qc = qlora_kit.hf.QuantizationConfig(qlora_kit.NF4Config(), modules_to_not_convert=["up_proj", "lm_head"])
    model = tf.LlamaForCausalLM.from_pretrained(
        path, quantization_config=qc, device_map={"": "cpu"}, dtype=torch.bfloat16
    )
    names = _quantized_names(model)
    assert names and not any(n.endswith("up_proj") for n in names) and "lm_head" not in names
    assert "model.layers.0.mlp.down_proj" in names
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the compute dtype
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids()).logits.float()).all()


def test_tied_weights_stay_tied_and_float(checkpoints):
    model = _load("gpt2", checkpoints("gpt2"), CONFIGS["int8"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head" not in _quantized_names(model)


def test_quantization_config_round_trips_and_refuses_non_formats():
    qc = qlora_kit.hf.QuantizationConfig(qlora_kit.Int4WeightConfig(group_size=64, compute_dtype=torch.float16))
    again = qlora_kit.hf.QuantizationConfig.from_dict(json.loads(qc.to_json_string()))
    assert again.config == qc.config and again.modules_to_not_convert is None
    with pytest.raises(TypeError, match="qlora_kit.quantize"):
        qlora_kit.hf.QuantizationConfig(qlora_kit.HQQConfig())
