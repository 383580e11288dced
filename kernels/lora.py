"""Triton kernels: the fused LoRA linear over a float or a packed quantized base weight.

Math (reference: ``kernels/reference/lora.py``), x [M, K], W [N, K], A [r, K], B [N, r], s the scale:

    forward   y  = x W^T + bias + s * (x_d A^T) B^T          x_d = dropout(x), or x itself
    backward  G  = dY B                                       [M, r]
              dX = dY W + s * G A                             (with dropout, s G A goes to x_d instead)
              dA = s * G^T x_d,   dB = s * dY^T (x_d A^T)

The low-rank term is added in the epilogue of the base matmul, so the [M, N] update never goes through
memory. The skinny products x_d A^T and dY B ([M, r]) are computed once per call, i.e. once per row block
rather than once per output tile (a per-tile recompute would cost r / BLOCK_N extra work, 12% at r=16 and
BLOCK_N=128); they are the only activations-sized state besides x_d kept for backward. dA and dB are
reductions over M, left to cuBLAS.

Bases (the weight object handed to :func:`lora_linear`):
    float tensor [N, K] (any strides)                  ``_float_kernel`` (here)
    :class:`Packed4bit` NF4 / FP4 (bitsandbytes layout) ``matmul_4bit`` with a :class:`LowRank` epilogue
    :class:`PackedInt` int4 per group, int8 / fp8 e4m3 per channel: ``matmul_int`` with the same epilogue
The quantized kernels are the base matmuls themselves (``HAS_LORA``), so the fused path follows the
planner (``plan_matmul``, formats "nf4"/"fp4"/"int4"/"int8"/"fp8") exactly as the plain matmul does:
    "gemv" / "gemm": the update is added in the matmul kernel's epilogue (by the first K-slice).
    "dequant" (large M): W is decoded once into the reused scratch buffer, then the dense product runs
        ``_float_kernel`` (update in its epilogue) or, with ``QLORA_KIT_LORA_DENSE_GEMM=cublas``, cuBLAS
        plus one addmm.
dX runs the format's grad_input kernel (gemv and gemm plans) or the dense product ("dequant"), with s G A
in the epilogue. fp8 codes need an sm89+ GPU to be decoded in Triton; older GPUs take the "dequant" path
(decoded by PyTorch). Between forward and backward only the packed weight is kept; the backward decodes
tiles again.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import matmul_4bit as mm4
from . import matmul_int as mi
from .planner import (
    LowRank,
    MatmulPlan,
    dot_plan,
    dot_precision,
    fma_dot,
    interpreting,
    plan_matmul,
    scratch_buffer,
    triton_has_fp8,
)
from .quant_int import launch_dequantize_int4
from .reference.lora import IntQuantMeta, LoraMeta, PackedInt, check_lora_inputs
from .reference.matmul import Packed4bit, Quant4bitMeta
from .tiles import grouped_pids, low_rank

__all__ = [
    "IntQuantMeta",
    "LoraMeta",
    "Packed4bit",
    "PackedInt",
    "Quant4bitMeta",
    "lora_backward",
    "lora_forward",
    "lora_grad_input",
    "lora_linear",
]


# ------------------------------------------------------------------------------------------ float base


@triton.jit
def _float_kernel(
    x_ptr, w_ptr, l_ptr, r_ptr, bias_ptr, out_ptr,
    M, P, Q, R,
    stride_xm, stride_xq, stride_wq, stride_wp,
    stride_lm, stride_lr, stride_rr, stride_rp, stride_om, stride_op,
    scale,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # out[m, p] = sum_q X[m, q] W(q, p) + bias[p] + s * (L Rm)[m, p], W(q, p) = w_ptr[q * swq + p * swp]
    pid_m, pid_p = grouped_pids(M, P, BLOCK_M, BLOCK_P, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_m = offs_m < M
    mask_p = offs_p < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = (q0 + tl.arange(0, BLOCK_Q)).to(tl.int64)
        mask_q = offs_q < Q
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :] * stride_xq,
            mask=mask_m[:, None] & mask_q[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_q[:, None] * stride_wq + offs_p[None, :] * stride_wp,
            mask=mask_q[:, None] & mask_p[None, :],
            other=0.0,
        )
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    if HAS_LORA:
        acc += scale * low_rank(
            l_ptr, r_ptr, offs_m, offs_p, M, P, R, stride_lm, stride_lr, stride_rr, stride_rp, PRECISION, BLOCK_R
        )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


# ----------------------------------------------------------------------------------------- launchers


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _float_gemm(x, w, grad_input, low=None, bias=None, scale=0.0):
    """out = x op(W) (+ bias) (+ s L Rm), op(W) = W^T (forward) or W (grad_input); x 2-D, W [N, K].

    ``low`` = (L [M, r], B [N, r]) in the forward, (L, A [r, K]) for grad_input.
    """
    M, Q = x.shape
    n, k = w.shape
    P = k if grad_input else n
    out = torch.empty((M, P), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    # element (q, p) of op(W): W[p, q] in the forward, W[q, p] for dX
    s_wq, s_wp = (w.stride(0), w.stride(1)) if grad_input else (w.stride(1), w.stride(0))
    if low is not None:
        lo, ro = low
        s_rr, s_rp = (ro.stride(0), ro.stride(1)) if grad_input else (ro.stride(1), ro.stride(0))
        R, s_lm, s_lr = lo.shape[1], lo.stride(0), lo.stride(1)
    else:
        lo = ro = x
        R, s_lm, s_lr, s_rr, s_rp = 1, 0, 0, 0, 0
    if interpreting():
        cfg = dict(BLOCK_M=32, BLOCK_P=32, BLOCK_Q=32, num_warps=4)
    else:
        bm = 16 if M <= 16 else 64 if M <= 64 else 128
        cfg = dict(BLOCK_M=bm, BLOCK_P=128, BLOCK_Q=32 if x.dtype == torch.float32 else 64, num_warps=8 if bm == 128
                   else 4, num_stages=3)  # fmt: skip
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(P, cfg["BLOCK_P"]),)
    _float_kernel[grid](
        x, w, lo, ro, bias if bias is not None else x, out,
        M, P, Q, R,
        x.stride(0), x.stride(1), s_wq, s_wp,
        s_lm, s_lr, s_rr, s_rp, out.stride(0), out.stride(1),
        float(scale),
        HAS_LORA=low is not None, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
        BLOCK_R=_block_r(R), GROUP_M=8, **cfg,
    )  # fmt: skip
    return out


DENSE_GEMM_ENV = "QLORA_KIT_LORA_DENSE_GEMM"


def _dense_gemm(x, w, grad_input, low=None, bias=None, scale=0.0):
    """A product with a dense W (float bases; quantized bases on the "dequant" path).

    ``$QLORA_KIT_LORA_DENSE_GEMM``: "triton" (default) runs ``_float_kernel`` with the update in its
    epilogue; "cublas" runs torch.matmul and adds the update with one addmm (an extra pass over the
    output, but cuBLAS's GEMM). Which is faster depends on the GPU: ``benchmarks/bench_lora.py`` times both.
    fp32 without TF32 always takes cuBLAS on a GPU (``planner.fma_dot``: the Triton kernel would spill).
    """
    choice = os.environ.get(DENSE_GEMM_ENV, "triton")
    if choice not in ("triton", "cublas"):
        raise ValueError(f"{DENSE_GEMM_ENV}={choice!r} is not valid; use 'triton' or 'cublas'")
    if choice == "triton" and not fma_dot(x.dtype, x.device):
        return _float_gemm(x, w, grad_input, low, bias, scale)
    wt = w.to(x.dtype)
    out = x @ wt if grad_input else torch.nn.functional.linear(x, wt, None if bias is None else bias.to(x.dtype))
    if low is not None:
        lo, ro = low
        out.addmm_(lo, ro.to(x.dtype) if grad_input else ro.t().to(x.dtype), alpha=scale)
    return out


def _fmt(w) -> str:
    return w.meta.quant_type if isinstance(w, Packed4bit) else w.meta.fmt


def _plan(w, x: torch.Tensor, n: int, k: int, grad: bool) -> MatmulPlan:
    # fp8 codes are converted by Triton only on sm89+ GPUs (and in the interpreter)
    if _fmt(w) == "fp8" and not triton_has_fp8(x.device):
        return MatmulPlan("dequant")
    plan = plan_matmul(_fmt(w), x.device, x.shape[0], n, k)
    return dot_plan(plan, x.dtype, x.device, grad or plan.path == "gemm")


def _dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` in the reused scratch buffer (the "dequant" path; consume it before the next call)."""
    if isinstance(w, Packed4bit):
        return mm4.dequantize_packed_4bit(w, dtype, reuse=True)
    n, k = w.meta.shape
    if w.meta.fmt == "int4":
        out = scratch_buffer(n, k, dtype, w.qdata.device)
        return launch_dequantize_int4(w.qdata, w.scale, w.zero, out, w.meta.group_size)
    return mi.dequantize_channelwise(w.qdata, w.scale, dtype)


def _quant_forward(x, w, bias, xa, lora_b, scale):
    """y = x W^T + bias + s * xa B^T over a packed weight, the update in the matmul's epilogue on every path."""
    M, K = x.shape
    N = w.meta.shape[0]
    if M == 0:
        return x.new_empty((0, N))
    plan = _plan(w, x, N, K, grad=False)
    if plan.path == "dequant":  # many rows: decode W once into the scratch buffer, then the dense product
        return _dense_gemm(x, _dequantize(w, x.dtype), False, (xa, lora_b), bias, scale)
    low = LowRank(xa, lora_b.t(), scale)
    if isinstance(w, Packed4bit):
        return mm4.matmul_4bit(x, w, bias, plan=plan, lora=low)
    if w.meta.fmt == "int4":
        return mi.matmul_int4(x, w.qdata, w.scale, w.zero, w.meta.group_size, bias, plan=plan, lora=low)
    return mi.matmul_channelwise(x, w.qdata, w.scale, bias, plan=plan, lora=low)


def _quant_grad_input(g, w, low, scale):
    """dX = dY W (+ s G A when ``low`` = (G, A)) from the packed weight."""
    M, N = g.shape
    K = w.meta.shape[1]
    if M == 0:
        return g.new_empty((0, K))
    plan = _plan(w, g, N, K, grad=True)
    if plan.path == "dequant":
        return _dense_gemm(g, _dequantize(w, g.dtype), True, low, None, scale)
    lr = None if low is None else LowRank(low[0], low[1], scale)
    if isinstance(w, Packed4bit):
        return mm4.matmul_4bit_grad_input(g, w, plan=plan, lora=lr)
    if w.meta.fmt == "int4":
        return mi.matmul_int4_grad_input(g, w.qdata, w.scale, w.zero, K, w.meta.group_size, plan=plan, lora=lr)
    return mi.matmul_channelwise_grad_input(g, w.qdata, w.scale, plan=plan, lora=lr)


def _split_weight(base) -> tuple[object, tuple]:
    """(what backward needs to rebuild ``base`` besides tensors, the tensors to save): packed buffers only."""
    if isinstance(base, (Packed4bit, PackedInt)):
        fields = [f for f in base._fields if f != "meta"]
        return (type(base), base.meta, fields), tuple(getattr(base, f) for f in fields)
    return None, (base,)


def _join_weight(kind, tensors: tuple):
    if kind is None:
        return tensors[0]
    cls, meta, fields = kind
    return cls(meta=meta, **dict(zip(fields, tensors, strict=True)))


def lora_forward(x, x_dropped, lora_a, lora_b, bias, base, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) for 2-D x [M, K]: xa = x_d A^T [M, r] (once per row), y = x W^T + bias + s * xa B^T fused.

    ``base``: float weight [N, K] (frozen), :class:`Packed4bit` or :class:`PackedInt` (checked by the caller).
    """
    xa = x_dropped @ lora_a.t().to(x.dtype)
    if isinstance(base, (Packed4bit, PackedInt)):
        return _quant_forward(x, base, bias, xa, lora_b, scale), xa
    return _dense_gemm(x, base, False, (xa, lora_b), bias, scale), xa


def lora_grad_input(grad_out, base, low: tuple | None, scale: float) -> torch.Tensor:
    """dX = dY W (+ s * G A fused in the epilogue when ``low`` = (G [M, r], A [r, K])), from 2-D dY."""
    if isinstance(base, (Packed4bit, PackedInt)):
        return _quant_grad_input(grad_out, base, low, scale)
    return _dense_gemm(grad_out, base, True, low, None, scale)


def lora_backward(grad_out, x_dropped, xa, lora_a, lora_b, base, meta: LoraMeta, needs_x: bool,
                  grad_input=lora_grad_input) -> tuple:  # fmt: skip
    """(dX, dX_d, dA, dB) of the fused LoRA linear (module docstring), ``grad_out`` 2-D.

    dX (when ``needs_x``) comes from ``grad_input(dY, base, low, scale)`` (:func:`lora_grad_input`, or the
    same behind a custom op), with s G A fused in unless dropout sends it to x_d (dX_d); else None.
    """
    grad_out = grad_out.contiguous()
    g = grad_out @ lora_b.to(grad_out.dtype)  # [M, r]
    grad_x = grad_x_dropped = None
    if needs_x:
        grad_x = grad_input(grad_out, base, None if meta.dropout else (g, lora_a), meta.scale)
        if meta.dropout:
            grad_x_dropped = meta.scale * (g @ lora_a.to(g.dtype))
    grad_a = (meta.scale * (g.t() @ x_dropped.to(g.dtype))).to(lora_a.dtype)
    grad_b = (meta.scale * (grad_out.t() @ xa.to(grad_out.dtype))).to(lora_b.dtype)
    return grad_x, grad_x_dropped, grad_a, grad_b


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dropped, lora_a, lora_b, bias, base, meta):
        y, xa = lora_forward(x, x_dropped, lora_a, lora_b, bias, base, meta.scale)
        ctx.w_kind, saved = _split_weight(base)
        ctx.meta = meta
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        # kept for backward: x_d, the [M, r] product, the adapters and the packed (or frozen float) weight
        ctx.save_for_backward(x_dropped, xa, lora_a, lora_b, *saved)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_dropped, xa, lora_a, lora_b, *saved = ctx.saved_tensors
        base = _join_weight(ctx.w_kind, tuple(saved))
        needs_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grads = lora_backward(grad_out, x_dropped, xa, lora_a, lora_b, base, ctx.meta, needs_x)
        grad_bias = grad_out.sum(0).to(ctx.bias_dtype) if ctx.bias_grad else None
        return *grads, grad_bias, None, None


def lora_linear(x: torch.Tensor, base: torch.Tensor | Packed4bit | PackedInt, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta,
                x_dropped: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Fused y = x W^T + bias + s * (x_d A^T) B^T over a frozen float or quantized base, with autograd.

    Args:
        x: input [..., K] (fp16 / bf16 / fp32: the compute dtype).
        base: float weight [N, K] (any strides, frozen), a :class:`Packed4bit` NF4/FP4 weight, or a
            :class:`PackedInt` int8 / fp8 (per channel) or int4 (per group) weight.
        bias: [N] or None.
        lora_a: A [r, K]; lora_b: B [N, r] (any float dtype; their gradients come back in it).
        meta: scale and dropout flag (:class:`LoraMeta`).
        x_dropped: dropout(x) when ``meta.dropout``; otherwise None.

    Returns:
        y [..., N] in the dtype of ``x``.

    Raises:
        ValueError: shapes disagree, the base weight requires grad or its buffers do not match its
            metadata, or x_dropped does not match meta.

    Example:
        >>> y = lora_linear(x, layer.weight, layer.bias, A, B, LoraMeta(scale=2.0))
        >>> w = PackedInt(q.qdata, q.scale, IntQuantMeta(q.shape, "int8"))
        >>> y = lora_linear(x, w, None, A, B, LoraMeta(scale=2.0))
    """
    n, k = check_lora_inputs(x, base, lora_a, lora_b, meta, x_dropped)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, k)
    y = _LoraLinearFn.apply(x2, xd2, lora_a, lora_b, bias, base, meta)
    return y.reshape(*lead, n)
