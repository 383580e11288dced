"""save_quantized / load_quantized: bit-identical round trips, clear errors, nothing half-loaded."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora_kit
from qlora_kit import models, safe_io
from qlora_kit.nn.quantized import QuantizedLayer

CONFIGS = [
    qlora_kit.NF4Config(),
    qlora_kit.NF4Config(blocksize=128, double_quant=False, compute_dtype=torch.float32),
    qlora_kit.FP4Config(),
    qlora_kit.Int8WeightConfig(),
    qlora_kit.Int4WeightConfig(group_size=64),
    qlora_kit.FP8WeightConfig(),
    qlora_kit.Int8DynamicActivationConfig(compute_dtype=torch.float32),
    qlora_kit.FP8DynamicActivationConfig(),
]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("build", [models.tiny_llama, models.tiny_gpt2], ids=["llama", "gpt2_tied"])
def test_roundtrip_bit_identical(tmp_path, build, config):
    model = qlora_kit.quantize(build(), config)
    with torch.no_grad():
        expect = model(IDS).logits
    qlora_kit.save_quantized(model, tmp_path / "q")
    fresh = build(seed=123)  # different float weights: everything must come from the file
    qlora_kit.load_quantized(fresh, tmp_path / "q")
    with torch.no_grad():
        got = fresh(IDS).logits
    assert torch.equal(got, expect)
    assert sum(isinstance(m, QuantizedLayer) for m in fresh.modules()) == sum(
        isinstance(m, QuantizedLayer) for m in model.modules()
    )


def test_roundtrip_unet_and_dcgan(tmp_path):
    for build, run in (
        (models.tiny_unet, lambda m: m(torch.ones(1, 1, 8, 8), torch.tensor([5])).sample),
        (models.dcgan_generator, lambda m: m(torch.ones(2, 16))),
    ):
        model = qlora_kit.quantize(build(), qlora_kit.NF4Config())
        with torch.no_grad():
            expect = run(model)
        qlora_kit.save_quantized(model, tmp_path / build.__name__)
        fresh = qlora_kit.load_quantized(build(seed=7), tmp_path / build.__name__)
        with torch.no_grad():
            assert torch.equal(run(fresh), expect)


@pytest.fixture
def saved(tmp_path):
    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config())
    qlora_kit.save_quantized(model, tmp_path / "q")
    return tmp_path / "q"


def _assert_untouched(model, before):
    assert not any(isinstance(m, QuantizedLayer) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _load_fails(model, directory, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        qlora_kit.load_quantized(model, directory)
    _assert_untouched(model, before)


def _reseal(directory):
    """Rewrite the manifest after tampering, as a hostile user would: the deeper checks must still hold."""
    safe_io.write_manifest(directory, "quantized")


def test_truncated_file(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _load_fails(models.tiny_llama(), saved, "truncated or corrupt")


def test_missing_key(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.qweight.packed"]
    save_file(tensors, str(path))
    _reseal(saved)
    _load_fails(models.tiny_llama(), saved, r"model\.layers\.1\.mlp\.up_proj\.qweight\.packed.*missing")


def test_wrong_shape_and_dtype(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(path))
    _reseal(saved)
    _load_fails(models.tiny_llama(), saved, r"model\.norm\.weight.*shape")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.float16)
    save_file(tensors, str(path))
    _reseal(saved)
    _load_fails(models.tiny_llama(), saved, r"model\.norm\.weight.*float16")


def test_wrong_architecture(saved):
    _load_fails(models.tiny_llama(layers=1), saved, "model.layers.1")


def test_missing_files_and_bad_json(tmp_path, saved):
    _load_fails(models.tiny_llama(), tmp_path / "nowhere", "missing")
    (saved / "quantization.json").write_text("{not json")
    _reseal(saved)
    _load_fails(models.tiny_llama(), saved, "not valid JSON")


def test_save_is_atomic_and_replaces(saved):
    model = qlora_kit.quantize(models.tiny_llama(seed=3), qlora_kit.Int8WeightConfig())
    qlora_kit.save_quantized(model, saved)  # replaces the NF4 save
    qmap = json.loads((saved / "quantization.json").read_text())
    assert {v["format"]["format"] for v in qmap["layers"].values()} == {"int8"}
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".q.")]
