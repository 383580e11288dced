"""int8 / int4 / fp8 weight formats: Triton kernels (interpreter on CPU) bit-exact with the PyTorch reference,
hand-computed answers, quantization error bounds, edge values, and the format objects."""

import json
import math
import subprocess
import sys

import pytest
import torch
from qlora_kit.kernels import quant_int as tk
from qlora_kit.kernels.reference import quant_int as ref

from qlora_kit.configs import FP8WeightConfig, Int4WeightConfig, Int8WeightConfig
from qlora_kit.formats.base import get_format
from qlora_kit.formats.fp8 import FP8Weight
from qlora_kit.formats.int4 import Int4Weight
from qlora_kit.formats.int8 import Int8Weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 17), (17, 65), (33, 130)]
GROUP_SIZES = [32, 64, 128]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor, so comparisons see -0.0 vs 0.0 and NaN payloads."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (bits(actual) != bits(expected)).nonzero()
    assert diff.numel() == 0, f"{len(diff)} elements differ, first at {diff[0].tolist()}"


def special_matrix(dtype: torch.dtype, cols: int = 70) -> torch.Tensor:
    """Rows that stress the formats: zeros, constants, huge / tiny magnitudes, -0.0, exact rounding ties."""
    big = 1e30 if dtype != torch.float16 else 1.5e4  # randn * 1.5e4 stays below 65504
    tiny = 1e-30 if dtype != torch.float16 else 1e-6  # fp16: subnormal inputs
    g = torch.Generator().manual_seed(1)
    rows = [
        torch.randn(cols, generator=g),
        torch.zeros(cols),
        torch.full((cols,), 0.7),
        torch.full((cols,), -3.0),
        torch.randn(cols, generator=g) * big,
        torch.randn(cols, generator=g) * tiny,
        torch.where(torch.arange(cols) % 2 == 0, big, tiny) * torch.sign(torch.randn(cols, generator=g)),
        torch.full((cols,), -0.0),
        torch.zeros(cols).index_fill_(0, torch.tensor([cols - 1]), -2.5),  # one value, in the last (partial) group
        # scale 1.0 for int8 (absmax 127): k + 0.5 are exact ties
        torch.cat([torch.tensor([127.0]), torch.arange(cols - 1) % 40 - 20.5]),
        # scale 1.0, zero 0 for int4 in every group of 32 (min 0, max 15): ties k + 0.5
        torch.where(torch.arange(cols) % 32 == 0, 15.0, (torch.arange(cols) % 15) + 0.5),
        # scale 1.0 for fp8 (absmax 448): midpoints between neighbouring e4m3 values
        torch.cat([torch.tensor([448.0, -0.0]), torch.linspace(-300, 300, cols - 2).round() + 0.5]),
    ]
    return torch.stack(rows).to(dtype)


