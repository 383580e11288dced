"""MXFP4 (OCP Microscaling): the reference against an independent decoder written here from the OCP MX v1.0 spec,
against torchao's MX reference, the rounding rule value by value, the Triton kernels (interpreter) against the
reference, and the format end to end (quantize, LoRA, save / load, CLI)."""

import json
import math
import struct

import pytest
import torch
from qlora_kit.kernels.reference import mxfp4 as ref

import qlora_kit
from qlora_kit.cli import main
from qlora_kit.formats.mxfp4 import MXFP4Config, MXFP4Weight

SHAPES = [(1, 1), (3, 17), (5, 32), (17, 65), (8, 128), (33, 130)]


# ------------------------------------------------------------------ an independent decoder, from the OCP spec text
def spec_e2m1(nibble: int) -> float:
    """OCP MX v1.0, FP4 E2M1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; exponent 0 is subnormal (2**0 * 0.m)."""
    sign = -1.0 if nibble & 0b1000 else 1.0
    exponent = (nibble >> 1) & 0b11
    mantissa = nibble & 0b1
    if exponent == 0:
        return sign * (mantissa / 2) * 2.0 ** (1 - 1)
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


def spec_e8m0(byte: int) -> float:
    """OCP MX v1.0, E8M0: 2**(byte - 127); 0xFF is NaN."""
    return math.nan if byte == 0xFF else 2.0 ** (byte - 127)


