"""Property tests (hypothesis): pack / unpack and quantize / dequantize of every weight format on random odd
shapes and awkward values, against the references in kernels/reference, bitsandbytes (NF4 / FP4), and the
formats' defining properties (nearest code, error bounds). About 2,100 examples per run (issue 14)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qlora_kit.kernels.reference import quant_4bit as ref4
from qlora_kit.kernels.reference import quant_int as refi

from qlora_kit import functional as F
from qlora_kit.configs import FP4Config, Int4WeightConfig, NF4Config
from qlora_kit.formats.base import get_format

bnbF = pytest.importorskip("bitsandbytes.functional")

COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATTERNS = ("randn", "zeros", "constant", "sparse", "tiny", "huge", "outlier_rows", "ties")


@st.composite
def weights(draw, max_rows: int = 9, max_cols: int = 300, dtypes=DTYPES):
    """A 2-D float weight of an odd shape (1..9 x 1..300) with a value pattern that stresses the formats."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    pattern = draw(st.sampled_from(PATTERNS))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(rows, cols, generator=g)
    if pattern == "zeros":
        w.zero_()
    elif pattern == "constant":
        w.fill_(draw(st.sampled_from([0.37, -2.5, 1.0])))
    elif pattern == "sparse":
        w *= torch.rand(rows, cols, generator=g) < 0.1
    elif pattern == "tiny":
        w *= 1e-30 if dtype != torch.float16 else 1e-6
    elif pattern == "huge":
        w *= 1e30 if dtype != torch.float16 else 1e3
    elif pattern == "outlier_rows":
        w[torch.randint(0, rows, (1,), generator=g)] *= 100
    elif pattern == "ties":  # values on the 4-bit codes' midpoints and exact codes
        w = torch.randint(-4, 5, (rows, cols), generator=g).float() / 4
    w = w.to(dtype)
    return w if torch.isfinite(w).all() else torch.nan_to_num(w, posinf=1.0, neginf=-1.0)


# ----- packing --------------------------------------------------------------------------------------------
@settings(max_examples=300, **COMMON)
@given(n=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1))
def test_nibble_pack_unpack_roundtrip(n, seed):
    q = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = ref4.pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(ref4.unpack_nibbles(packed, n), q.long())
    if n:  # element 2i in the high nibble, 2i + 1 in the low one (bitsandbytes' layout)
        assert int(packed[0]) >> 4 == int(q[0])
        if n % 2:
            assert int(packed[-1]) & 0xF == 0  # an odd tail pads a zero nibble


