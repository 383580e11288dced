"""NF4 / FP4 fused matmuls (Triton; interpreter on CPU) against dequantize-then-matmul in fp64.

fp32: every element within the standard dot-product bound K * 2**-23 * (|x| |W|^T).
fp16: max error no worse than twice PyTorch's own fp16 result (F.linear on the fp16-dequantized weight).
Every path (gemv, gemm, dequant, split-K gemv), forward and grad_input, odd shapes: K odd (rows start
mid-byte), K % blocksize != 0 (blocks straddle rows), N and K not multiples of 16.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from qlora_kit.kernels import matmul_4bit as mm
from qlora_kit.kernels import planner as pl
from qlora_kit.kernels.reference import matmul as ref
from qlora_kit.kernels.reference import quant_4bit as q4

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
# the interpreter computes tl.dot wrongly on bf16 operands: bf16 is checked on GPUs only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# (quant_type, double_quant, N, K, blocksize)
WEIGHTS = [
    ("nf4", True, 37, 53, 64),  # K odd: odd rows start mid-byte; blocks straddle rows
    ("fp4", False, 40, 64, 32),  # K % blocksize == 0: one block per tile row, row-scaled gemv
    ("nf4", False, 33, 200, 256),  # K % blocksize != 0 (blocks straddle rows), K not a multiple of 16
    ("fp4", True, 18, 90, 32),
    ("nf4", True, 24, 128, 64),  # aligned and double-quantized
]
PLANS = [
    pl.MatmulPlan("gemv"),
    pl.MatmulPlan("gemm"),
    pl.MatmulPlan("dequant"),
    pl.MatmulPlan("gemv", lut="registers"),
    pl.MatmulPlan("gemm", split_k=2, lut="registers"),
]


def make_weight(quant_type, double_quant, n, k, blocksize, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, absmax = q4.quantize_4bit(w, blocksize, quant_type)
    meta = ref.Quant4bitMeta((n, k), blocksize, quant_type, double_quant)
    if double_quant:
        qa, nested, offset = q4.double_quantize(absmax)
        return ref.Packed4bit(
            packed.to(device), meta, qabsmax=qa.to(device), nested_absmax=nested.to(device), offset=offset.to(device)
        )
    return ref.Packed4bit(packed.to(device), meta, absmax=absmax.to(device))


def assert_matmul_close(out, ref64, torch_out, abs_bound):
    """fp32: elementwise bound; half precision: within 2x of PyTorch's own error (plus fp32-level slack)."""
    err = (out.double() - ref64).abs()
    if out.dtype == torch.float32:
        assert (err <= abs_bound).all(), f"max excess {(err - abs_bound).max().item():.3e}"
    else:
        torch_err = (torch_out.double() - ref64).abs().max().item()
        assert err.max().item() <= 2 * torch_err + abs_bound.max().item(), (err.max().item(), torch_err)


def dot_bound(a, b, k):
    """K * 2**-23 * (|a| @ |b|): a standard forward-error bound for fp32 dot products of length k."""
    return k * 2.0**-23 * (a.double().abs() @ b.double().abs())


# the code lookup is dtype-independent: the registers variant is checked in fp32 only
PLAN_DTYPES = [(p, d) for p in PLANS for d in DTYPES if p.lut == "memory" or d == torch.float32]


