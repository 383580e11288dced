"""Fused LoRA kernels (kernels/lora.py) against an fp64 reference: values and gradients.

On CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
operands are fp16 / fp32 only (the interpreter's bf16 tl.dot is wrong).
"""

import pytest
import torch
from qlora_kit.kernels.reference import lora as ref
from qlora_kit.kernels.reference import quant_4bit as q4
from qlora_kit.kernels.reference import quant_int as qi
from torch import nn

lora_k = pytest.importorskip("qlora_kit.kernels.lora")
LoraMeta, Packed4bit, Quant4bitMeta = lora_k.LoraMeta, lora_k.Packed4bit, lora_k.Quant4bitMeta
PackedInt, IntQuantMeta = lora_k.PackedInt, lora_k.IntQuantMeta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 17, 33), (37, 45, 29), (70, 64, 130)]  # (M, K, N): odd sizes, tails of every tile


def _make_base(kind: str, n: int, k: int, dtype, double_quant=False, blocksize=64, group_size=32):
    """(what the kernel gets, the dense fp64 weight it stands for)."""
    w = torch.randn(n, k, device=DEVICE) / k**0.5
    if kind in ("int8", "fp8", "int4"):
        if kind == "int4":
            packed, scale, zero = qi.quantize_int4(w, group_size)
            base = PackedInt(packed, scale, IntQuantMeta((n, k), "int4", group_size), zero=zero)
        else:
            qdata, scale = qi.quantize_int8(w) if kind == "int8" else qi.quantize_fp8(w)
            base = PackedInt(qdata, scale, IntQuantMeta((n, k), kind))
        # the fp64 reference: the format's own dequantization (fp32), then the kernel's compute dtype
        return base, ref.dense_weight(base, torch.float32).to(dtype).double()
    if kind == "float":
        return w.to(dtype), w.to(dtype).double()
    if kind == "float_t":  # transformers' Conv1D keeps W^T: hand the kernel a strided view
        wt = w.t().contiguous().to(dtype)
        return wt.t(), wt.t().double()
    packed, absmax = q4.quantize_4bit(w, blocksize, kind)
    meta = Quant4bitMeta((n, k), blocksize, kind, double_quant)
    if double_quant:
        qa, nested, offset = q4.double_quantize(absmax)
        dense = q4.dequantize_4bit(packed, q4.double_dequantize(qa, nested, offset), (n, k), blocksize, kind, dtype)
        return Packed4bit(packed, meta, qabsmax=qa, nested_absmax=nested, offset=offset), dense.double()
    dense = q4.dequantize_4bit(packed, absmax, (n, k), blocksize, kind, dtype)
    return Packed4bit(packed, meta, absmax=absmax), dense.double()


def _run_case(m, k, n, r, dtype, kind, *, bias=True, double_quant=False, dropout=False, batch=()):
    base, dense = _make_base(kind, n, k, dtype, double_quant)
    scale = 16 / r
    x = torch.randn(*batch, m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k, device=DEVICE) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=DEVICE) / r).requires_grad_()
    bias_t = torch.randn(n, device=DEVICE, dtype=dtype).requires_grad_() if bias else None
    mask = (torch.rand(*batch, m, k, device=DEVICE) > 0.25).to(dtype) / 0.75 if dropout else None
    x_d = x * mask if dropout else None
    meta = LoraMeta(scale=scale, dropout=dropout)
    y = lora_k.lora_linear(x, base, bias_t, a, b, meta, x_dropped=x_d)
    g = torch.randn_like(y)
    y.backward(g)

    def leaf64(t):
        return None if t is None else t.detach().double().requires_grad_()

    x64, a64, b64, bias64 = leaf64(x), leaf64(a), leaf64(b), leaf64(bias_t)
    x_d64 = x64 * mask.double() if dropout else None
    y64 = ref.lora_linear(x64, dense, bias64, a64, b64, scale, x_dropped=x_d64)
    y64.backward(g.double())

    # the same computation in PyTorch at the kernel's precision, for the half-precision error budget
    xt, at, bt, biast = leaf64(x).to(dtype), leaf64(a), leaf64(b), leaf64(bias_t)
    for t in (xt, at, bt, biast):
        if t is not None:
            t.retain_grad()
    x_dt = xt * mask if dropout else None
    yt = ref.lora_linear(xt, dense.to(dtype), None if biast is None else biast.to(dtype), at, bt, scale, x_dt)
    yt.backward(g)
    pairs = [("y", y, yt, y64), ("dx", x.grad, xt.grad, x64.grad), ("dA", a.grad, at.grad, a64.grad),
             ("dB", b.grad, bt.grad, b64.grad)]  # fmt: skip
    if bias:
        pairs.append(("dbias", bias_t.grad, biast.grad, bias64.grad))
    for name, ours, torch_same, exact in pairs:
        err = (ours.double() - exact).abs().max().item()
        size = exact.abs().max().item() + 1e-12
        if dtype == torch.float32:
            assert err <= 2e-5 * size, f"{name}: fp32 error {err:.3g} (max |value| {size:.3g})"
        else:
            budget = (torch_same.double() - exact).abs().max().item()
            assert err <= 2 * budget + 2e-3 * size, f"{name}: error {err:.3g} vs PyTorch's {budget:.3g}"