@settings(max_examples=300, **COMMON)
@given(rows=st.integers(1, 9), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_int4_pack_unpack_roundtrip(rows, cols, seed):
    q = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = refi.pack_int4(q)
    assert packed.shape == (rows, math.ceil(cols / 2))
    assert torch.equal(refi.unpack_int4(packed, cols), q)
    assert torch.equal(packed[:, 0] >> 4, q[:, 0])


# ----- NF4 / FP4 --------------------------------------------------------------------------------------------
def _bnb_generic_dequantize(q, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' own pure-PyTorch 4-bit dequantize (see test_quant_4bit.py for why not its native one),
    called eagerly: its torch.compile wrapper would recompile for every new shape."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd
    code = _get_4bit_code(quant_type, q.device)
    return eager(q.reshape(-1), absmax, code, blocksize, shape, dtype).reshape(shape)


@settings(max_examples=400, **COMMON)
@given(w=weights(), quant_type=st.sampled_from(("nf4", "fp4")), blocksize=st.sampled_from(ref4.BLOCKSIZES),
       out_dtype=st.sampled_from(DTYPES))  # fmt: skip
def test_4bit_matches_bitsandbytes_byte_for_byte(w, quant_type, blocksize, out_dtype):
    q, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    quantize = F.quantize_nf4 if quant_type == "nf4" else F.quantize_fp4
    packed, absmax = quantize(w, blocksize)
    assert torch.equal(packed, q.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    dequantize = F.dequantize_nf4 if quant_type == "nf4" else F.dequantize_fp4
    got = dequantize(packed, absmax, w.shape, blocksize, out_dtype)
    assert torch.equal(got, _bnb_generic_dequantize(q, state.absmax, blocksize, quant_type, w.shape, out_dtype))


@settings(max_examples=300, **COMMON)
@given(w=weights(), quant_type=st.sampled_from(("nf4", "fp4")), blocksize=st.sampled_from(ref4.BLOCKSIZES),
       double_quant=st.booleans())  # fmt: skip
def test_4bit_format_is_nearest_code_per_block(w, quant_type, blocksize, double_quant):
    cfg = (NF4Config if quant_type == "nf4" else FP4Config)(blocksize=blocksize, double_quant=double_quant)
    obj = get_format(quant_type).from_float(w, cfg)
    flat = w.reshape(-1).float()
    n = flat.numel()
    packed, absmax = ref4.quantize_4bit(w, blocksize, quant_type)
    assert torch.equal(obj.packed, packed)
    # absmax: the block's max |w| (bitsandbytes clamps an all-zero tail block to 1e-38)
    blocks = torch.nn.functional.pad(flat.abs(), (0, -n % blocksize)).reshape(-1, blocksize).amax(1)
    assert torch.equal(absmax[blocks > 0], blocks[blocks > 0])
    # every code is a nearest code of w / absmax (ties either way)
    code = ref4.code_table(quant_type)
    scaled = (flat / absmax.clamp(min=1e-38).repeat_interleave(blocksize)[:n]).clamp(-1, 1)
    got = (scaled - code[ref4.unpack_nibbles(packed, n)]).abs()
    best = (scaled[:, None] - code[None, :]).abs().amin(1)
    assert bool((got <= best + 1e-6).all())
    # dequantize = code * absmax of the stored (maybe double-quantized) block scale, in fp32, then cast
    scales = obj.block_absmax()
    if double_quant:
        assert torch.equal(scales, ref4.double_dequantize(*ref4.double_quantize(absmax)))
    expect = ref4.dequantize_4bit(packed, scales, w.shape, blocksize, quant_type, torch.float32)
    assert torch.equal(obj.dequantize(torch.float32), expect)


# ----- int8 / int4 / fp8 ------------------------------------------------------------------------------------
@settings(max_examples=300, **COMMON)
@given(w=weights())
def test_int8_format_rounds_to_nearest_within_half_a_step(w):
    obj = get_format("int8").from_float(w)
    q, scale = refi.quantize_int8(w)
    assert torch.equal(obj.qdata, q) and torch.equal(obj.scale, scale)
    wf = w.float()
    absmax = wf.abs().amax(1)
    assert torch.equal(scale, torch.where(absmax / 127 == 0, torch.ones_like(absmax), absmax / 127))
    assert int(q.abs().max()) <= 127
    deq = obj.dequantize(torch.float32)
    assert torch.equal(deq, refi.dequantize_int8(q, scale, torch.float32))
    assert bool(((deq - wf).abs() <= scale[:, None] * (0.5 + 1e-5)).all())


@settings(max_examples=300, **COMMON)
@given(w=weights(), group_size=st.sampled_from((32, 64, 128)))
def test_int4_format_stays_within_one_step(w, group_size):
    obj = get_format("int4").from_float(w, Int4WeightConfig(group_size=group_size))
    packed, scale, zero = refi.quantize_int4(w, group_size)
    assert torch.equal(obj.packed, packed) and torch.equal(obj.scale, scale) and torch.equal(obj.zero, zero)
    rows, cols = w.shape
    assert scale.shape == zero.shape == (rows, math.ceil(cols / group_size))
    assert bool(((zero >= 0) & (zero <= 15) & (zero == zero.round())).all())
    deq = obj.dequantize(torch.float32)
    assert torch.equal(deq, refi.dequantize_int4(packed, scale, zero, cols, group_size, torch.float32))
    step = scale.float().repeat_interleave(group_size, dim=1)[:, :cols]
    assert bool(((deq - w.float()).abs() <= 1.1 * step + 1e-30).all())


@settings(max_examples=200, **COMMON)
@given(w=weights())
def test_fp8_format_relative_error(w):
    obj = get_format("fp8").from_float(w)
    q, scale = refi.quantize_fp8(w)
    assert torch.equal(obj.qdata.view(torch.uint8), q.view(torch.uint8)) and torch.equal(obj.scale, scale)
    assert float(q.float().abs().max()) <= 448
    deq = obj.dequantize(torch.float32)
    assert torch.equal(deq, refi.dequantize_fp8(q, scale, torch.float32))
    wf = w.float()
    # e4m3: 3 mantissa bits (relative 2**-4 after rounding), subnormals down to 2**-9 of the scale
    bound = wf.abs() * 2**-4 + scale[:, None] * 2**-9 * (1 + 1e-6)
    assert bool(((deq - wf).abs() <= bound * (1 + 1e-6)).all())
