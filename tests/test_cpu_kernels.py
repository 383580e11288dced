"""CPU kernels (kernels/cpu.py) against the references: every path, odd shapes, fp32 / bf16 / fp16.

Criteria as for the Triton kernels: fp32 within K * 2**-23 * (|x| |W|^T) of the fp64 product of the
dequantized weight; half precision within twice the reference's own error; the decoders bit-exact.
"""

import ctypes

import pytest
import torch
import torch.nn.functional as F
from qlora_kit.kernels import cpu
from qlora_kit.kernels.reference import matmul as ref
from qlora_kit.kernels.reference import mxfp4 as mx
from qlora_kit.kernels.reference import quant_4bit as q4
from qlora_kit.kernels.reference import quant_int as qi

from qlora_kit import _dispatch, ops
from qlora_kit.configs import FP4Config, Int4WeightConfig, NF4Config
from qlora_kit.formats.base import get_format

if cpu.library() is None:
    pytest.skip("no C compiler for the CPU kernels", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K): K % 32 == 0 takes the vector decoders (AVX2 / AVX-512), others the portable one;
# odd N * K straddles bytes/blocks
SHAPES = [(48, 96), (17, 33), (5, 100), (32, 64)]


@pytest.fixture(autouse=True)
def _all_sizes(monkeypatch):
    monkeypatch.setattr(cpu, "MIN_WEIGHT_NUMEL", 0)
    monkeypatch.setattr(cpu, "DEQUANT_BYTES", 64 * 4 * 8)  # several blocks even for small weights
    monkeypatch.setattr(cpu, "DEQUANT_MIN_ROWS", 16)


def force(monkeypatch, path):
    monkeypatch.setattr(cpu, "plan", lambda *args: path)


def assert_close(out, x, w32, bias=None, factor=2):
    ref64 = x.double() @ w32.double().T + (0 if bias is None else bias.double())
    err = (out.double() - ref64).abs()
    k = x.shape[-1]
    bound = k * 2.0**-23 * (x.double().abs() @ w32.double().abs().T) + 2.0**-23 * ref64.abs()
    if out.dtype == torch.float32:
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    else:
        own = (F.linear(x, w32.to(x.dtype), None if bias is None else bias).double() - ref64).abs().max().item()
        assert err.max().item() <= factor * own + bound.max().item(), (err.max().item(), own)