def spec_decode(packed: torch.Tensor, scales: torch.Tensor, k: int) -> list[list[float]]:
    """Row by row in plain Python: byte i holds element 2i in its low nibble (gpt-oss / triton_kernels layout)."""
    out = []
    for prow, srow in zip(packed.tolist(), scales.tolist(), strict=True):
        elems = [spec_e2m1(n) for b in prow for n in (b & 0xF, b >> 4)]
        out.append([elems[j] * spec_e8m0(srow[j // 32]) for j in range(k)])
    return out


def weights(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])  # many magnitudes in one row
    if shape[0] > 2:
        w[1] = 0.0  # an all-zero row: E = 0
        w[2, ::3] = -0.0
    return w


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_decodes_like_the_spec(shape):
    w = weights(shape)
    packed, scales = ref.quantize_mxfp4(w)
    assert packed.shape == (shape[0], ref.padded_k(shape[1]) // 2) and scales.shape == (shape[0], -(-shape[1] // 32))
    got = ref.dequantize_mxfp4(packed, scales, shape[1], torch.float32)
    assert got.tolist() == spec_decode(packed, scales, shape[1])


def test_rounding_rule_value_by_value():
    """Each element is the nearest E2M1 value of v / X (ties to the even pattern, saturating at 6), and the scale
    exponent is floor(log2(max |v|)) - 2, checked with exact float arithmetic in Python."""
    grid = [spec_e2m1(n) for n in range(8)]
    g = torch.Generator().manual_seed(3)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.25, -0.75, -5.0, 0.1, 4.0, 3.0, 0.5])
    w = torch.cat([ties, torch.randn(48, generator=g) * 3]).reshape(2, 32)
    w[0, 15] = 4.0  # block max 7 -> floor(log2 7) - 2 = 0: the ties above are scaled by exactly 1
    packed, scales = ref.quantize_mxfp4(w)
    decoded = spec_decode(packed, scales, 32)
    for r in range(2):
        amax = max(abs(v) for v in w[r].tolist())
        exp = math.floor(math.log2(amax)) - 2
        assert scales[r, 0].item() == exp + 127
        for v, q in zip(w[r].tolist(), decoded[r], strict=True):
            x = v / 2.0**exp
            mag = min(abs(x), 6.0)
            best = min(abs(mag - c) for c in grid)
            choices = [c for c in grid if abs(mag - c) == best]
            # ties: the even pattern (index 0, 2, 4, 6 in the magnitude list)
            want = choices[0] if len(choices) == 1 else next(c for c in choices if grid.index(c) % 2 == 0)
            assert abs(q) == want * 2.0**exp, (v, q, want)
            assert math.copysign(1.0, q) == math.copysign(1.0, v)
    assert decoded[0][:8] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_matches_torchao_mx_reference():
    """torchao's ``to_mx`` (FLOOR scale mode, the OCP conversion) gives the same scales and the same values."""
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    for shape in [(4, 64), (16, 256)]:
        w = weights(shape, seed=7)
        scale_e8m0, data = mx.to_mx(w, torch.float4_e2m1fn_x2, 32)
        packed, scales = ref.quantize_mxfp4(w)
        assert torch.equal(scale_e8m0.view(torch.uint8).reshape(scales.shape), scales)
        ours = ref.dequantize_mxfp4(packed, scales, shape[1], torch.float32)
        theirs = mx.to_dtype(data, scale_e8m0, torch.float4_e2m1fn_x2, 32, torch.float32)
        assert torch.equal(ours, theirs.reshape(shape))
        assert torch.equal(data.view(torch.uint8).reshape(packed.shape), packed)  # same bytes: low nibble first


def test_bits_per_weight_and_nonfinite_input():
    q = MXFP4Weight.from_float(torch.randn(4096, 4096), MXFP4Config())
    assert q.nbytes() * 8 / (4096 * 4096) <= 4.26
    bad = torch.randn(4, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="fc.weight"):
        MXFP4Weight.from_float(bad, MXFP4Config(), tensor_name="fc.weight")


def test_extreme_blocks_stay_finite():
    w = torch.tensor([[3.0e38] * 32, [1e-39] * 32, [-6.0] * 32])
    packed, scales = ref.quantize_mxfp4(w)
    assert scales.max().item() < 255
    back = ref.dequantize_mxfp4(packed, scales, 32, torch.float32)
    assert torch.isfinite(back).all()
    assert back[2].tolist() == [-6.0] * 32


# ------------------------------------------------------------------------- Triton kernels (interpreter on the CPU)
def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("shape", [*SHAPES, (5, 300)])
def test_triton_quantize_dequantize_bit_exact(shape):
    from qlora_kit.kernels import quant_mxfp4 as tk

    w = weights(shape, seed=11)
    packed, scales = tk.quantize_mxfp4(w)
    want_packed, want_scales = ref.quantize_mxfp4(w)
    assert torch.equal(packed, want_packed) and torch.equal(scales, want_scales)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = tk.dequantize_mxfp4(packed, scales, shape[1], dtype)
        assert torch.equal(_int_view(got), _int_view(ref.dequantize_mxfp4(packed, scales, shape[1], dtype)))


def test_triton_extreme_blocks_bit_exact():
    from qlora_kit.kernels import quant_mxfp4 as tk

    w = torch.tensor([[1e-39] * 32, [3.0e38] * 32, [0.0] * 31 + [-1e-45]])  # fp32 subnormals: E = 0, X = 2**-127
    packed, scales = tk.quantize_mxfp4(w)
    assert torch.equal(packed, ref.quantize_mxfp4(w)[0]) and torch.equal(scales, ref.quantize_mxfp4(w)[1])
    assert torch.equal(
        tk.dequantize_mxfp4(packed, scales, 32, torch.float32), ref.dequantize_mxfp4(packed, scales, 32, torch.float32)
    )


@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bf16 tl.dot is wrong
@pytest.mark.parametrize("n,k", [(48, 96), (33, 130), (40, 7)])
def test_triton_matmuls_match_the_reference(path, dtype, n, k):
    """forward and grad_input on each path: fp32 tight; fp16 within twice PyTorch's own fp16 error (vs fp64)."""
    from qlora_kit.kernels import matmul_mxfp4 as mk
    from qlora_kit.kernels import planner

    g = torch.Generator().manual_seed(n * k)
    packed, scales = ref.quantize_mxfp4(torch.randn(n, k, generator=g) * 0.1)
    w64 = ref.dequantize_mxfp4(packed, scales, k, torch.float64)
    for m in (1, 3, 20):
        x, dy = torch.randn(m, k, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        with planner.force_path(planner.MatmulPlan(path)):
            y = mk.matmul_mxfp4(x, packed, scales, k, bias)
            dx = mk.matmul_mxfp4_grad_input(dy, packed, scales, k)
        exact_y = x.double() @ w64.T + bias.double()
        exact_dx = dy.double() @ w64
        torch_y = ref.matmul_mxfp4_ref(x, packed, scales, k, bias)  # PyTorch's own product in dtype
        torch_dx = dy @ ref.dequantize_mxfp4(packed, scales, k, dtype)
        for got, exact, theirs in ((y, exact_y, torch_y), (dx, exact_dx, torch_dx)):
            assert got.dtype == dtype
            bound = 2 * (theirs.double() - exact).abs().max().item() if dtype != torch.float32 else 0.0
            assert (got.double() - exact).abs().max().item() <= max(bound, 1e-5 * (1 + exact.abs().max().item()))


def test_format_runs_the_triton_path_when_asked(monkeypatch):
    """QLORA_KIT_BACKEND=triton: the layer's custom op reaches the Triton kernels (interpreter) and agrees."""
    model = qlora_kit.quantize(
        _model(), qlora_kit.MXFP4Config(compute_dtype=torch.float32), filter_fn=lambda m, n: True
    )
    x = torch.randn(4, 64, requires_grad=True)
    y_ref = model(x)
    monkeypatch.setenv("QLORA_KIT_BACKEND", "triton")
    from qlora_kit.kernels import matmul_mxfp4 as mk

    orig, calls = mk.matmul_mxfp4, []

    def spy(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(mk, "matmul_mxfp4", spy)
    y = model(x)
    assert calls
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------- the format end to end
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 40))


def test_quantize_forward_backward_and_save_load(tmp_path):
    model = qlora_kit.quantize(
        _model(), qlora_kit.MXFP4Config(compute_dtype=torch.float32), filter_fn=lambda m, n: True
    )
    assert qlora_kit.memory_footprint(model)["mxfp4"] > 0
    x = torch.randn(5, 64, requires_grad=True)
    y = model(x)
    w0, w2 = (model[i].qweight.dequantize(torch.float32) for i in (0, 2))
    expected = torch.nn.functional.gelu(x @ w0.T + model[0].bias) @ w2.T + model[2].bias
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    qlora_kit.save_quantized(model, tmp_path / "q")
    loaded = qlora_kit.load_quantized(_model(), tmp_path / "q")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded(x.detach()), y.detach())


def test_lora_trains_over_mxfp4():
    model = qlora_kit.quantize(
        _model(), qlora_kit.MXFP4Config(compute_dtype=torch.float32), filter_fn=lambda m, n: True
    )
    model = qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.SGD(params, lr=0.1)
    x, target = torch.randn(16, 64), torch.randn(16, 40)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_cli_quantize_format_mxfp4(tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--format", "mxfp4", "--output", str(out)]) == 0
    qmap = json.loads((out / "quantization.json").read_text())
    assert {info["format"]["format"] for info in qmap["layers"].values()} == {"mxfp4"}


def test_struct_helper_sanity():
    """The spec decoder itself: the 16 E2M1 values, as the OCP table lists them."""
    assert [spec_e2m1(n) for n in range(8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert [spec_e2m1(n) for n in range(8, 16)] == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert spec_e8m0(127) == 1.0 and spec_e8m0(0) == 2.0**-127 == struct.unpack("<f", struct.pack("<I", 1 << 22))[0]