# ------------------------------------------------------------------------ Triton == reference, bit for bit


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rowwise_triton_matches_reference(fmt, shape, dtype):
    w = (torch.randn(shape) * 3).to(dtype)
    q_ref, s_ref = getattr(ref, f"quantize_{fmt}")(w)
    q_tri, s_tri = getattr(tk, f"quantize_{fmt}")(w)
    assert_bits_equal(q_tri, q_ref)
    assert_bits_equal(s_tri, s_ref)
    for out_dtype in DTYPES:
        expected = getattr(ref, f"dequantize_{fmt}")(q_ref, s_ref, out_dtype)
        assert_bits_equal(getattr(tk, f"dequantize_{fmt}")(q_ref, s_ref, out_dtype), expected)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int4_triton_matches_reference(group_size, shape, dtype):
    w = (torch.randn(shape) + 0.3).to(dtype)  # off-centre: zero points vary
    expected = ref.quantize_int4(w, group_size)
    for actual, exp in zip(tk.quantize_int4(w, group_size), expected, strict=True):
        assert_bits_equal(actual, exp)
    for out_dtype in DTYPES:
        deq = ref.dequantize_int4(*expected, shape[1], group_size, out_dtype)
        assert_bits_equal(tk.dequantize_int4(*expected, shape[1], group_size, out_dtype), deq)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_bit_exact(dtype):
    for cols in (70, 37):
        w = special_matrix(dtype, cols)
        for fmt in ("int8", "fp8"):
            q_ref, s_ref = getattr(ref, f"quantize_{fmt}")(w)
            q_tri, s_tri = getattr(tk, f"quantize_{fmt}")(w)
            assert_bits_equal(q_tri, q_ref)
            assert_bits_equal(s_tri, s_ref)
            expected = getattr(ref, f"dequantize_{fmt}")(q_ref, s_ref, dtype)
            assert_bits_equal(getattr(tk, f"dequantize_{fmt}")(q_ref, s_ref, dtype), expected)
        for group_size in (32, 128):
            expected = ref.quantize_int4(w, group_size)
            for actual, exp in zip(tk.quantize_int4(w, group_size), expected, strict=True):
                assert_bits_equal(actual, exp)
            deq = ref.dequantize_int4(*expected, cols, group_size, dtype)
            assert_bits_equal(tk.dequantize_int4(*expected, cols, group_size, dtype), deq)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_empty_matrices(shape):
    w = torch.empty(shape)
    for impl in (ref, tk):
        q, s = impl.quantize_int8(w)
        assert q.shape == shape and s.shape == (shape[0],)
        assert impl.dequantize_int8(q, s, torch.float32).shape == shape
        q, s = impl.quantize_fp8(w)
        assert q.shape == shape and s.shape == (shape[0],)
        packed, scale, zero = impl.quantize_int4(w, 32)
        assert packed.shape == (shape[0], (shape[1] + 1) // 2)
        assert scale.shape == zero.shape == (shape[0], math.ceil(shape[1] / 32))
        assert impl.dequantize_int4(packed, scale, zero, shape[1], 32, torch.float32).shape == shape


# ------------------------------------------------------------------------------------ hand-computed answers


def test_int8_known_answer():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for impl in (ref, tk):
        q, s = impl.quantize_int8(w)
        assert s.tolist() == [torch.tensor(2.0 / 127, dtype=torch.float32).item(), 1.0]
        # 1 / (2/127) = 63.5 -> 64 (half to even), 0.5 -> 31.75 -> 32
        assert q.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0]]


def test_int4_known_answer():
    # one group of 4: mn = -1, mx = 2, scale = bf16(3 / 15) = 0.2001953125, zero = round(4.995) = 5,
    # q = round(w / s) + 5 = [0, 5, 10, 15] -> bytes 0x05, 0xAF (column 2j in the high nibble)
    w = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    for impl in (ref, tk):
        packed, scale, zero = impl.quantize_int4(w, 4)
        assert scale.dtype == zero.dtype == torch.bfloat16
        assert scale.item() == 0.2001953125 and zero.item() == 5.0
        assert packed.tolist() == [[0x05, 0xAF]]
        deq = impl.dequantize_int4(packed, scale, zero, 4, 4, torch.float32)
        assert deq.tolist() == [[-5 * 0.2001953125, 0.0, 5 * 0.2001953125, 10 * 0.2001953125]]


def test_int4_odd_columns_pad_low_nibble_with_zero():
    w = torch.tensor([[15.0, 1.0, 2.0]])  # scale 1, zero 0
    for impl in (ref, tk):
        packed, _, _ = impl.quantize_int4(w, 4)
        assert packed.tolist() == [[0xF1, 0x20]]


def test_fp8_known_answer():
    w = torch.tensor([[448.0, -1.0, 0.0, -0.0, 2.0**-9, 3 * 2.0**-10, 1.0625, 1.1875]])
    # e4m3fn bytes: 448 = 0x7E, -1 = 0xB8, +0, -0 = 0x80, 2^-9 = 0x01 (smallest subnormal),
    # 1.5 * 2^-9 ties to even -> 2^-8 = 0x02, 1.0625 ties to 1.0 (0x38), 1.1875 ties to 1.25 (0x3A)
    for impl in (ref, tk):
        q, s = impl.quantize_fp8(w)
        assert s.tolist() == [1.0]
        assert q.view(torch.uint8).tolist() == [[0x7E, 0xB8, 0x00, 0x80, 0x01, 0x02, 0x38, 0x3A]]


def test_int4_partial_group_counts_only_real_columns():
    w = torch.randn(5, 40) + 2.0  # mostly positive: padding with other values would change min / max
    scale, zero = ref.int4_params(w, 32)
    alone_scale, alone_zero = ref.int4_params(w[:, 32:], 32)
    assert_bits_equal(scale[:, 1:], alone_scale)
    assert_bits_equal(zero[:, 1:], alone_zero)