@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_float_base(m, k, n, r, dtype):
    _run_case(m, k, n, r, dtype, "float")


@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("fp4", True)])
@pytest.mark.parametrize("m,k,n", [(37, 70, 45), (19, 45, 33)])  # odd K: rows start mid-byte
def test_fused_4bit_base(kind, double_quant, r, m, k, n):
    _run_case(m, k, n, r, torch.float32, kind, double_quant=double_quant)


def _plan(path: str):
    from qlora_kit.kernels import matmul_4bit

    return matmul_4bit.MatmulPlan("gemv", split_k=2) if path == "gemv-split2" else matmul_4bit.MatmulPlan(path)


PATHS = ["gemv", "gemv-split2", "gemm", "dequant"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dropout", [False, True])
def test_fused_4bit_every_matmul_path(path, dropout):
    """The 4-bit forward and dX follow the fused-matmul dispatcher's plan; each path gives the same result."""
    from qlora_kit.kernels import matmul_4bit

    with matmul_4bit.force_path(_plan(path)):
        _run_case(5, 66, 40, 8, torch.float32, "nf4", double_quant=True, dropout=dropout)


# ----- int8 / fp8 per channel and int4 per group ---------------------------------------------------------------
INT_KINDS = ["int8", "fp8", "int4"]


@pytest.mark.parametrize("kind", INT_KINDS)
@pytest.mark.parametrize(
    "m,k,n,r,bias,dtype",
    [  # M <= 8 takes the fused gemv, M = 17 the gemm; K, N multiples of neither 16 nor the group size (32)
        (1, 45, 33, 1, True, torch.float32),
        (1, 45, 33, 64, False, torch.float16),
        (3, 45, 33, 8, False, torch.float16),
        (3, 70, 45, 64, True, torch.float32),
        (17, 70, 45, 1, True, torch.float16),
        (17, 45, 33, 8, False, torch.float32),
        (17, 45, 33, 64, True, torch.float32),
    ],
)
def test_fused_int_base(kind, m, k, n, r, bias, dtype):
    """Values and gradients (x, A, B, bias) over int8 / fp8 / int4 bases against fp64 on the dequantized weight."""
    _run_case(m, k, n, r, dtype, kind, bias=bias)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", INT_KINDS)
def test_fused_int_every_matmul_path(kind, path):
    """Every plan of the dispatcher (split-K gemv included) over int bases, with and without dropout."""
    from qlora_kit.kernels import matmul_4bit

    odd = path in ("gemv", "dequant")  # alternate dtype, dropout, bias and K parity across the paths
    with matmul_4bit.force_path(_plan(path)):
        _run_case(6, 67 if odd else 66, 41, 3, torch.float16 if odd else torch.float32, kind, bias=odd, dropout=not odd)


@pytest.mark.parametrize("kind", ["nf4", "int8", "int4"])
def test_gemv_adds_update_in_its_epilogue(kind, monkeypatch):
    """A few rows: the low-rank update is added inside the GEMV kernel, not by a separate addmm afterwards."""
    from qlora_kit.kernels import matmul_4bit

    def no_addmm(*args, **kwargs):
        raise AssertionError("the fused gemv path must not add the update with a separate addmm")

    monkeypatch.setattr(torch, "addmm", no_addmm)
    monkeypatch.setattr(torch.Tensor, "addmm_", no_addmm)
    with matmul_4bit.force_path("gemv"):
        _run_case(2, 45, 33, 8, torch.float32, kind, double_quant=True)


def test_int4_group_sizes_and_wide_k():
    """Groups of 64 and 128 (one tile spans part of a group), K beyond one gemv step."""
    for group_size, k in ((64, 150), (128, 300)):
        base, dense = _make_base("int4", 19, k, torch.float32, group_size=group_size)
        x = torch.randn(4, k, device=DEVICE)
        a, b = torch.randn(8, k, device=DEVICE) / k**0.5, torch.randn(19, 8, device=DEVICE)
        for path in ("gemv", "gemm"):
            from qlora_kit.kernels import matmul_4bit

            with matmul_4bit.force_path(path):
                y = lora_k.lora_linear(x, base, None, a, b, LoraMeta(scale=0.5))
            y64 = ref.lora_linear(x.double(), dense, None, a.double(), b.double(), 0.5)
            torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


def test_packed_int_validation():
    q, s = qi.quantize_int8(torch.randn(8, 16))
    with pytest.raises(ValueError, match="int8 qdata must be"):
        PackedInt(q[:, :15], s, IntQuantMeta((8, 16), "int8")).check()
    with pytest.raises(ValueError, match="scale must have shape"):
        PackedInt(q, s[:7], IntQuantMeta((8, 16), "int8")).check()
    with pytest.raises(ValueError, match="fp8 qdata must be"):
        PackedInt(q, s, IntQuantMeta((8, 16), "fp8")).check()
    packed, scale, zero = qi.quantize_int4(torch.randn(8, 40), 32)
    with pytest.raises(ValueError, match="int4 zero"):
        PackedInt(packed, scale, IntQuantMeta((8, 40), "int4", 32)).check()
    with pytest.raises(ValueError, match="power of two >= 32"):
        IntQuantMeta((8, 40), "int4", 16)
    with pytest.raises(ValueError, match="fmt"):
        IntQuantMeta((8, 40), "int2")
    a, b = torch.randn(2, 40), torch.randn(8, 2)
    with pytest.raises(ValueError, match="int4 scale"):
        lora_k.lora_linear(torch.randn(3, 40), PackedInt(packed, scale[:, :1], IntQuantMeta((8, 40), "int4", 32),
                                                         zero=zero), None, a, b, LoraMeta(scale=1.0))  # fmt: skip


# ----- the layer-level forward takes the fused path -----------------------------------------------------------
LAYER_CONFIGS = {
    "nf4": lambda qk: qk.NF4Config(compute_dtype=torch.float32),
    "int8": lambda qk: qk.Int8WeightConfig(compute_dtype=torch.float32),
    "fp8": lambda qk: qk.FP8WeightConfig(compute_dtype=torch.float32),
    "int4": lambda qk: qk.Int4WeightConfig(group_size=32, compute_dtype=torch.float32),
    "w8a8": lambda qk: qk.Int8DynamicActivationConfig(compute_dtype=torch.float32),
    "fp8-dynamic": lambda qk: qk.FP8DynamicActivationConfig(compute_dtype=torch.float32),
}


@pytest.mark.parametrize("base", list(LAYER_CONFIGS))
def test_layer_forward_takes_fused_path(base, monkeypatch):
    """QLORA_KIT_BACKEND=triton: each weight-only base runs the fused kernel (same values and gradients as the
    unfused layer); layers that quantize their activations (W8A8, fp8 dynamic) never do."""
    import qlora_kit
    from qlora_kit.nn.lora_layers import LoraLayer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(45, 33), nn.ReLU(), nn.Linear(33, 20, bias=False))
    qlora_kit.quantize(model, LAYER_CONFIGS[base](qlora_kit), filter_fn=lambda m, n: True)
    qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2
    for m in layers:
        nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    x = torch.randn(2, 3, 45)

    def run():
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return y.detach(), xi.grad, grads

    monkeypatch.setenv("QLORA_KIT_BACKEND", "triton")
    for m in layers:
        m.fuse = False
    ref_y, ref_dx, ref_grads = run()
    for m in layers:
        m.fuse = True
    calls = []
    apply = lora_k.lora_forward  # (x, x_d, A, B, bias, base, scale): the fused forward of every caller
    monkeypatch.setattr(lora_k, "lora_forward", lambda *a: calls.append(a[-2]) or apply(*a))
    y, dx, grads = run()
    if base in ("w8a8", "fp8-dynamic"):
        assert calls == [], "a layer that quantizes its activations must not take the fused weight-only path"
    else:
        expected = Packed4bit if base == "nf4" else PackedInt
        assert len(calls) == 2 and all(isinstance(c, expected) for c in calls)
        if base != "nf4":
            assert all(c.meta.fmt == base for c in calls)
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    for ours, expected_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["float", "nf4"])
def test_dense_gemm_cublas_variant(kind, monkeypatch):
    """QLORA_KIT_LORA_DENSE_GEMM=cublas (float bases and the 4-bit "dequant" path) gives the same result."""
    from qlora_kit.kernels import matmul_4bit

    monkeypatch.setenv("QLORA_KIT_LORA_DENSE_GEMM", "cublas")
    with matmul_4bit.force_path("dequant"):
        _run_case(13, 40, 24, 8, torch.float32, kind, double_quant=True)
        _run_case(13, 40, 24, 8, torch.float32, kind, dropout=True)
    monkeypatch.setenv("QLORA_KIT_LORA_DENSE_GEMM", "cuda-magic")
    with pytest.raises(ValueError, match="QLORA_KIT_LORA_DENSE_GEMM"):
        _run_case(13, 40, 24, 8, torch.float32, "float")


