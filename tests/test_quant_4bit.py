"""NF4 / FP4: reference vs bitsandbytes (byte for byte), Triton (interpreter) vs reference (bit-exact)."""

import math

import pytest
import torch
from qlora_kit.kernels import quant_4bit as triton_impl
from qlora_kit.kernels.reference import quant_4bit as ref

import qlora_kit
from qlora_kit import functional as F

bnbF = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = ref.BLOCKSIZES
QUANT_TYPES = ("nf4", "fp4")


def _weights():
    """Shapes whose size is not a multiple of the blocksize, zero/constant blocks, extreme magnitudes."""
    g = torch.Generator().manual_seed(0)
    yield "odd", torch.randn(7, 33, generator=g) * 3
    yield "one", torch.randn(1, 1, generator=g)
    yield "long", torch.randn(3, 700, generator=g)
    w = torch.randn(4, 128, generator=g)
    w[1] = 0.0  # all-zero blocks
    w[2] = 0.37  # constant blocks
    w[3, :64] = -2.5
    yield "zero_constant", w
    yield "large", torch.randn(5, 96, generator=g) * 1e30
    yield "small", torch.randn(5, 96, generator=g) * 1e-30
    yield "all_zero", torch.zeros(2, 64)
    yield "all_const", torch.full((3, 64), 0.37)


WEIGHTS = list(_weights())


def _bnb_generic_dequantize(q, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' own pure-PyTorch 4-bit dequantize (its default backend; also what its CPU backend uses for
    odd shapes). Its native AVX-512 CPU kernel (bitsandbytes 0.50.2) reads the wrong absmax for some shapes whose
    row length is not a multiple of the blocksize (5x96 at blocksize 64: 285 of 480 values differ from this
    path, measured), so the byte-level contract is checked against this path, and against the native kernel
    wherever the two agree."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(quant_type, q.device)
    return _dequantize_4bit_compute(q.reshape(-1), absmax, code, blocksize, shape, dtype).reshape(shape)


def test_tables_match_bitsandbytes():
    assert torch.equal(ref.NF4_CODE, bnbF.get_4bit_type("nf4", "cpu"))
    assert torch.equal(ref.FP4_CODE, bnbF.get_4bit_type("fp4", "cpu"))
    assert torch.equal(ref.DYNAMIC_MAP, bnbF.create_dynamic_map())


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_reference_matches_bitsandbytes(quant_type, blocksize):
    for label, w in WEIGHTS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            wd = w.to(dtype)
            if not torch.isfinite(wd).all():
                continue  # 1e30 overflows fp16 / is fine in bf16
            q, state = bnbF.quantize_4bit(wd, blocksize=blocksize, quant_type=quant_type)
            packed, absmax = F.quantize_nf4(wd, blocksize) if quant_type == "nf4" else F.quantize_fp4(wd, blocksize)
            assert packed.numel() == math.ceil(wd.numel() / 2)
            assert absmax.shape == (math.ceil(wd.numel() / blocksize),)
            assert torch.equal(packed, q.reshape(-1)), (label, dtype)
            assert torch.equal(absmax, state.absmax), (label, dtype)
            for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                state.dtype = out_dtype
                native = bnbF.dequantize_4bit(q, state).reshape(wd.shape)
                generic = _bnb_generic_dequantize(q, state.absmax, blocksize, quant_type, wd.shape, out_dtype)
                deq = F.dequantize_nf4 if quant_type == "nf4" else F.dequantize_fp4
                got = deq(packed, absmax, wd.shape, blocksize, out_dtype)
                assert torch.equal(got, generic), (label, dtype, out_dtype)
                # bitsandbytes' native CPU kernel disagrees with its own generic path on some shapes (see
                # _bnb_generic_dequantize); everywhere else we equal it too
                same = native == generic
                assert torch.equal(got[same], native[same]), (label, dtype, out_dtype)
                if wd.shape[-1] % blocksize == 0:
                    assert same.all(), (label, dtype, out_dtype)


