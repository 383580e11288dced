"""Hostile input at the Python API: calibration data, devices, bounded YAML, the fit check, and SmoothQuant
never a silent no-op (issue 14)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qlora_kit
from qlora_kit.calib_checks import CalibrationDataError
from qlora_kit.configs import Int8DynamicActivationConfig
from qlora_kit.models import tiny_llama
from qlora_kit.ptq import GPTQConfig, SmoothQuantConfig, smooth_activations
from qlora_kit.recipe import RecipeError, load_recipe, parse_yaml
from qlora_kit.yaml_limits import MAX_DEPTH, MAX_NODES, YamlLimitError, check_yaml


# ----- calibration data ---------------------------------------------------------------------------------------
def _ids(*shape, lo=0, hi=256):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(0))


CALIB_CASES = [
    ("strings", ["def f(x): return x"], "holds a str"),
    ("text as calib_data", "def f(x): return x", "calib_data is a str"),
    ("float ids", [torch.rand(2, 8)], "dtype torch.float32"),
    ("bool ids", [torch.ones(2, 8, dtype=torch.bool)], "dtype torch.bool"),
    ("bare 2-D tensor", _ids(8, 16), "one tensor of shape (8, 16)"),
    ("out-of-vocabulary ids", [_ids(2, 8, lo=256, hi=300)], "outside the model's vocabulary of 256"),
    ("negative ids", [{"input_ids": _ids(2, 8) - 300}], "outside the model's vocabulary"),
    ("1-D ids", [_ids(16)], "shape (16,)"),
    ("numpy batch", [np.zeros((2, 8), dtype=np.int64)], "numpy.ndarray"),
    ("empty batch", [_ids(2, 0)], "no token ids"),
    ("dict as calib_data", {"input_ids": _ids(2, 8)}, "one dict"),
    ("non-str dict key", [{0: _ids(2, 8)}], "dict key 0"),
]


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=32), SmoothQuantConfig()], ids=["gptq", "sq"])
@pytest.mark.parametrize("name, data, words", CALIB_CASES, ids=[c[0] for c in CALIB_CASES])
def test_bad_calibration_data_is_one_sentence_before_anything_runs(config, name, data, words):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationDataError) as info:
        qlora_kit.quantize(model, config, calib_data=data)
    message = str(info.value)
    assert words in message and "\n" not in message and len(message) < 300, message
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # untouched


def test_good_calibration_data_in_every_form_passes():
    for data in ([_ids(2, 16)], [(_ids(2, 16),)], [{"input_ids": _ids(2, 16), "attention_mask": torch.ones(2, 16)}]):
        qlora_kit.quantize(tiny_llama(), GPTQConfig(bits=4, group_size=32), calib_data=data)
    # a model without an input embedding takes float inputs
    mlp = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    qlora_kit.quantize(
        mlp, GPTQConfig(bits=4, group_size=32), calib_data=[torch.randn(4, 32)], filter_fn=lambda m, n: True
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_device_without_cuda_is_one_sentence(device):
    for config in (qlora_kit.NF4Config(), SmoothQuantConfig()):
        with pytest.raises(ValueError, match="no CUDA GPU"):
            qlora_kit.quantize(tiny_llama(), config, device=device, calib_data=[_ids(2, 8)])


def test_unknown_device_is_one_sentence():
    with pytest.raises(ValueError, match="not a device torch knows"):
        qlora_kit.quantize(tiny_llama(), qlora_kit.NF4Config(), device="gpu")


# ----- bounded YAML -------------------------------------------------------------------------------------------
def test_yaml_aliases_within_limits_still_work():
    raw = parse_yaml("lora:\n  target_modules: &t [q_proj, v_proj]\n  exclude_modules: *t\n", "r.yaml")
    assert raw["lora"]["exclude_modules"] == ["q_proj", "v_proj"]
    check_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), "ok.yaml")  # the mapping is a level


@pytest.mark.parametrize(
    "text, words",
    [
        ("a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "levels deep"),
        ("a: &x " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 20 + "*x" + "]" * 20, "through its *aliases"),
        ("a: &x [" + ",".join(["v"] * 100) + "]\nb: [" + ",".join(["*x"] * (MAX_NODES // 100 + 1)) + "]", "expands"),
        ("a: &x '" + "v" * 500_000 + "'\nb: [" + ",".join(["*x"] * 10) + "]", "characters"),
    ],
    ids=["deep", "deep through alias", "many nodes", "many characters"],
)
def test_yaml_limits(text, words):
    with pytest.raises(YamlLimitError, match="expands|levels deep") as info:
        check_yaml(text, "r.yaml")
    assert words in str(info.value) and str(info.value).startswith("r.yaml ")


# ----- the fit check ------------------------------------------------------------------------------------------
def test_fit_estimate_on_meta_uses_no_memory_and_no_rng():
    from qlora_kit.train.fit import check_rank, estimate

    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    need = estimate(load_recipe("dcgan_qlora"))  # its load_base reseeds the global RNG: must be undone
    assert torch.equal(torch.rand(3), expect)
    assert need["total"] == need["weights"] + need["adapters"] + need["activations"] > 0
    recipe = load_recipe("quickstart", ["lora.r=8"])
    model = tiny_llama()  # 64 hidden, 256 vocabulary, 14 adapted linears + embeddings
    params = check_rank(model, recipe)
    assert params > 0 and check_rank(model, load_recipe("quickstart", ["lora.r=16"])) == 2 * params
    with pytest.raises(RecipeError, match=r"lora.r=65 is larger than any targeted layer .* r <= 64"):
        check_rank(model, load_recipe("quickstart", ["lora.r=65"]))


def test_fit_refuses_a_run_larger_than_the_machine(monkeypatch):
    from qlora_kit.train import fit

    recipe = load_recipe("quickstart")
    need = fit.estimate(recipe)["total"]
    monkeypatch.setattr(fit, "available_bytes", lambda device: (need - 1, "of RAM available"))
    with pytest.raises(RecipeError, match="this run needs about .* but only .* of RAM available"):
        fit.check_fits(recipe, torch.device("cpu"))
    monkeypatch.setattr(fit, "available_bytes", lambda device: (need + 1, "of RAM available"))
    fit.check_fits(recipe, torch.device("cpu"))
    monkeypatch.setenv(fit.SKIP_ENV, "1")
    monkeypatch.setattr(fit, "available_bytes", lambda device: (1, "of RAM available"))
    fit.check_fits(recipe, torch.device("cpu"))


def test_estimate_grows_with_batch_and_sequence():
    from qlora_kit.train.fit import estimate

    base = estimate(load_recipe("quickstart"))["activations"]
    assert estimate(load_recipe("quickstart", ["batch_size=16"]))["activations"] == 2 * base
    assert estimate(load_recipe("quickstart", ["seq_len=256"]))["activations"] == 2 * base


# ----- SmoothQuant: never a silent no-op ----------------------------------------------------------------------
class _Residual(nn.Module):
    """A linear fed by a residual sum (x + a(x)): no op can absorb the smoothing scale."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.a, self.b = nn.Linear(k, k), nn.Linear(k, n)

    def forward(self, x):
        return self.b(x + self.a(x))


