"""QAT (qlora_kit/qat.py, qlora_kit/nn/fake_quant.py): fake-quant forward == converted layer, exactly;
straight-through and LSQ gradients; QAT + LoRA; and QAT recovering the int4 gap.

The gap test uses a converged MLP regressor (test MSE, CPU): float fine-tuned 200 more steps 0.02183; that
model with int4 g128 RTN 0.02541; QAT (straight-through) with the same 200 steps 0.02203; QAT with LSQ
scales 0.02199. On the tiny LMs that fit a unit test, int4 changes held-out perplexity by less than the
noise of 40 training steps, so the LM version of this bar lives in the benchmark report (with a control).
"""

import copy
import math

import pytest
import torch
from qlora_kit.kernels.reference import quant_int as qi
from torch import nn

import qlora_kit
from qlora_kit import models
from qlora_kit.nn.fake_quant import FakeQuantLinear, is_fake_quant
from qlora_kit.nn.quantized import QuantizedLayer
from qlora_kit.qat import QATConfig, convert_qat, prepare_qat

F32 = torch.float32


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


BACKBONES = {
    "llama": (models.tiny_llama, lambda m: m(_ids()).logits),
    "gpt2": (models.tiny_gpt2, lambda m: m(_ids()).logits),
    "bert": (models.tiny_bert, lambda m: m(_ids()).last_hidden_state),
    "unet": (models.tiny_unet, lambda m: m(torch.ones(2, 1, 8, 8) * 0.3, torch.tensor([3, 50])).sample),
    "dcgan": (models.dcgan_generator, lambda m: m(torch.linspace(-1, 1, 32).reshape(2, 16))),
}
CONFIGS = {
    "int4": qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32),
    "int4-lsq": QATConfig(qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32), learnable_scales=True),
    "nf4": qlora_kit.NF4Config(compute_dtype=F32),
    "int8-bf16": qlora_kit.Int8WeightConfig(compute_dtype=torch.bfloat16),
    "fp8": qlora_kit.FP8WeightConfig(compute_dtype=F32),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_convert_equals_fake_quant_exactly(backbone, config):
    build, run = BACKBONES[backbone]
    model = build()
    with torch.no_grad():
        float_out = run(model)
    prepare_qat(model, CONFIGS[config])
    fakes = [m for m in model.modules() if is_fake_quant(m)]
    assert fakes
    # train a little so weights (and learned scales) move away from their initial values
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    model.train()
    for _ in range(2):
        run(model).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        fake_out = run(model)
    assert not torch.equal(fake_out, float_out)
    convert_qat(model)
    assert not any(is_fake_quant(m) for m in model.modules())
    assert sum(isinstance(m, QuantizedLayer) for m in model.modules()) == len(fakes)
    with torch.no_grad():
        assert torch.equal(run(model), fake_out)


def test_embeddings_and_heads_when_the_filter_asks():
    model = models.tiny_llama()
    prepare_qat(model, qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32), filter_fn=lambda m, n: True)
    assert is_fake_quant(model.model.embed_tokens) and is_fake_quant(model.lm_head)
    with torch.no_grad():
        fake = model(_ids()).logits
    convert_qat(model)
    assert isinstance(model.model.embed_tokens, QuantizedLayer)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, fake)


def test_fake_quant_layer_is_the_float_class_sharing_parameters():
    lin = nn.Linear(40, 8)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(8, 3))
    prepare_qat(model, qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32), filter_fn=lambda m, n: n == "0")
    fq = model[0]
    assert isinstance(fq, FakeQuantLinear) and isinstance(fq, nn.Linear)
    assert fq.weight is lin.weight and fq.bias is lin.bias  # an optimiser built before prepare_qat still works
    assert type(model[2]) is nn.Linear


def test_straight_through_gradient_is_the_identity():
    lin = nn.Linear(64, 16)
    model = nn.Sequential(lin)
    prepare_qat(model, qlora_kit.NF4Config(compute_dtype=F32, blocksize=32), filter_fn=lambda m, n: True)
    x = torch.randn(5, 64)
    g_out = torch.randn(5, 16)
    model(x).backward(g_out)
    # y = x w_hat^T + b with d w_hat / d w = 1  =>  dL/dw = g_out^T x
    torch.testing.assert_close(lin.weight.grad, g_out.t() @ x)
    torch.testing.assert_close(lin.bias.grad, g_out.sum(0))