def weights(kind, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    if kind in ("nf4", "fp4", "nf4-dq"):
        packed, absmax = q4.quantize_4bit(w, 32, kind[:3])
        meta = ref.Quant4bitMeta((n, k), 32, kind[:3], kind == "nf4-dq")
        if kind == "nf4-dq":
            qa, nested, offset = q4.double_quantize(absmax)
            pw = ref.Packed4bit(packed, meta, qabsmax=qa, nested_absmax=nested, offset=offset)
        else:
            pw = ref.Packed4bit(packed, meta, absmax=absmax)
        return (lambda x, b: cpu.matmul_4bit(x, pw, b)), ref.dequantize_packed_4bit(pw, torch.float32)
    if kind == "mxfp4":
        p, e = mx.quantize_mxfp4(w)
        return (lambda x, b: cpu.matmul_mxfp4(x, p, e, k, b)), mx.dequantize_mxfp4(p, e, k, torch.float32)
    if kind == "int4":
        p, s, z = qi.quantize_int4(w, 32)
        return (lambda x, b: cpu.matmul_int4(x, p, s, z, 32, b)), ref.dequantize_int4(p, s, z, k, 32, torch.float32)
    q, s = qi.quantize_int8(w) if kind == "int8" else qi.quantize_fp8(w)
    return (lambda x, b: cpu.matmul_channelwise(x, q, s, b)), ref.dequantize_channelwise(q, s, torch.float32)


PATHS = {  # format -> paths to force
    "nf4": ["gemv", "dequant"],
    "fp4": ["gemv", "dequant"],
    "nf4-dq": ["gemv"],
    "int4": ["gemv", "dequant", "int4pack"],
    "int8": ["gemv", "dequant", "int8pack"],
    "fp8": ["gemv", "dequant"],
    "mxfp4": ["gemv", "dequant"],
}
CASES = [(kind, path) for kind, paths in PATHS.items() for path in paths]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_paths_match_reference(monkeypatch, case, shape, dtype):
    kind, path = case
    if path.endswith("pack") and dtype == torch.float32:
        pytest.skip("torch's packed kernels serve half precision only")
    force(monkeypatch, path)
    matmul, w32 = weights(kind, *shape)
    for m, with_bias in ((1, False), (3, True), (17, False)):
        x = torch.randn(2, m, shape[1]).to(dtype)  # leading dims
        bias = torch.randn(shape[0]).to(dtype) if with_bias else None
        out = matmul(x, bias)
        assert out.shape == (2, m, shape[0]) and out.dtype == dtype
        # torch's packed kernels round their scales to x's dtype: opt-in only, checked at a looser bound
        factor = 4 if path.endswith("pack") else 2
        assert_close(out.reshape(-1, shape[0]), x.reshape(-1, shape[1]), w32, bias, factor)


@pytest.mark.parametrize("kind", ["nf4", "int4", "int8", "fp8", "mxfp4"])
@pytest.mark.parametrize("shape", [(17, 33), (48, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_decoders_bit_exact(kind, shape):
    """The C decoders write exactly the reference's fp32 weight (so fp32 differs only in summation order)."""
    n, k = shape
    lib, out, g = cpu.library(), torch.full(shape, float("nan")), torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g)
    if kind == "nf4":
        packed, absmax = q4.quantize_4bit(w, 32, "nf4")
        table = q4.code_table("nf4")
        lib.qk_4bit(None, 0, 0, *map(cpu._ptr, (packed, absmax, table)), n, k, 32, None, cpu._ptr(out), 0, n, 1)
        expected = q4.dequantize_4bit(packed, absmax, shape, 32, "nf4", torch.float32)
    elif kind == "int4":
        p, s, z = qi.quantize_int4(w, 32)
        sf, zf = s.float(), z.float()
        lib.qk_int4(None, 0, 0, *map(cpu._ptr, (p, sf, zf)), n, k, 32, None, cpu._ptr(out), 0, n, 1)
        expected = ref.dequantize_int4(p, s, z, k, 32, torch.float32)
    elif kind == "mxfp4":
        w[0, :32] = 1e-39  # subnormal scales (E near 0) decode exactly too
        p, e = mx.quantize_mxfp4(w)
        s = torch.ldexp(torch.ones(e.shape), (e.int() - 127).float())
        lib.qk_mxfp4(None, 0, 0, *map(cpu._ptr, (p, s, cpu._e2m1_table())), n, k, None, cpu._ptr(out), 0, n, 1)
        expected = mx.dequantize_mxfp4(p, e, k, torch.float32)
    else:
        q, s = qi.quantize_int8(w) if kind == "int8" else qi.quantize_fp8(w)
        lut = cpu._fp8_lut()
        lib.qk_chan(None, 0, 0, *map(cpu._ptr, (q, lut, s)), int(kind == "int8"), n, k, None, cpu._ptr(out), 0, n, 1)
        expected = ref.dequantize_channelwise(q, s, torch.float32)
    assert torch.equal(out, expected)


def test_plan_by_rows_and_size(monkeypatch):
    assert cpu.plan("4bit", 1, torch.float32, 1 << 20) == "gemv"
    assert cpu.plan("int8", 1, torch.bfloat16, 1 << 20) == "gemv"
    assert cpu.plan("4bit", 256, torch.float32, 1 << 20) == "dequant"
    monkeypatch.setattr(cpu, "MIN_WEIGHT_NUMEL", 1 << 18)
    assert cpu.plan("4bit", 1, torch.float32, 100) == "reference"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, True),
        ({"QLORA_KIT_CPU_KERNELS": " 0"}, False),
        ({"QLORA_KIT_CPU_KERNELS": "1"}, True),
        ({"QLORA_KIT_BACKEND": "reference"}, False),
    ],
)
def test_use_cpu_kernels_reads_the_environment_on_every_call(monkeypatch, env, expected):
    """Both variables are read per call (through os.environ's own store), so a later setenv takes effect."""
    x = torch.zeros(2)
    assert _dispatch.use_cpu_kernels(x)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _dispatch.use_cpu_kernels(x) is expected
    assert not _dispatch.use_cpu_kernels(torch.zeros(2, device="meta"))
    calls = []
    real = cpu.plan
    monkeypatch.setattr(cpu, "plan", lambda *a: calls.append(a) or real(*a))
    qw = get_format("int8").from_float(torch.randn(64, 96), None)
    ops.quantized_linear(torch.randn(1, 96), qw)
    assert bool(calls) is expected  # the op asks the CPU planner only when the kernels may run


@pytest.mark.parametrize("config", [NF4Config(blocksize=64), FP4Config(), Int4WeightConfig(group_size=64)], ids=str)
def test_quantized_linear_uses_cpu_kernels(monkeypatch, config):
    """Through the custom op, with autograd: the fast path agrees with the reference path."""
    fmt = {"NF4Config": "nf4", "FP4Config": "fp4", "Int4WeightConfig": "int4"}[type(config).__name__]
    qw = get_format(fmt).from_float(torch.randn(64, 96), config)
    x = torch.randn(3, 96, requires_grad=True)
    calls = []
    real = cpu.plan
    monkeypatch.setattr(cpu, "plan", lambda *a: calls.append(a) or real(*a))
    out = ops.quantized_linear(x, qw)
    assert calls and calls[0][1] == 3
    monkeypatch.setenv("QLORA_KIT_BACKEND", "reference")
    expected = ops.quantized_linear(x, qw)
    assert len(calls) == 1  # the reference backend never asks the CPU planner
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_int4pack_cache_follows_in_place_edits(monkeypatch):
    force(monkeypatch, "int4pack")
    p, s, z = qi.quantize_int4(torch.randn(32, 64), 32)
    x = torch.randn(1, 64).bfloat16()
    first = cpu.matmul_int4(x, p, s, z, 32)
    s.mul_(2)  # e.g. load_state_dict copying new values into the same buffer
    second = cpu.matmul_int4(x, p, s, z, 32)
    w = ref.dequantize_int4(p, s, z, 64, 32, torch.float32)
    assert_close(second, x, w, factor=4)
    assert not torch.equal(first, second)


