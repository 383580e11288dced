"""Edge contracts of the core: nothing half-done on bad input, strict configs, atomic saves, what counts as a
weight."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import qlora_kit
from qlora_kit import models, safe_io
from qlora_kit.nn.quantized import QuantizedLayer

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _n_quantized(model):
    return sum(isinstance(m, QuantizedLayer) for m in model.modules())


def test_nan_in_a_late_layer_leaves_the_model_untouched():
    model = models.tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        qlora_kit.quantize(model, qlora_kit.NF4Config())
    assert _n_quantized(model) == 0


def test_bare_layer_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="nn.Sequential"):
        qlora_kit.quantize(nn.Linear(8, 8), qlora_kit.Int8WeightConfig())


@pytest.mark.parametrize(
    "make",
    [
        lambda: qlora_kit.NF4Config(blocksize=64.0),
        lambda: qlora_kit.FP4Config(blocksize=True),
        lambda: qlora_kit.Int4WeightConfig(group_size=128.0),
    ],
)
def test_sizes_must_be_ints(make):
    with pytest.raises(ValueError, match="must be one of"):
        make()


def test_quantized_and_loaded_layers_follow_eval_mode(tmp_path):
    model = qlora_kit.quantize(models.tiny_llama().eval(), qlora_kit.NF4Config())
    assert not any(m.training for m in model.modules())
    qlora_kit.save_quantized(model, tmp_path / "q")
    fresh = qlora_kit.load_quantized(models.tiny_llama().eval(), tmp_path / "q")
    assert not any(m.training for m in fresh.modules())


def _saved(tmp_path):
    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.Int8WeightConfig())
    qlora_kit.save_quantized(model, tmp_path / "q")
    return tmp_path / "q"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(layers=[1, 2]), "field 'layers' must be a mapping"),
        (lambda q: q["layers"].update({next(iter(q["layers"])): "x"}), "is not a mapping"),
        (lambda q: next(iter(q["layers"].values())).update(layer="QuantConv2d"), "does not quantize to one"),
        (lambda q: next(iter(q["layers"].values())).pop("config"), r"config' must be a dict"),
        (lambda q: next(iter(q["layers"].values()))["config"].update(bogus=1), r"config' is invalid"),
    ],
)
def test_malformed_quantization_json_is_a_clear_error_and_loads_nothing(tmp_path, edit, message):
    directory = _saved(tmp_path)
    path = directory / "quantization.json"
    qmap = json.loads(path.read_text())
    edit(qmap)
    path.write_text(json.dumps(qmap))
    safe_io.write_manifest(directory, "quantized")  # a consistent edit: the field checks must catch it
    fresh = models.tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        qlora_kit.load_quantized(fresh, directory)
    assert _n_quantized(fresh) == 0
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_failed_directory_swap_keeps_the_previous_save(tmp_path, monkeypatch):
    directory = _saved(tmp_path)
    original = (directory / "model.safetensors").read_bytes()
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if Path(dst) == directory and ".tmp-" in str(src):  # the new directory moving into place
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(safe_io.os, "replace", flaky)
    model = qlora_kit.quantize(models.tiny_llama(seed=5), qlora_kit.NF4Config())
    with pytest.raises(OSError, match="disk went away"):
        qlora_kit.save_quantized(model, directory)
    assert (directory / "model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary directory left behind


def test_memory_footprint_counts_weights_not_index_or_rotary_buffers():
    bert = models.tiny_bert()
    params = sum(p.numel() * p.element_size() for p in bert.parameters())
    assert qlora_kit.memory_footprint(bert)["float"] == params  # position_ids / token_type_ids are not weights
    llama = models.tiny_llama()
    params = sum(p.numel() * p.element_size() for p in llama.parameters())
    assert qlora_kit.memory_footprint(llama)["float"] == params  # rotary inv_freq is not a weight
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    extra = 4 * 4 * 2  # BatchNorm running mean and var are persistent float state
    assert qlora_kit.memory_footprint(net)["float"] == sum(p.numel() * 4 for p in net.parameters()) + extra


def test_quantized_embedding_keeps_max_norm():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, max_norm=1.0)
    q = qlora_kit.quantize(
        nn.Sequential(nn.Embedding(50, 16, max_norm=1.0, _weight=emb.weight.detach().clone())),
        qlora_kit.Int8WeightConfig(compute_dtype=torch.float32),
        filter_fn=lambda m, n: True,
    )
    ids = torch.tensor([[1, 2, 3], [4, 5, 1]])
    got = q(ids)
    assert got.norm(dim=-1).max() <= 1.0 + 1e-5
    torch.testing.assert_close(got, emb(ids), atol=5e-3, rtol=0)