def test_lsq_gradients_match_the_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 3, bias=False))
    cfg = QATConfig(qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32), learnable_scales=True)
    prepare_qat(model, cfg, filter_fn=lambda m, n: True)
    fq = model[0]
    with torch.no_grad():
        fq.weight[0, 0] = 50.0  # far outside the range: clipped
    x = torch.randn(7, 40)
    g_out = torch.randn(7, 3)
    model(x).backward(g_out)
    gw_hat = g_out.t() @ x  # dL / d w_hat
    s = fq.qat_scale.detach().to(torch.bfloat16).float().repeat_interleave(32, 1)[:, :40]
    z = fq.qat_zero.detach().to(torch.bfloat16).float().repeat_interleave(32, 1)[:, :40]
    w = fq.weight.detach()
    q = torch.clamp(torch.round(w / s + z), 0, 15)
    v = w / s + z
    inside = (v >= 0) & (v <= 15)
    assert not inside[0, 0] and inside.float().mean() > 0.9
    torch.testing.assert_close(fq.weight.grad, gw_hat * inside)
    lsq = 1 / (32 * 15) ** 0.5
    ds = torch.where(inside, (q - z) - w / s, q - z) * gw_hat
    dz = torch.where(inside, torch.zeros_like(w), -s) * gw_hat
    pad = torch.zeros(3, 24)
    torch.testing.assert_close(fq.qat_scale.grad, torch.cat([ds, pad], 1).reshape(3, 2, 32).sum(2) * lsq)
    torch.testing.assert_close(fq.qat_zero.grad, torch.cat([dz, pad], 1).reshape(3, 2, 32).sum(2) * lsq)


def test_learned_scales_are_what_the_converted_weight_stores():
    model = models.tiny_llama(hidden_size=64, layers=1)
    cfg = QATConfig(qlora_kit.Int4WeightConfig(group_size=64, compute_dtype=F32), learnable_scales=True)
    prepare_qat(model, cfg)
    fq = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        fq.qat_scale.mul_(0.9)
        fq.qat_zero.add_(0.3)  # fractional zero points survive conversion
    scale, zero = fq.effective_params()
    convert_qat(model)
    q = model.model.layers[0].mlp.down_proj.qweight
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    assert torch.equal(q.packed, qi.int4_quantize_with_params(fq.weight.detach().float(), scale, zero, 64))


def test_qat_with_lora_trains_adapters_and_converts_exactly():
    model = models.tiny_llama()
    prepare_qat(model, qlora_kit.Int4WeightConfig(group_size=32, compute_dtype=F32))
    qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    model.train()
    losses = []
    for _ in range(4):
        logits = model(ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    convert_qat(model)
    wrapper = model.model.layers[0].self_attn.q_proj
    assert type(wrapper).__name__ == "LoraLinear" and isinstance(wrapper.base_layer, QuantizedLayer)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_errors_name_the_problem():
    model = models.tiny_llama(hidden_size=32, layers=1)
    with pytest.raises(TypeError, match="QATConfig or a format config"):
        prepare_qat(model, "int4")
    with pytest.raises(ValueError, match="learnable_scales needs weight=Int4WeightConfig"):
        QATConfig(qlora_kit.NF4Config(), learnable_scales=True)
    with pytest.raises(ValueError, match="QATConfig.weight must be a format config"):
        QATConfig(qlora_kit.GPTQConfig())
    with pytest.raises(ValueError, match="call qlora_kit.prepare_qat"):
        convert_qat(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="up_proj.weight"):
        prepare_qat(model, qlora_kit.Int4WeightConfig(group_size=32))


def test_qat_recovers_most_of_the_int4_gap():
    """A converged MLP regressor; the float control gets the same fine-tuning as QAT (full-batch Adam, 200 steps),
    so the comparison is train-then-RTN vs QAT under one training budget."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 64, generator=g) / 32**0.5, torch.randn(64, 8, generator=g) / 8

    def data(n, seed):
        x = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
        return x, torch.tanh(x @ a) @ b

    x_train, y_train = data(4096, 1)
    x_test, y_test = data(1024, 2)

    def train(m, steps, lr, batch=None):
        torch.manual_seed(0)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        for _ in range(steps):
            idx = torch.randint(0, 4096, (batch,)) if batch else slice(None)
            ((m(x_train[idx]) - y_train[idx]) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        return m

    def mse(m):
        with torch.no_grad():
            return float(((m(x_test) - y_test) ** 2).mean())

    torch.manual_seed(0)
    base = train(
        nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8)),
        3000,
        3e-3,
        batch=256,
    )
    everything = lambda m, n: True  # noqa: E731
    cfg = qlora_kit.Int4WeightConfig(group_size=128, compute_dtype=F32)
    control = train(copy.deepcopy(base), 200, 1e-3)
    rtn = qlora_kit.quantize(copy.deepcopy(control), cfg, filter_fn=everything)
    qat = convert_qat(train(prepare_qat(copy.deepcopy(base), cfg, filter_fn=everything), 200, 1e-3))
    lsq = prepare_qat(copy.deepcopy(base), QATConfig(cfg, learnable_scales=True), filter_fn=everything)
    lsq = convert_qat(train(lsq, 200, 1e-3))
    gap_rtn = mse(rtn) - mse(control)
    assert gap_rtn > 0.1 * mse(control)  # int4 hurts this model: measured +16%
    assert mse(qat) - mse(control) < 0.5 * gap_rtn  # measured: recovers 94% of the gap
    assert mse(lsq) - mse(control) < 0.5 * gap_rtn  # measured: 95%