@pytest.mark.parametrize("weight", WEIGHTS, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize(
    "plan,dtype", PLAN_DTYPES, ids=lambda v: f"{v.path}-{v.split_k}-{v.lut}" if isinstance(v, pl.MatmulPlan) else str(v)
)
def test_forward_and_grad_input(plan, dtype, m, weight):
    w = make_weight(*weight)
    n, k = w.meta.shape
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if m in (1, 17) else None  # with and without, every path
    w32 = ref.dequantize_packed_4bit(w, torch.float32)

    out = mm.matmul_4bit(x, w, bias, plan=plan)
    assert out.shape == (m, n) and out.dtype == dtype
    ref64 = x.double() @ w32.double().T + (0 if bias is None else bias.double())
    torch_out = F.linear(x, w32.to(dtype), bias)
    assert_matmul_close(out, ref64, torch_out, dot_bound(x, w32.T, k) + 2.0**-23 * ref64.abs())

    grad = torch.randn(m, n, device=DEVICE).to(dtype)
    gx = mm.matmul_4bit_grad_input(grad, w, plan=plan)
    assert gx.shape == (m, k) and gx.dtype == dtype
    assert_matmul_close(gx, grad.double() @ w32.double(), grad @ w32.to(dtype), dot_bound(grad, w32, n))


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("k", [300, 320])
def test_gemv_split_k(split_k, k):
    w = make_weight("nf4", True, 37, k, 64)
    x = torch.randn(2, k, device=DEVICE)
    bias = torch.randn(37, device=DEVICE)
    w32 = ref.dequantize_packed_4bit(w, torch.float32)
    out = mm.matmul_4bit(x, w, bias, plan=pl.MatmulPlan("gemv", split_k))
    ref64 = x.double() @ w32.double().T + bias.double()
    assert ((out.double() - ref64).abs() <= dot_bound(x, w32.T, k) + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("weight", WEIGHTS[:2], ids=lambda w: "-".join(map(str, w)))
def test_dequantize_kernel_bit_exact(weight, dtype):
    w = make_weight(*weight)
    expected = ref.dequantize_packed_4bit(w, dtype)
    assert torch.equal(mm.dequantize_packed_4bit(w, dtype), expected)
    assert torch.equal(mm.dequantize_packed_4bit(w, dtype, reuse=True), expected)


def test_layout_matches_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    wf = torch.randn(37, 53)
    for double_quant in (False, True):
        packed, state = bnbF.quantize_4bit(wf, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        meta = ref.Quant4bitMeta((37, 53), 64, "nf4", double_quant)
        if double_quant:
            w = ref.Packed4bit(
                packed.reshape(-1), meta, qabsmax=state.absmax, nested_absmax=state.state2.absmax, offset=state.offset
            )
        else:
            w = ref.Packed4bit(packed.reshape(-1), meta, absmax=state.absmax)
        expected = bnbF.dequantize_4bit(packed, state)
        assert torch.equal(ref.dequantize_packed_4bit(w, torch.float32), expected)
        w = ref.Packed4bit(*(t.to(DEVICE) if torch.is_tensor(t) else t for t in w))
        assert torch.equal(mm.dequantize_packed_4bit(w, torch.float32).cpu(), expected)


def test_leading_dims_and_empty():
    w = make_weight("nf4", False, 20, 40, 64)
    x = torch.randn(2, 3, 40, device=DEVICE)
    out = mm.matmul_4bit(x, w, plan=pl.MatmulPlan("gemm"))
    torch.testing.assert_close(out, ref.matmul_4bit_ref(x, w), rtol=1e-5, atol=1e-5)
    assert mm.matmul_4bit(x[:0], w).shape == (0, 3, 20)


def test_bad_shapes_are_clear_errors():
    w = make_weight("nf4", False, 20, 40, 64)
    with pytest.raises(ValueError, match="last dimension 41"):
        mm.matmul_4bit(torch.randn(1, 41, device=DEVICE), w)
    bad = w._replace(absmax=w.absmax[:-1])
    with pytest.raises(ValueError, match="absmax must hold"):
        mm.matmul_4bit(torch.randn(1, 40, device=DEVICE), bad)
    with pytest.raises(ValueError, match="blocksize"):
        ref.Quant4bitMeta((2, 2), 48, "nf4", False)
    with pytest.raises(ValueError, match="path"):
        pl.MatmulPlan("cublas")
    with pytest.raises(ValueError, match="lut"):
        pl.MatmulPlan("gemv", lut="shared")


# --------------------------------------------------------------------------------------------- dispatcher


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    monkeypatch.setenv(pl.TABLE_ENV, str(path))
    monkeypatch.delenv(pl.PATH_ENV, raising=False)
    pl._read_table.cache_clear()
    yield path
    pl._read_table.cache_clear()


def test_dispatcher_defaults_without_table(table):
    cpu = torch.device("cpu")
    assert pl.plan_matmul("nf4", cpu, 1, 4096, 4096).path == "gemv"
    assert pl.plan_matmul("nf4", cpu, 64, 4096, 4096).path == "gemm"
    assert pl.plan_matmul("nf4", cpu, 4096, 4096, 4096).path == "dequant"


def test_dispatcher_reads_measured_table(table):
    plans = [
        {"device": "cpu", "format": "nf4", "m": 1, "n": 4096, "k": 4096, "path": "gemm"},
        {"device": "cpu", "format": "nf4", "m": 64, "n": 4096, "k": 4096, "path": "dequant"},
        {
            "device": "cpu",
            "format": "nf4",
            "m": 1,
            "n": 14336,
            "k": 4096,
            "path": "gemv",
            "split_k": 4,
            "lut": "registers",
        },
        {"device": "other gpu", "format": "nf4", "m": 1, "n": 4096, "k": 4096, "path": "dequant"},
    ]
    table.write_text(json.dumps({"version": 1, "plans": plans}))
    cpu = torch.device("cpu")
    assert pl.plan_matmul("nf4", cpu, 1, 4096, 4096) == pl.MatmulPlan("gemm")
    assert pl.plan_matmul("nf4", cpu, 4, 4000, 4096) == pl.MatmulPlan("gemm")  # nearest shape, then nearest m
    assert pl.plan_matmul("nf4", cpu, 32, 4096, 4096) == pl.MatmulPlan("dequant")
    assert pl.plan_matmul("nf4", cpu, 1, 11008, 4096) == pl.MatmulPlan("gemv", 4, "registers")
    assert pl.plan_matmul("int4", cpu, 1, 4096, 4096) == pl.default_plan(1, 4096, 4096)  # no entry: default
    with pl.force_path("dequant"):
        assert pl.plan_matmul("nf4", cpu, 1, 4096, 4096).path == "dequant"
    assert pl.plan_matmul("nf4", cpu, 1, 4096, 4096).path == "gemm"


def test_dispatcher_env_override_and_bad_table(table, monkeypatch):
    monkeypatch.setenv(pl.PATH_ENV, "gemv")
    assert pl.plan_matmul("nf4", torch.device("cpu"), 4096, 64, 64).path == "gemv"
    monkeypatch.delenv(pl.PATH_ENV)
    table.write_text(json.dumps({"version": 7, "plans": []}))
    with pytest.raises(ValueError, match="version-1"):
        pl.plan_matmul("nf4", torch.device("cpu"), 1, 64, 64)


def test_forced_path_is_the_one_that_runs(table, monkeypatch):
    """force_path must reach the launcher: the dequant path writes the scratch buffer, the others do not."""
    w = make_weight("nf4", False, 20, 40, 64)
    x = torch.randn(3, 40, device=DEVICE)
    pl._BUFFERS.clear()
    with pl.force_path("gemv"):
        mm.matmul_4bit(x, w)
    assert not pl._BUFFERS
    with pl.force_path("dequant"):
        mm.matmul_4bit(x, w)
    assert pl._BUFFERS
