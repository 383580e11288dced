"""Recipes on a hub / local model quantize it while its weights are read (``qlora_kit.hf``'s quantizer): the
float model is never whole in memory, in one process or on any FSDP rank, and the result is the same base as
loading in float and calling ``quantize``."""

import pytest
import torch
from torch import nn

from qlora_kit.hf import QloraKitHfQuantizer
from qlora_kit.models import tiny_llama
from qlora_kit.nn.quantized import QuantizedLayer
from qlora_kit.recipe import load_recipe
from qlora_kit.train.build import build, quantizes_on_load


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    return path


def _float_target_bytes(model: nn.Module) -> int:
    # float weights of Linear layers the quantizer targets that hold real storage right now (not meta)
    return sum(
        m.weight.numel() * m.weight.element_size()
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name != "lm_head" and m.weight is not None and m.weight.device.type != "meta"
    )


@pytest.mark.parametrize("quant", [["quantization=nf4", "double_quant=true"], ["quantization=int4", "group_size=32"]])
def test_a_local_model_is_quantized_as_it_loads_one_float_layer_at_a_time(llama_dir, monkeypatch, quant):
    seen = []
    original = QloraKitHfQuantizer.quantize_layer

    def spy(self, model, name, weight):
        seen.append((name, _float_target_bytes(model), weight.numel() * weight.element_size()))
        return original(self, model, name, weight)

    monkeypatch.setattr(QloraKitHfQuantizer, "quantize_layer", spy)
    on_disk = build(load_recipe("quickstart", [f"model={llama_dir}", *quant])).models["model"]
    assert len(seen) == 14  # every attention / MLP projection, the head stays float
    largest = max(size for _, _, size in seen)
    # when a layer is quantized, no other target layer holds a float weight: at most one layer's floats exist
    assert all(live <= largest for _, live, _ in seen), seen
    assert sum(isinstance(m, QuantizedLayer) for m in on_disk.modules()) == 14
    # the same base as the built-in model (same weights) quantized after loading in float
    in_memory = build(load_recipe("quickstart", quant)).models["model"]
    a, b = on_disk.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loftq_and_built_in_models_quantize_after_loading(llama_dir):
    from qlora_kit.configs import NF4Config

    qconfig = NF4Config()
    assert quantizes_on_load(load_recipe("quickstart", [f"model={llama_dir}"]), qconfig)
    assert not quantizes_on_load(load_recipe("quickstart", [f"model={llama_dir}", "lora.init=loftq"]), qconfig)
    assert not quantizes_on_load(load_recipe("quickstart"), qconfig)  # built-in: made in memory, no checkpoint
    assert not quantizes_on_load(load_recipe("quickstart", [f"model={llama_dir}"]), None)