@pytest.mark.parametrize("kind", ["nf4", "float_t"])
def test_fused_half_precision_other_bases(kind):
    _run_case(33, 64, 48, 8, torch.float16, kind, double_quant=True)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["float", "nf4", "int8", "fp8", "int4"])
@pytest.mark.parametrize("path", ["gemv", "gemv-split2", "gemm", "dequant"])
def test_fused_bf16_on_gpu(kind, path):
    """bf16 (QLoRA's compute dtype) on a real GPU; the interpreter cannot check it (its bf16 tl.dot is wrong)."""
    from qlora_kit.kernels import matmul_4bit

    with matmul_4bit.force_path(_plan(path)):
        _run_case(300, 512, 384, 16, torch.bfloat16, kind, double_quant=True)
        _run_case(7, 200, 96, 16, torch.bfloat16, kind, double_quant=True, dropout=True)


def test_fused_dropout_and_leading_dims():
    _run_case(9, 40, 24, 8, torch.float32, "float", dropout=True, batch=(3,))
    _run_case(9, 40, 24, 8, torch.float32, "nf4", dropout=True, double_quant=True, bias=False)


def test_fused_blocksize_not_dividing_rows():
    # blocks of 128 over a 45 x 70 matrix cross row boundaries; the flattened indexing must follow
    base, dense = _make_base("nf4", 45, 70, torch.float32, blocksize=128)
    x = torch.randn(5, 70, device=DEVICE)
    a, b = torch.randn(4, 70, device=DEVICE), torch.randn(45, 4, device=DEVICE)
    y = lora_k.lora_linear(x, base, None, a, b, LoraMeta(scale=0.5))
    y64 = ref.lora_linear(x.double(), dense, None, a.double(), b.double(), 0.5)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8", "int4"])