def test_library_pointer_types():
    """Pointers pass as Python ints to arguments declared c_void_p (never as C ints, which would truncate them)."""
    t = torch.zeros(1)
    assert cpu._ptr(t) == t.data_ptr() and cpu._ptr(None) is None
    lib = cpu.library()
    for fn in (lib.qk_4bit, lib.qk_int4, lib.qk_chan, lib.qk_mxfp4):
        assert fn.argtypes[0] is ctypes.c_void_p and fn.argtypes[3] is ctypes.c_void_p


FORMATS = {  # every registered format through its weight class, as a model calls it
    "nf4-dq": ("nf4", {"blocksize": 64, "double_quant": True}),
    "fp4": ("fp4", {"blocksize": 64}),
    "int4-g64": ("int4", {"group_size": 64}),
    "int8": ("int8", {}),
    "fp8": ("fp8", {}),
    "mxfp4": ("mxfp4", {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label", FORMATS)
def test_formats_through_the_planner(monkeypatch, label, dtype):
    """The planner's own choice per M (GEMV and blocked GEMM) against the reference backend, through
    ``linear``: M in {1, 3, 16, 256}, bias and non-contiguous x, rank-3 contiguous x without bias, N not a multiple
    of 8, K a multiple of 32 (the vector decoders) and not (the portable ones)."""
    from qlora_kit import registry

    fmt, opts = FORMATS[label]
    chosen = set()
    real = cpu.plan
    monkeypatch.setattr(cpu, "plan", lambda *a: chosen.add(real(*a)) or real(*a))
    for n, k in ((37, 128), (20, 80)):
        g = torch.Generator().manual_seed(n + k)
        qw = registry.get_format(fmt).from_float(torch.randn(n, k, generator=g), registry.weight_config(fmt, **opts))
        bias = torch.randn(n, generator=g).to(dtype)
        for m in (1, 3, 16, 256):
            x = torch.randn(k, m, generator=g).to(dtype).T  # non-contiguous
            with torch.no_grad():
                out = qw.linear(x, bias)
                monkeypatch.setenv("QLORA_KIT_BACKEND", "reference")
                expected = qw.linear(x, bias)
                w32 = qw.linear(torch.eye(k), None).T  # the reference's dequantized fp32 weight
                monkeypatch.delenv("QLORA_KIT_BACKEND")
            assert out.shape == expected.shape and out.dtype == dtype
            assert_close(out, x, w32, bias)
            x3 = x.contiguous().reshape(1, m, k)  # contiguous rank 3 without bias: goes in as it is
            with torch.no_grad():
                out3 = qw.linear(x3, None)
            assert out3.shape == (1, m, n) and out3.dtype == dtype and out3.is_contiguous()
            assert_close(out3.reshape(m, n), x, w32)
    assert chosen == {"gemv", "dequant"}


@pytest.mark.parametrize("kind", ["nf4", "int4", "int8", "fp8", "mxfp4"])
@pytest.mark.parametrize("shape", [(48, 96), (17, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_gemv_converts_like_torch(monkeypatch, kind, shape):
    """bf16 x without bias: the kernel converts x and rounds y itself, bit-identical to converting with PyTorch
    around the fp32 product; inf and NaN land where PyTorch's do (NaN payloads differ even within PyTorch: its
    vectorized conversion writes 0xFFFF, its scalar one 0x7FC0)."""
    force(monkeypatch, "gemv")
    matmul, _ = weights(kind, *shape)
    x = torch.randn(3, shape[1]).to(torch.bfloat16)
    x[1, 0], x[2, 1] = float("inf"), float("nan")  # rows of inf / NaN outputs
    out = matmul(x, None)
    expected = matmul(x.float(), None).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out.isnan(), expected.isnan())
    assert expected.isnan().any() and expected.isinf().any()
    out[out.isnan()], expected[expected.isnan()] = 0, 0
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("label", FORMATS)
def test_wrong_input_width_is_refused(label):
    """x whose last dimension is not the weight's in_features: one ValueError naming both, never a product read
    from past the end of x (the C kernels take K from the weight)."""
    from qlora_kit import registry

    fmt, opts = FORMATS[label]
    qw = registry.get_format(fmt).from_float(torch.randn(512, 512), registry.weight_config(fmt, **opts))
    for width in (256, 1024):
        for dtype in (torch.float32, torch.bfloat16):
            with torch.no_grad(), pytest.raises(ValueError, match=f"x has last dimension {width} but"):
                qw.linear(torch.randn(1, width).to(dtype), None)