def _bnb_generic_quantize_blockwise(x, blocksize=256):
    """bitsandbytes' own pure-PyTorch 8-bit quantize_blockwise (its "default" kernel, which its CUDA kernel
    implements too), called past its native CPU kernel."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    code = bnbF.create_dynamic_map().float()
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, blocksize)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_double_quant_matches_bitsandbytes(blocksize):
    """Bit for bit: the same offset, nested absmax and qabsmax as bitsandbytes' compress_statistics=True with
    its generic 8-bit path. Its native CPU kernel searches a lookup table that picks the second-nearest code
    near midpoints and near zero: against it, offset and nested absmax are equal and every differing qabsmax
    is one where ours is the nearest code and its is not."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(64, 1000, generator=g), torch.randn(3, 700, generator=g), torch.full((3, 64), 0.37)]
    weights += [w for _, w in WEIGHTS]
    for w in weights:
        q, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        packed, absmax = F.quantize_nf4(w, blocksize)
        qabsmax, nested, offset = F.double_quantize(absmax)
        assert torch.equal(packed, q.reshape(-1))
        assert torch.equal(offset, state.offset)
        generic_q, generic_nested = _bnb_generic_quantize_blockwise(absmax - offset)
        assert torch.equal(qabsmax, generic_q)
        assert torch.equal(nested, generic_nested)
        # an all-zero tail block: bitsandbytes' generic path (and ours) store its absmax clamped to 1e-38, its
        # native CPU kernel stores 0; both decode to 0
        native = state.state2.absmax
        zero_tail = (native == 0) & (nested == torch.tensor(1e-38))
        assert torch.equal(nested[~zero_tail], native[~zero_tail])
        target = (absmax - offset) / nested.repeat_interleave(256)[: absmax.numel()]
        code = ref.DYNAMIC_MAP
        ours_err = (code[qabsmax.long()] - target).abs()
        bnb_err = (code[state.absmax.long()] - target).abs()
        finite = torch.isfinite(target)
        assert (ours_err[finite] <= (code.unsqueeze(0) - target[finite].unsqueeze(1)).abs().amin(1)).all()
        mismatch = qabsmax != state.absmax
        assert (ours_err[mismatch & finite] <= bnb_err[mismatch & finite]).all()
        if w is weights[0]:  # a plain random weight: the native kernel's misses are rare
            assert int(mismatch.sum()) <= 0.1 * absmax.numel()


def test_nested_state_roundtrip_close():
    w = torch.randn(128, 512)
    packed, absmax = F.quantize_nf4(w, 64)
    rec = F.double_dequantize(*F.double_quantize(absmax))
    # 8-bit dynamic map: relative error of the absmax well under 1%
    assert ((rec - absmax).abs() / absmax).max() < 0.01


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_triton_matches_reference(quant_type, blocksize):
    for label, w in WEIGHTS[:4] + WEIGHTS[4:6]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            wd = w.to(dtype)
            if not torch.isfinite(wd).all():
                continue
            p_ref, a_ref = ref.quantize_4bit(wd, blocksize, quant_type)
            p_tri, a_tri = triton_impl.quantize_4bit(wd, blocksize, quant_type)
            assert torch.equal(p_ref, p_tri), (label, dtype)
            assert torch.equal(a_ref, a_tri), (label, dtype)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            d_ref = ref.dequantize_4bit(p_ref, a_ref, w.shape, blocksize, quant_type, out_dtype)
            d_tri = triton_impl.dequantize_4bit(p_ref, a_ref, w.shape, blocksize, quant_type, out_dtype)
            assert torch.equal(d_ref, d_tri), (label, out_dtype)


def test_triton_double_quant_matches_reference():
    g = torch.Generator().manual_seed(2)
    for absmax in (torch.rand(700, generator=g), torch.zeros(300), torch.full((257,), 0.37), torch.rand(1) * 5):
        r = ref.double_quantize(absmax)
        t = triton_impl.double_quantize(absmax)
        for a, b in zip(r, t, strict=False):
            assert torch.equal(a, b)
        assert torch.equal(ref.double_dequantize(*r), triton_impl.double_dequantize(*t))


def test_backend_switch_runs_triton(monkeypatch):
    w = torch.randn(5, 70)
    monkeypatch.setenv("QLORA_KIT_BACKEND", "reference")
    expect = F.quantize_nf4(w, 32)
    monkeypatch.setenv("QLORA_KIT_BACKEND", "triton")
    called = []
    original = triton_impl.quantize_4bit
    monkeypatch.setattr(triton_impl, "quantize_4bit", lambda *a: called.append(1) or original(*a))
    got = F.quantize_nf4(w, 32)
    assert called and all(torch.equal(a, b) for a, b in zip(expect, got, strict=False))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_rejected_with_tensor_name(bad):
    w = torch.randn(4, 64)
    w[2, 3] = bad
    with pytest.raises(ValueError, match="layers.3.q_proj.weight"):
        F.quantize_nf4(w, 64, name="layers.3.q_proj.weight")


def test_bad_blocksize_lists_allowed():
    with pytest.raises(ValueError, match="32, 64, 128"):
        F.quantize_nf4(torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match="32, 64, 128"):
        qlora_kit.NF4Config(blocksize=100)


def test_nf4_double_quant_bits_per_parameter():
    """Linear weights in NF4 + double quant: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter."""
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(1024, 1024, bias=False))
    qlora_kit.quantize(layer, qlora_kit.NF4Config(), filter_fn=lambda m, n: True)
    fp = qlora_kit.memory_footprint(layer)
    bits = fp["nf4"] * 8 / (2 * 1024 * 1024)
    assert abs(bits - 4.127) < 0.005, bits
    assert abs(fp["nf4"] / (2 * 1024 * 1024 * 2) - 0.258) < 0.002