@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
def test_backward_keeps_only_packed_weight(path, kind):
    """Between forward and backward nothing of size N x K wider than a byte is kept: only the packed codes."""
    from qlora_kit.kernels import matmul_4bit

    n, k, m, r = 64, 96, 8, 4
    base, _ = _make_base(kind, n, k, torch.float32, double_quant=True)
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    a = torch.randn(r, k, device=DEVICE, requires_grad=True)
    b = torch.randn(n, r, device=DEVICE, requires_grad=True)
    saved = []
    with matmul_4bit.force_path(path):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = lora_k.lora_linear(x, base, None, a, b, LoraMeta(scale=1.0))
        y.sum().backward()
    assert x.grad is not None and a.grad is not None
    wide = [(tuple(t.shape), t.dtype) for t in saved if t.element_size() > 1 and t.numel() >= n * k]
    assert wide == [], f"a dense weight-sized tensor was saved for backward: {wide}"
    codes = base.packed if kind == "nf4" else base.qdata
    assert any(t is codes for t in saved), "the packed codes themselves are what backward reads"


def test_reference_backward_formulas_match_autograd():
    torch.manual_seed(1)
    m, k, n, r, s = 7, 11, 5, 3, 0.7
    x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64)
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, dtype=torch.float64, requires_grad=True)
    g = torch.randn(m, n, dtype=torch.float64)
    ref.lora_linear(x, w, None, a, b, s).backward(g)
    dx, dxd, da, db = ref.lora_linear_backward(g, x.detach(), w, a.detach(), b.detach(), s)
    assert dxd is None
    for ours, auto in ((dx, x.grad), (da, a.grad), (db, b.grad)):
        torch.testing.assert_close(ours, auto)


def test_meta_and_argument_errors():
    w = torch.randn(8, 16)
    a, b, x = torch.randn(2, 16), torch.randn(8, 2), torch.randn(3, 16)
    with pytest.raises(ValueError, match="x_dropped"):
        lora_k.lora_linear(x, w, None, a, b, LoraMeta(scale=1.0, dropout=True))
    with pytest.raises(ValueError, match="frozen"):
        lora_k.lora_linear(x, w.requires_grad_(), None, a, b, LoraMeta(scale=1.0))
    with pytest.raises(ValueError, match="features"):
        lora_k.lora_linear(torch.randn(3, 15), torch.randn(8, 16), None, a, b, LoraMeta(scale=1.0))
