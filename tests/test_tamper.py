"""Tampered and damaged saves, as a careless or hostile user makes them: every one is refused with a
sentence naming the file and the field or tensor, and the model is left exactly as it was.

Cases that rewrite the manifest after editing a file ("resealed") check the field and tensor checks
behind the SHA-256: a hostile user can recompute hashes, so the hashes are not the only defence.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora_kit
from qlora_kit import LoraConfig, add_lora, load_adapter, models, safe_io, save_adapter
from qlora_kit.nn.lora_layers import LoraLayer
from qlora_kit.nn.quantized import QuantizedLayer

Q = "model.layers.0.self_attn"


# ----- load_quantized ----------------------------------------------------------------------------------------
def _edit_json(name):
    def deco(fn):
        def edit(d):
            path = d / name
            data = json.loads(path.read_text())
            data = fn(data) or data
            path.write_text(json.dumps(data))

        return edit

    return deco


@_edit_json("quantization.json")
def _wrong_shape(q):
    q["layers"][f"{Q}.k_proj"]["format"]["shape"] = [16, 64]


@_edit_json("quantization.json")
def _tie_k_to_v(q):
    q["tied"][f"{Q}.k_proj.qweight.packed"] = f"{Q}.v_proj.qweight.packed"


@_edit_json("quantization.json")
def _blocksize_zero(q):
    q["layers"][f"{Q}.k_proj"]["format"]["blocksize"] = 0
    q["layers"][f"{Q}.k_proj"]["config"]["blocksize"] = 0


@_edit_json("quantization.json")
def _format_blocksize_only(q):
    q["layers"][f"{Q}.k_proj"]["format"]["blocksize"] = 128


@_edit_json("quantization.json")
def _huge_shape(q):
    q["layers"][f"{Q}.k_proj"]["format"]["shape"] = [10**9, 10**9]


@_edit_json("quantization.json")
def _double_quant_int(q):
    q["layers"][f"{Q}.k_proj"]["format"]["double_quant"] = 1


@_edit_json("quantization.json")
def _out_dtype_int(q):
    q["layers"][f"{Q}.k_proj"]["out_dtype"] = "int8"


@_edit_json("quantization.json")
def _version_string(q):
    q["version"] = "1"


@_edit_json("quantization.json")
def _unknown_field(q):
    q["extra"] = 1


@_edit_json("quantization.json")
def _layers_null(q):
    q["layers"] = None


def _replace_json(text):
    def edit(d):
        (d / "quantization.json").write_text(text)

    return edit


def _tensor_edit(fn):
    def edit(d):
        tensors = load_file(str(d / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(d / "model.safetensors"))

    return edit


@_tensor_edit
def _nan_nested_absmax(t):
    t[f"{Q}.q_proj.qweight.nested_absmax"][0] = float("nan")


@_tensor_edit
def _inf_offset(t):
    t[f"{Q}.q_proj.qweight.offset"].fill_(float("inf"))


@_tensor_edit
def _nan_norm(t):
    t["model.norm.weight"][3] = float("nan")


def _flip_bytes(d):
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(4):
        data[len(data) // 2 + 97 * i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _garble_manifest(d):
    (d / safe_io.MANIFEST_NAME).write_text('{"format": "qlora-kit-save", "files": []}')


def _drop_manifest_then(edit):
    def both(d):
        (d / safe_io.MANIFEST_NAME).unlink()
        edit(d)

    return both


QUANT_CASES = [  # (id, tamper, reseal the manifest afterwards, message)
    ("flipped-bytes", _flip_bytes, False, "SHA-256"),
    ("truncated", _truncate, False, "truncated or corrupt"),
    ("garbled-manifest", _garble_manifest, False, "not a valid qlora-kit manifest"),
    ("wrong-shape", _wrong_shape, True, r"k_proj\.format\.shape"),
    ("tie-k-to-v", _tie_k_to_v, True, r"field 'tied' maps .*k_proj"),
    ("blocksize-0", _blocksize_zero, True, r"k_proj\.config' is invalid.*blocksize"),
    ("format-blocksize", _format_blocksize_only, True, r"k_proj\.format\.blocksize"),
    ("huge-shape", _huge_shape, True, r"k_proj\.format\.shape"),
    ("double-quant-int", _double_quant_int, True, r"format\.double_quant"),
    ("out-dtype-int8", _out_dtype_int, True, r"out_dtype"),
    ("version-string", _version_string, True, "version"),
    ("unknown-field", _unknown_field, True, "unknown field 'extra'"),
    ("layers-null", _layers_null, True, "field 'layers' must be a mapping"),
    ("list", _replace_json("[]"), True, "holds a list"),
    ("null", _replace_json("null"), True, "holds a NoneType"),
    ("deep-nesting", _replace_json("[" * 100_000 + "]" * 100_000), True, "nests too deeply"),
    ("nan-nested-absmax", _nan_nested_absmax, True, r"q_proj\.qweight\.nested_absmax.*NaN/Inf"),
    ("inf-offset", _inf_offset, True, r"q_proj\.qweight\.offset.*NaN/Inf"),
    ("nan-float-weight", _nan_norm, True, r"model\.norm\.weight.*NaN/Inf"),
    ("no-manifest-nan", _drop_manifest_then(_nan_nested_absmax), False, "NaN/Inf"),
    ("no-manifest-tie", _drop_manifest_then(_tie_k_to_v), False, "field 'tied'"),
]


@pytest.fixture(scope="module")
def quant_save(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "nf4"
    qlora_kit.save_quantized(qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config()), d)
    return d


@pytest.mark.parametrize(("tamper", "reseal", "message"), [c[1:] for c in QUANT_CASES], ids=[c[0] for c in QUANT_CASES])
def test_tampered_quantized_save_is_refused_and_loads_nothing(tmp_path, quant_save, tamper, reseal, message):
    d = tmp_path / "nf4"
    d.mkdir()
    for f in quant_save.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tamper(d)
    if reseal:
        safe_io.write_manifest(d, "quantized")
    fresh = models.tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        qlora_kit.load_quantized(fresh, d)
    assert not any(isinstance(m, QuantizedLayer) for m in fresh.modules())
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_untampered_copy_loads(tmp_path, quant_save):
    fresh = qlora_kit.load_quantized(models.tiny_llama(seed=4), quant_save)
    assert sum(isinstance(m, QuantizedLayer) for m in fresh.modules()) == 14


# ----- load_adapter ------------------------------------------------------------------------------------------
A = f"base_model.model.{Q}.q_proj.lora_A.weight"
B = f"base_model.model.{Q}.q_proj.lora_B.weight"


def _adapter_tensor(fn):
    def edit(d):
        tensors = load_file(str(d / "adapter_model.safetensors"))
        fn(tensors)
        save_file(tensors, str(d / "adapter_model.safetensors"))

    return edit


def _set_config(**fields):
    def edit(d):
        path = d / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(fields)
        path.write_text(json.dumps(cfg))  # json writes float("inf") as Infinity, as the bad files had it

    return edit


def _adapter_file(name, text):
    def edit(d):
        (d / name).write_text(text)

    return edit


def _flip_adapter(d):
    path = d / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    path.write_bytes(bytes(data))


ADAPTER_CASES = [
    ("nan-A", _adapter_tensor(lambda t: t[A].view(-1).__setitem__(0, math.nan)), True, r"q_proj\.lora_A.*NaN/Inf"),
    ("inf-B", _adapter_tensor(lambda t: t[B].view(-1).__setitem__(1, math.inf)), True, r"q_proj\.lora_B.*NaN/Inf"),
    ("int64", _adapter_tensor(lambda t: t.__setitem__(A, t[A].long())), True, r"lora_A.*dtype torch\.int64"),
    ("bool", _adapter_tensor(lambda t: t.__setitem__(B, t[B] > 0)), True, r"lora_B.*dtype torch\.bool"),
    ("wrong-shape", _adapter_tensor(lambda t: t.__setitem__(A, torch.zeros(2, 63))), True, r"lora_A has shape"),
    ("alpha-inf", _set_config(lora_alpha=math.inf), True, "'lora_alpha' must be a finite positive number"),
    ("alpha-string", _set_config(lora_alpha="16"), True, "'lora_alpha' must be"),
    ("rslora-string", _set_config(use_rslora="false"), True, "'use_rslora' must be true or false"),
    ("dora-int", _set_config(use_dora=0), True, "'use_dora' must be true or false"),
    ("r-string", _set_config(r="8"), True, "'r' must be a positive integer"),
    ("dropout-1", _set_config(lora_dropout=1.0), True, "'lora_dropout'"),
    ("alpha-pattern", _set_config(alpha_pattern={"q_proj": -1}), True, "'alpha_pattern'"),
    ("config-list", _adapter_file("adapter_config.json", "[]"), True, "not a mapping"),
    ("config-broken", _adapter_file("adapter_config.json", '{"r": 8,'), True, "not valid JSON"),
    ("flipped", _flip_adapter, False, "SHA-256"),
    ("truncated", lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x08\x00"), False, "truncated"),
    (
        "no-manifest-truncated",
        _drop_manifest_then(lambda d: (d / "adapter_model.safetensors").write_bytes(b"xx")),
        False,
        "truncated or corrupt",
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def adapter_save(tmp_path_factory):
    d = tmp_path_factory.mktemp("a") / "adapter"
    model = add_lora(models.tiny_llama(), LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, d)
    return d


@pytest.mark.parametrize(
    ("tamper", "reseal", "message"), [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES]
)
def test_tampered_adapter_is_refused_and_changes_nothing(tmp_path, adapter_save, tamper, reseal, message):
    d = tmp_path / "adapter"
    d.mkdir()
    for f in adapter_save.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tamper(d)
    if reseal:
        safe_io.write_manifest(d, "adapter")
    model = models.tiny_llama()
    with pytest.raises(ValueError, match=message):
        load_adapter(model, d)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_untampered_adapter_loads(adapter_save):
    model = load_adapter(models.tiny_llama(), adapter_save)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 4


# ----- configs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": math.inf}, "finite positive"),
        ({"alpha": math.nan}, "finite positive"),
        ({"alpha": -1}, "finite positive"),
        ({"alpha": True}, "finite positive"),
        ({"use_rslora": "false"}, "True or False"),
        ({"use_dora": 1}, "True or False"),
        ({"r": 8.0}, "positive integer"),
    ],
)
def test_lora_config_types_are_strict(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_rank_larger_than_every_layer_is_refused():
    model = models.tiny_llama()  # hidden size 64
    with pytest.raises(ValueError, match=r"r=4096 is larger than any targeted layer allows.*at most 64"):
        add_lora(model, LoraConfig(r=4096))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_rank_larger_than_some_layers_warns_naming_them():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 2))
    with pytest.warns(UserWarning, match=r"exceeds min\(in, out\) of 1 targeted layer.*'1'"):
        add_lora(model, LoraConfig(r=8, target_modules=["0", "1"]))


def test_quantize_on_a_quantized_model_says_what_it_holds():
    model = qlora_kit.quantize(models.tiny_llama(), qlora_kit.NF4Config())
    qlora_kit.quantize(model, qlora_kit.NF4Config())  # the same config: nothing to do
    with pytest.raises(ValueError, match=r"already holds 14 quantized layers \(nf4.*load the float model again"):
        qlora_kit.quantize(model, qlora_kit.Int8WeightConfig())
    assert {m.format_name for m in model.modules() if isinstance(m, QuantizedLayer)} == {"nf4"}