def _outlier_inputs(k: int, rows: int, seed: int) -> torch.Tensor:
    """Inputs with 12 of k channels scaled x25 (the issue's outlier-channel case)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, torch.randperm(k, generator=torch.Generator().manual_seed(99))[:12]] *= 25
    return x


def _make(kind: str, k: int = 64, n: int = 48) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(k, n)) if kind == "bare" else _Residual(k, n)


def _rel_err(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = ref(x)
        return float(torch.linalg.norm(model(x) - y) / torch.linalg.norm(y))


@pytest.mark.parametrize("kind", ["bare", "residual"])
def test_smoothquant_beats_plain_w8a8_without_a_foldable_producer(kind):
    calib = list(_outlier_inputs(64, 256, 1).split(32))
    test = _outlier_inputs(64, 128, 2)
    every = lambda m, n: True  # noqa: E731
    fp32 = torch.float32
    w8a8 = qlora_kit.quantize(_make(kind), Int8DynamicActivationConfig(compute_dtype=fp32), filter_fn=every)
    sq = qlora_kit.quantize(
        _make(kind), SmoothQuantConfig(alpha=0.5, compute_dtype=fp32), calib_data=calib, filter_fn=every
    )
    ref = _make(kind)
    e_w8a8, e_sq = _rel_err(w8a8, ref, test), _rel_err(sq, ref, test)
    assert e_sq < 0.8 * e_w8a8, (e_sq, e_w8a8)
    from qlora_kit.nn.smooth import SmoothQuantLinear

    assert any(isinstance(m, SmoothQuantLinear) for m in sq.modules())


def test_run_time_smoothing_is_exact_in_float_and_survives_save_load(tmp_path):
    from qlora_kit.nn.smooth import SmoothQuantLinear

    calib = list(_outlier_inputs(64, 128, 1).split(32))
    sq = qlora_kit.quantize(_make("residual"), SmoothQuantConfig(compute_dtype=torch.float32), calib_data=calib,
                            filter_fn=lambda m, n: True)  # fmt: skip
    ref = _make("residual")
    for name in ("a", "b"):
        layer = getattr(sq, name)
        assert isinstance(layer, SmoothQuantLinear)
        # the effective weight is the float one up to int8 rounding of W * s
        w = getattr(ref, name).weight
        assert (
            float(torch.linalg.norm(layer.dequantize_weight(torch.float32) - w.detach()) / torch.linalg.norm(w)) < 0.02
        )
    qlora_kit.save_quantized(sq, tmp_path / "sq")
    loaded = qlora_kit.load_quantized(_make("residual"), tmp_path / "sq")
    x = _outlier_inputs(64, 16, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), sq(x))
    assert torch.equal(loaded.b.smooth_scale, sq.b.smooth_scale)


def test_smooth_activations_warns_naming_layers_it_cannot_smooth():
    calib = list(_outlier_inputs(64, 64, 1).split(32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smooth_activations(_make("residual"), SmoothQuantConfig(), calib, filter_fn=lambda m, n: True)
    messages = [str(w.message) for w in caught]
    assert any("no op folds the scale of" in m and "b" in m.split("scale of")[1] for m in messages), messages


def test_smoothquant_with_foldable_norms_keeps_plain_layers():
    """A Llama: q/k/v and gate/up fold into their RMSNorms; only layers with no foldable producer (if any)
    get a run-time scale, and the model's output stays close."""
    from qlora_kit.nn.quantized import QuantLinear
    from qlora_kit.nn.smooth import SmoothQuantLinear

    model, ref = tiny_llama(), tiny_llama()
    calib = [_ids(2, 16)]
    qlora_kit.quantize(model, SmoothQuantConfig(compute_dtype=torch.float32), calib_data=calib)
    plain = [n for n, m in model.named_modules() if type(m) is QuantLinear]
    assert any(n.endswith("q_proj") for n in plain)  # folded into input_layernorm: no run-time scale
    assert not any(n.endswith("q_proj") for n, m in model.named_modules() if isinstance(m, SmoothQuantLinear))
    ids = _ids(2, 16)
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert float(torch.linalg.norm(a - b) / torch.linalg.norm(b)) < 0.05