# ---------------------------------------------------------------------------------------------- fp8 codec


def _fp8_values() -> torch.Tensor:
    """Every finite e4m3fn value, the exact midpoints between neighbours, and their fp32 neighbours."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    pos = codes.view(torch.float8_e4m3fn).float()
    mid = (pos[1:] + pos[:-1]) / 2
    mid_bits = mid.view(torch.int32)
    around = torch.cat([mid, (mid_bits + 1).view(torch.float32), (mid_bits - 1).view(torch.float32)])
    tiny = torch.tensor([1e-40, 2.0**-10, 2.0**-12, 5e-3, 2.0**-6 - 2.0**-10, 2.0**-6 + 2.0**-11, 447.9, 440.0])
    g = torch.Generator().manual_seed(2)
    rand = torch.cat([torch.rand(2000, generator=g) * 448, torch.exp2(torch.rand(2000, generator=g) * 24 - 15)])
    v = torch.cat([pos, around, tiny, rand]).clamp(max=448.0)
    return torch.cat([v, -v])


def test_fp8_triton_encoder_matches_torch_cast():
    v = _fp8_values()
    cols = 128
    rows = math.ceil(v.numel() / (cols - 1))
    v = torch.cat([v, torch.zeros(rows * (cols - 1) - v.numel())]).reshape(rows, cols - 1)
    w = torch.cat([torch.full((rows, 1), 448.0), v], dim=1)  # absmax 448 -> scale exactly 1.0
    q, s = tk.quantize_fp8(w)
    assert torch.all(s == 1.0)
    assert_bits_equal(q, w.to(torch.float8_e4m3fn))


def test_fp8_reference_is_torch_cast():
    w = special_matrix(torch.float32)
    q, s = ref.quantize_fp8(w)
    assert_bits_equal(q, (w / s[:, None]).to(torch.float8_e4m3fn))
    assert torch.equal(s, torch.where(w.abs().amax(1) == 0, 1.0, w.abs().amax(1) / 448))


def test_fp8_triton_decoder_all_codes():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    scale = torch.ones(2)
    expected = codes.float()
    got = tk.dequantize_fp8(codes, scale, torch.float32)
    nan = torch.isnan(expected)
    assert nan.sum() == 2 and torch.equal(torch.isnan(got), nan)
    assert_bits_equal(got[~nan], expected[~nan])  # includes -0.0 and the subnormals
    for dtype in (torch.float16, torch.bfloat16):
        assert_bits_equal(tk.dequantize_fp8(codes, scale, dtype)[~nan], ref.dequantize_fp8(codes, scale, dtype)[~nan])


def test_dequantize_rounds_bf16_half_to_even():
    # bf16 keeps 7 fraction bits: near 1.0 its step is 2^-7. The interpreter truncates fp32 -> bf16 casts,
    # the kernels must round to nearest even like PyTorch (and like the GPU).
    qdata = torch.tensor([[1, -1]], dtype=torch.int8)
    cases = (
        (1 + 2.0**-8, 1.0),  # tie between 1 and 1 + 2^-7: to even, down
        (1 + 3 * 2.0**-8, 1 + 2.0**-6),  # tie between 1 + 2^-7 and 1 + 2^-6: to even, up
        (1 + 3 * 2.0**-9, 1 + 2.0**-7),  # not a tie: nearest, up (truncation would give 1.0)
    )
    for scale, expected in cases:
        s = torch.tensor([scale])
        got = tk.dequantize_int8(qdata, s, torch.bfloat16)
        assert got.float().tolist() == [[expected, -expected]]
        assert_bits_equal(got, ref.dequantize_int8(qdata, s, torch.bfloat16))


# -------------------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("impl", [ref, tk], ids=["reference", "triton"])
def test_int8_error_bound(impl):
    w = torch.cat([torch.randn(16, 96) * torch.logspace(-3, 3, 16)[:, None], special_matrix(torch.float32, 96)])
    q, s = impl.quantize_int8(w)
    err = (w - impl.dequantize_int8(q, s, torch.float32)).abs()
    # |w / s - q| <= 1/2; the fp32 roundings of w / s and q * s add at most ~2 * 127 * 2^-24 steps
    assert torch.all(err <= s[:, None] * (0.5 + 2.0**-15))
    assert torch.all(q.abs() <= 127)


@pytest.mark.parametrize("impl", [ref, tk], ids=["reference", "triton"])
def test_int4_error_bound(impl):
    w = torch.cat([torch.randn(16, 96) * torch.logspace(-3, 3, 16)[:, None] + 0.5, special_matrix(torch.float32, 96)])
    packed, scale, zero = impl.quantize_int4(w, 32)
    err = (w - impl.dequantize_int4(packed, scale, zero, 96, 32, torch.float32)).abs()
    s = scale.float().repeat_interleave(32, dim=1)
    # rounding costs at most s / 2. Rounding the scale to bf16 (relative error <= 2^-9) can shrink the
    # representable range by up to 15 * 2^-9 / (1 - 2^-9) < 2^-5 steps, which the top of a group may clip.
    assert torch.all(err <= s * (0.5 + 2.0**-5))
    clipped = ref.unpack_int4(packed, 96) == 15  # beyond s / 2 only where the top code clipped
    assert torch.all((err <= s * (0.5 + 2.0**-15)) | clipped)
    assert torch.all((zero >= 0) & (zero <= 15) & (zero == zero.round()))


@pytest.mark.parametrize("impl", [ref, tk], ids=["reference", "triton"])
def test_fp8_error_bound(impl):
    w = torch.cat([torch.randn(16, 96) * torch.logspace(-3, 3, 16)[:, None], special_matrix(torch.float32, 96)])
    q, s = impl.quantize_fp8(w)
    deq = impl.dequantize_fp8(q, s, torch.float32)
    err = (w - deq).abs()
    scaled = (w / s[:, None]).abs()
    normal = scaled >= 2.0**-6
    # 3 mantissa bits: relative error <= 2^-4 for normal values; subnormal steps are 2^-9 * scale
    assert torch.all(err[normal] <= w.abs()[normal] * (2.0**-4 + 2.0**-20))
    sub_bound = (s[:, None] * 2.0**-10 * (1 + 2.0**-20)).expand_as(w)
    assert torch.all(err[~normal] <= sub_bound[~normal])


# --------------------------------------------------------------------------- int4 with given scale / zero


def test_int4_with_params_triton_matches_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 77, generator=g)
    ngroups = math.ceil(77 / 32)
    scale = (torch.rand(9, ngroups, generator=g) * 0.3 + 0.05).to(torch.bfloat16)
    zero = (torch.rand(9, ngroups, generator=g) * 15).to(torch.bfloat16)  # fractional, as HQQ makes them
    zero[0, 0], zero[0, 1], zero[1, 0] = 7.5, 0.5, 8.0  # zero-point ties and an integer
    expected = ref.int4_quantize_with_params(w, scale, zero, 32)
    assert_bits_equal(tk.int4_quantize_with_params(w, scale, zero, 32), expected)
    # with fractional zeros the codes are round(w / s + zero): the best ones for (q - zero) * s
    q = ref.unpack_int4(expected, 77).float()
    s = scale.float().repeat_interleave(32, dim=1)[:, :77]
    z = zero.float().repeat_interleave(32, dim=1)[:, :77]
    ideal = torch.clamp(w / s + z, 0, 15)
    assert torch.all((q - ideal).abs() <= 0.5 + 1e-5)


def test_int4_rtn_equals_with_params_on_its_own_params():
    w = torch.randn(6, 100) * 2 - 0.5
    packed, scale, zero = ref.quantize_int4(w, 64)
    assert_bits_equal(ref.int4_quantize_with_params(w, scale, zero, 64), packed)
    assert_bits_equal(tk.int4_quantize_with_params(w, scale, zero, 64), packed)


def test_int4_with_params_validates():
    w = torch.randn(2, 40)
    good = torch.ones(2, 2, dtype=torch.bfloat16)
    for impl in (ref, tk):
        with pytest.raises(ValueError, match="shape"):
            impl.int4_quantize_with_params(w, torch.ones(2, 1), good, 32)
        with pytest.raises(ValueError, match="nonzero and finite"):
            impl.int4_quantize_with_params(w, torch.zeros(2, 2), good, 32)
        with pytest.raises(ValueError, match="power of two"):
            impl.quantize_int4(w, 48)


def test_pack_unpack_round_trip():
    for cols in (1, 2, 7, 64):
        q = torch.randint(0, 16, (3, cols), dtype=torch.uint8)
        packed = ref.pack_int4(q)
        assert packed.shape == (3, (cols + 1) // 2)
        assert_bits_equal(ref.unpack_int4(packed, cols), q)
        assert torch.equal(packed[:, 0] >> 4, q[:, 0])  # column 0 in the high nibble


# ------------------------------------------------------------------------------------------ format objects

CONFIGS = {
    "int8": (Int8Weight, Int8WeightConfig()),
    "int4": (Int4Weight, Int4WeightConfig(group_size=32)),
    "fp8": (FP8Weight, FP8WeightConfig()),
}


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_nan_inf_raise_naming_the_tensor(fmt):
    cls, config = CONFIGS[fmt]
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(3, 17)
        w[1, 4] = bad
        with pytest.raises(ValueError, match=r"layers\.0\.mlp\.weight"):
            cls.from_float(w, config, tensor_name="layers.0.mlp.weight")
    with pytest.raises(ValueError, match="big.weight"):
        cls.from_float(torch.full((2, 4), 1e6).half(), config, tensor_name="big.weight")  # fp16 overflow: inf


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_format_round_trip_through_state_dict(fmt):
    cls, config = CONFIGS[fmt]
    w = torch.randn(5, 70)
    qw = cls.from_float(w, config, tensor_name="w")
    assert get_format(fmt) is cls and qw.name == fmt and qw.shape == (5, 70)
    meta = json.loads(json.dumps(qw.metadata()))
    assert meta["format"] == fmt and meta["shape"] == [5, 70]
    loaded = cls.from_metadata(meta)
    loaded.load_state_dict(qw.state_dict())
    for name, buf in qw.state_dict().items():
        assert_bits_equal(loaded.state_dict()[name], buf)
    assert_bits_equal(loaded.dequantize(torch.bfloat16), qw.dequantize(torch.bfloat16))
    assert loaded.nbytes() == qw.nbytes()


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_transposed_input_gives_contiguous_buffers(fmt, monkeypatch):
    # GPT-2's Conv1D hands the formats W^T as a view; the stored codes must still be row-major
    cls, config = CONFIGS[fmt]
    w = torch.randn(70, 5)
    for backend in ("reference", "triton"):
        monkeypatch.setenv("QLORA_KIT_BACKEND", backend)
        qw, expected = cls.from_float(w.t(), config), cls.from_float(w.t().contiguous(), config)
        tensors = list(qw.named_parameters())
        assert tensors
        for name, buf in tensors:
            assert buf.is_contiguous(), (backend, name)
            assert_bits_equal(buf, getattr(expected, name))


def test_nbytes():
    w = torch.randn(3, 17)
    assert Int8Weight.from_float(w, Int8WeightConfig()).nbytes() == 3 * 17 + 3 * 4
    assert FP8Weight.from_float(w, FP8WeightConfig()).nbytes() == 3 * 17 + 3 * 4
    # 9 bytes of codes per row, one bf16 scale and one bf16 zero per (row, group)
    assert Int4Weight.from_float(w, Int4WeightConfig(group_size=32)).nbytes() == 3 * 9 + 2 * 3 * 1 * 2
    w = torch.randn(4, 300)
    assert Int4Weight.from_float(w, Int4WeightConfig(group_size=128)).nbytes() == 4 * 150 + 2 * 4 * 3 * 2


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_backend_dispatch(fmt, monkeypatch):
    cls, config = CONFIGS[fmt]
    names = {"int8": "int8", "int4": "int4", "fp8": "fp8"}
    quant, dequant = f"quantize_{names[fmt]}", f"dequantize_{names[fmt]}"
    calls = []
    for module, label in ((ref, "reference"), (tk, "triton")):
        for fn_name in (quant, dequant):
            original = getattr(module, fn_name)

            def spy(*args, _original=original, _label=label, **kwargs):
                calls.append(_label)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, fn_name, spy)
    w = torch.randn(4, 40)
    monkeypatch.delenv("QLORA_KIT_BACKEND", raising=False)
    expected = cls.from_float(w, config).dequantize(torch.float32)
    assert calls == ["reference", "reference"]  # CPU tensors run the reference
    calls.clear()
    monkeypatch.setenv("QLORA_KIT_BACKEND", "triton")
    assert_bits_equal(cls.from_float(w, config).dequantize(torch.float32), expected)
    assert calls == ["triton", "triton"]
    calls.clear()
    monkeypatch.setenv("QLORA_KIT_BACKEND", "reference")
    cls.from_float(w, config)
    assert calls == ["reference"]


def test_int4_from_params_and_group_size_checks():
    w = torch.randn(4, 70)
    scale, zero = ref.int4_params(w, 64)
    qw = Int4Weight.from_params(w, scale.float(), zero.float(), 64)
    assert_bits_equal(qw.packed, ref.quantize_int4(w, 64)[0])
    with pytest.raises(ValueError, match="power of two"):
        Int4Weight((4, 70), 48)
    with pytest.raises(ValueError, match="scale"):
        Int4Weight((4, 70), 64, qw.packed, scale.float(), zero)


def test_triton_launcher_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.quantize_int8(torch.randn(2, 3))


def test_format_modules_import_no_triton():
    code = (
        "import sys; import qlora_kit.formats.int8, qlora_kit.formats.int4, qlora_kit.formats.fp8, "
        "qlora_kit.kernels.reference.quant_int; "
        "bad = [m for m in ('triton', 'bitsandbytes', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad; import torch; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_match_cpu_reference(dtype):
    for shape in [(1, 1), (33, 130), (257, 4099)]:
        w = (torch.randn(shape) * 2 + 0.1).to(dtype)
        wc = w.cuda()
        for fmt in ("int8", "fp8"):
            q_ref, s_ref = getattr(ref, f"quantize_{fmt}")(w)
            q, s = getattr(tk, f"quantize_{fmt}")(wc)
            assert_bits_equal(q.cpu(), q_ref)
            assert_bits_equal(s.cpu(), s_ref)
            for out_dtype in DTYPES:
                deq = getattr(tk, f"dequantize_{fmt}")(q, s, out_dtype).cpu()
                assert_bits_equal(deq, getattr(ref, f"dequantize_{fmt}")(q_ref, s_ref, out_dtype))
        for group_size in GROUP_SIZES:
            expected = ref.quantize_int4(w, group_size)
            got = tk.quantize_int4(wc, group_size)
            for actual, exp in zip(got, expected, strict=True):
                assert_bits_equal(actual.cpu(), exp)
            for out_dtype in DTYPES:
                deq = tk.dequantize_int4(*got, shape[1], group_size, out_dtype).cpu()
                assert_bits_equal(deq, ref.dequantize_int4(*expected, shape[1], group_size, out_dtype))


@pytest.mark.cuda
def test_cuda_fp8_encoder_and_special_values():
    test_fp8_triton_encoder_matches_torch_cast_on = _fp8_values().reshape(-1, 1)
    v = test_fp8_triton_encoder_matches_torch_cast_on
    w = torch.cat([torch.full_like(v, 448.0), v], dim=1).cuda()
    q, _ = tk.quantize_fp8(w)
    assert_bits_equal(q.cpu(), w.cpu().to(torch.float8_e4m3fn))
    for dtype in DTYPES:
        w = special_matrix(dtype)
        for fmt in ("int8", "fp8"):
            q_ref, _ = getattr(ref, f"quantize_{fmt}")(w)
            assert_bits_equal(getattr(tk, f"quantize_{fmt}")(w.cuda())[0].cpu(), q_ref)
        assert_bits_equal(tk.quantize_int4(w.cuda(), 32)[0].cpu(), ref.quantize_int4(w, 32)[0])


def test_int4_codes_rtn_has_no_extra_rounding():
    # w / s = 0.5 - 2^-25 lies below the tie; in fp32, adding an integer zero of 7 first would round the
    # sum up to the tie 7.5 (and then to 8). The format rounds w / s on its own: 0 + 7 = 7.
    s = torch.tensor([1.0])
    w = torch.tensor([0.5 - 2.0**-25])
    assert ref.int4_codes(w, s, torch.tensor([7.0])).item() == 7.0
    packed = ref.int4_quantize_with_params(w.reshape(1, 1), s.reshape(1, 1), torch.tensor([[7.0]]), 32)
    assert packed.item() == 7 << 4
    assert tk.int4_quantize_with_params(w.reshape(1, 1), s.reshape(1, 1), torch.tensor([[7.0]]), 32).item() == 7 << 4


def test_configs_validate_group_size():
    assert Int4WeightConfig().group_size == 128
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightConfig(group_size=48)
