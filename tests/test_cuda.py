"""CUDA-only checks of the quantization core (skipped without a GPU; run with TRITON_INTERPRET=0).

Larger shapes than the interpreter allows, bf16 compute, the one-layer-at-a-time device path of quantize(), and
torch.compile (inductor) of a quantized model.
"""

import pytest
import torch

import qlora_kit
from qlora_kit import models
from qlora_kit.nn.quantized import QuantizedLayer

pytestmark = pytest.mark.cuda

BF16 = torch.bfloat16
CONFIGS = {
    "nf4": qlora_kit.NF4Config(compute_dtype=BF16),
    "fp4": qlora_kit.FP4Config(compute_dtype=BF16),
    "int8": qlora_kit.Int8WeightConfig(compute_dtype=BF16),
    "int4": qlora_kit.Int4WeightConfig(group_size=128, compute_dtype=BF16),
    "fp8": qlora_kit.FP8WeightConfig(compute_dtype=BF16),
    "w8a8": qlora_kit.Int8DynamicActivationConfig(compute_dtype=BF16),
}


def _llama():
    return models.tiny_llama(hidden_size=512, layers=4, intermediate_size=1376)


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_quantized_llama_on_cuda_matches_cpu_reference(fmt):
    """Same quantized model, CUDA (Triton kernels) vs CPU (references), bf16 compute: close logits."""
    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 kernels need sm89+")
    cpu = qlora_kit.quantize(_llama(), CONFIGS[fmt]).eval()
    gpu = qlora_kit.quantize(_llama(), CONFIGS[fmt]).eval().cuda()
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        assert torch.equal(a, b.cpu()), name  # Triton quantize kernels == CPU references, bit for bit
    ids = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(ids).logits.float()
        got = gpu(ids.cuda()).logits.float().cpu()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, cos


def test_quantize_to_cuda_one_layer_at_a_time_keeps_peak_near_quantized_size():
    model = models.tiny_llama(hidden_size=1024, layers=6, intermediate_size=2816)  # 285 MB of fp32 weights
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    qlora_kit.quantize(model, qlora_kit.NF4Config(), device="cuda")
    peak = torch.cuda.max_memory_allocated() - start
    final = torch.cuda.memory_allocated() - start
    # one float linear weight (fp32) on the device at a time, plus the quantize kernels' temporaries
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    assert final < 0.5 * float_bytes
    assert peak < final + 6 * largest + (64 << 20), (peak, final, float_bytes)  # ~175 MB << 285 MB


def test_compile_quantized_llama_inductor_matches_eager():
    torch._dynamo.reset()
    model = qlora_kit.quantize(_llama(), CONFIGS["nf4"]).eval().cuda()
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expect = model(ids).logits.float()
        got = compiled(ids).logits.float()
    torch.testing.assert_close(got, expect, rtol=2e-2, atol=2e-2)


def test_generate_on_cuda_nf4():
    model = qlora_kit.quantize(_llama(), CONFIGS["nf4"]).eval().cuda()
    out = model.generate(torch.randint(0, 256, (1, 8), device="cuda"), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 16)
    assert sum(isinstance(m, QuantizedLayer) for m in model.modules()) == 4 * 7
