"""Triton kernels: the fused LoRA linear over a float or a packed 4-bit (NF4 / FP4) base weight.

Math (reference: ``kernels/reference/lora.py``), x [M, K], W [N, K], A [r, K], B [N, r], s the scale:

    forward   y  = x W^T + bias + s * (x_d A^T) B^T          x_d = dropout(x), or x itself
    backward  G  = dY B                                       [M, r]
              dX = dY W + s * G A                             (with dropout, s G A goes to x_d instead)
              dA = s * G^T x_d,   dB = s * dY^T (x_d A^T)

The low-rank term is added in the epilogue of the base matmul (``_low_rank``), so the [M, N] update
never goes through memory. The skinny products x_d A^T and dY B ([M, r]) are computed once per call,
i.e. once per row block rather than once per output tile (a per-tile recompute would cost r / BLOCK_N
extra work, 12% at r=16 and BLOCK_N=128); they are the only activations-sized state besides x_d kept for
backward. dA and dB are reductions over M, left to cuBLAS.

Kernels:
    _float_kernel        out[M, P] = X[M, Q] op(W) + bias + s * L Rm, W read through two strides, so the
                         same kernel computes the forward (op(W) = W^T) and dX (op(W) = W).
    _nf4_forward_kernel  the forward over a 4-bit W, decoded tile by tile (``_nf4_tile``), same epilogue.
    _nf4_dx_kernel       dX = dY W + s G A over a 4-bit W (even / odd output columns).
``_nf4_tile`` decodes a tile as its even and odd column halves, so that with K even each byte is loaded
once and both nibbles are used (the layout trick of ``kernels/matmul_4bit.py``, whose private kernels
are not imported: only its public dispatcher and matmuls are). 4-bit paths follow that dispatcher
(``plan_matmul``): "gemm" runs the kernels above;
"dequant" (large M) decodes W into the reused scratch buffer and runs the dense product on it; "gemv"
(a few rows) runs the plain 4-bit GEMV and adds the low-rank term with one addmm. Dense products (float
bases, the "dequant" path) run ``_float_kernel`` or, with ``QLORA_KIT_LORA_DENSE_GEMM=cublas``, cuBLAS
plus one addmm for the update. Between forward and backward only the packed weight is kept; the
backward decodes tiles again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import matmul_4bit as mm4
from .reference.matmul import Packed4bit, Quant4bitMeta
from .reference.quant_4bit import DYNAMIC_MAP, code_table

__all__ = ["LoraMeta", "Packed4bit", "Quant4bitMeta", "lora_linear"]


@dataclass(frozen=True)
class LoraMeta:
    """The non-tensor inputs of the fused LoRA linear.

    Attributes:
        scale: the LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: True when a separate ``x_dropped`` is passed (dropout active).
    """

    scale: float
    dropout: bool = False


@triton.jit
def _low_rank(l_ptr, r_ptr, offs_m, offs_p, M, P, R, stride_lm, stride_lr, stride_rr, stride_rp,
              PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    # L[offs_m, :R] @ Rm[:R, offs_p] in fp32; L holds x_d A^T (forward) or dY B (dX), Rm is B^T or A
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    lo = tl.load(
        l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
        mask=(offs_m < M)[:, None] & mask_r[None, :],
        other=0.0,
    )
    ro = tl.load(
        r_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
        mask=mask_r[:, None] & (offs_p < P)[None, :],
        other=0.0,
    ).to(lo.dtype)
    return tl.dot(lo, ro, input_precision=PRECISION)


@triton.jit
def _grouped_pid(M, P, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_M: tl.constexpr):
    # GROUP_M row blocks in a row share the W tiles they read (L2 reuse)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_p = tl.cdiv(P, BLOCK_P)
    group = GROUP_M * num_p
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def _block_absmax(blk, mask, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, DOUBLE_QUANT: tl.constexpr):
    # fp32 absmax of blocks ``blk``; with double quantization DYNAMIC_MAP[q] * nested[blk // 256] + offset
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)
        return tl.load(dmap_ptr + qa) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _nf4_tile(
    packed_ptr,
    absmax_ptr,
    dmap_ptr,
    nested_ptr,
    offset_ptr,
    code_ptr,
    offs_n,
    k0,
    N,
    K,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # W[offs_n, k0 + 2j] and W[offs_n, k0 + 2j + 1] (j < BLOCK_K / 2) in fp32. Element (n, k) is flat index
    # n K + k: byte (n K + k) // 2, high nibble when even. BLOCK_K <= BLOCKSIZE, so a tile row touches at
    # most two absmax blocks (blocks straddle rows when K % BLOCKSIZE != 0).
    j = tl.arange(0, BLOCK_K // 2)
    k_even = k0 + 2 * j
    n_ok = offs_n < N
    m0 = n_ok[:, None] & (k_even < K)[None, :]
    m1 = n_ok[:, None] & (k_even + 1 < K)[None, :]
    row = offs_n.to(tl.int64) * K  # flat index of (n, 0)
    if EVEN_K:  # rows start on a byte: one byte holds the (even, odd) pair
        byte = tl.load(packed_ptr + (row // 2)[:, None] + (k_even // 2)[None, :], mask=m0, other=0).to(tl.int32)
        q0 = byte >> 4
        q1 = byte & 15
    else:  # odd rows start mid-byte: the pair's nibbles come from two bytes
        i0 = row[:, None] + k_even[None, :]
        odd = (i0 & 1).to(tl.int32)
        b0 = tl.load(packed_ptr + (i0 >> 1), mask=m0, other=0).to(tl.int32)
        b1 = tl.load(packed_ptr + ((i0 + 1) >> 1), mask=m1, other=0).to(tl.int32)
        q0 = (b0 >> (4 - 4 * odd)) & 15
        q1 = (b1 >> (4 * odd)) & 15
    first = (row + k0) // BLOCKSIZE
    a_first = _block_absmax(first, n_ok, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, DOUBLE_QUANT)
    a_next = _block_absmax(first + 1, n_ok & (first + 1 < nblocks), absmax_ptr, dmap_ptr, nested_ptr, offset_ptr,
                           DOUBLE_QUANT)  # fmt: skip
    split = ((first + 1) * BLOCKSIZE - row)[:, None]  # first column of the next block, per row
    s0 = tl.where(k_even[None, :] < split, a_first[:, None], a_next[:, None])
    s1 = tl.where(k_even[None, :] + 1 < split, a_first[:, None], a_next[:, None])
    return tl.load(code_ptr + q0) * s0, tl.load(code_ptr + q1) * s1


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
    pid_m, pid_p = _grouped_pid(M, P, BLOCK_M, BLOCK_P, GROUP_M)
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
        acc += scale * _low_rank(
            l_ptr, r_ptr, offs_m, offs_p, M, P, R, stride_lm, stride_lr, stride_rr, stride_rp, PRECISION, BLOCK_R
        )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


@triton.jit
def _nf4_forward_kernel(
    x_ptr, out_ptr, bias_ptr, packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, l_ptr, r_ptr,
    M, N, K, R, nblocks, stride_xm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = x W^T + bias + s * (x_d A^T) B^T; W tiles decoded as (even, odd) column halves (see matmul_4bit)
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = (offs_m < M)[:, None]
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    j = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w0, w1 = _nf4_tile(packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, offs_n, k0, N, K,
                           nblocks, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, BLOCK_K)  # fmt: skip
        k_even = k0 + 2 * j
        x0 = tl.load(x_row + k_even[None, :], mask=m_ok & (k_even < K)[None, :], other=0.0)
        x1 = tl.load(x_row + k_even[None, :] + 1, mask=m_ok & (k_even + 1 < K)[None, :], other=0.0)
        acc = tl.dot(x0, tl.trans(w0.to(x0.dtype)), acc, input_precision=PRECISION)
        acc = tl.dot(x1, tl.trans(w1.to(x1.dtype)), acc, input_precision=PRECISION)
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    acc += scale * _low_rank(
        l_ptr, r_ptr, offs_m64, offs_n64, M, N, R, stride_lm, stride_lr, stride_rr, stride_rp, PRECISION, BLOCK_R
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok & (offs_n < N)[None, :])


@triton.jit
def _nf4_dx_kernel(
    g_ptr, out_ptr, packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, l_ptr, r_ptr,
    M, N, K, R, nblocks, stride_gm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dX[m-block, k-block] = dY W + s * G A, reduced over N; even and odd columns kept apart
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    k_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    m_ok = (offs_m < M)[:, None]
    g_row = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    acc0 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w0, w1 = _nf4_tile(packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, offs_n, k0, N, K,
                           nblocks, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, BLOCK_K)  # fmt: skip
        g = tl.load(g_row + offs_n[None, :], mask=m_ok & (offs_n < N)[None, :], other=0.0)
        acc0 = tl.dot(g, w0.to(g.dtype), acc0, input_precision=PRECISION)
        acc1 = tl.dot(g, w1.to(g.dtype), acc1, input_precision=PRECISION)
    offs_m64 = offs_m.to(tl.int64)
    k_even64 = k_even.to(tl.int64)
    acc0 += scale * _low_rank(
        l_ptr, r_ptr, offs_m64, k_even64, M, K, R, stride_lm, stride_lr, stride_rr, stride_rp, PRECISION, BLOCK_R
    )
    acc1 += scale * _low_rank(
        l_ptr, r_ptr, offs_m64, k_even64 + 1, M, K, R, stride_lm, stride_lr, stride_rr, stride_rp, PRECISION, BLOCK_R
    )
    out = out_ptr + offs_m64[:, None] * stride_om + k_even64[None, :]
    tl.store(out, acc0.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even < K)[None, :])
    tl.store(out + 1, acc1.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even + 1 < K)[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 unless the user allowed TF32 for matmuls, as torch.matmul does
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


_TABLES: dict[tuple[torch.device, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _weight_args(w: Packed4bit) -> tuple:
    """(packed, absmax or qabsmax, dynamic map, nested absmax, offset, code table) for the 4-bit kernels."""
    key = (w.packed.device, w.meta.quant_type)
    if key not in _TABLES:
        _TABLES[key] = (code_table(w.meta.quant_type).to(w.packed.device), DYNAMIC_MAP.to(w.packed.device))
    code, dmap = _TABLES[key]
    if w.meta.double_quant:
        return w.packed, w.qabsmax, dmap, w.nested_absmax.float(), w.offset.float().reshape(1), code
    return w.packed, w.absmax.float(), dmap, dmap, dmap, code  # unused pointers: any fp32 tensor


def _weight_consts(meta: Quant4bitMeta, block_k: int) -> dict:
    return dict(BLOCKSIZE=meta.blocksize, DOUBLE_QUANT=meta.double_quant, EVEN_K=meta.shape[1] % 2 == 0,
                BLOCK_K=min(block_k, meta.blocksize))  # fmt: skip


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
    if _interpreting():
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
        HAS_LORA=low is not None, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
        BLOCK_R=_block_r(R), GROUP_M=8, **cfg,
    )  # fmt: skip
    return out


DENSE_GEMM_ENV = "QLORA_KIT_LORA_DENSE_GEMM"


def _dense_gemm(x, w, grad_input, low=None, bias=None, scale=0.0):
    """A product with a dense W (float bases; 4-bit bases on the "dequant" path).

    ``$QLORA_KIT_LORA_DENSE_GEMM``: "triton" (default) runs ``_float_kernel`` with the update in its
    epilogue; "cublas" runs torch.matmul and adds the update with one addmm (an extra pass over the
    output, but cuBLAS's GEMM). Which is faster depends on the GPU: ``benchmarks/bench_lora.py`` times both.
    """
    choice = os.environ.get(DENSE_GEMM_ENV, "triton")
    if choice == "triton":
        return _float_gemm(x, w, grad_input, low, bias, scale)
    if choice != "cublas":
        raise ValueError(f"{DENSE_GEMM_ENV}={choice!r} is not valid; use 'triton' or 'cublas'")
    wt = w.to(x.dtype)
    out = x @ wt if grad_input else torch.nn.functional.linear(x, wt, None if bias is None else bias.to(x.dtype))
    if low is not None:
        lo, ro = low
        out.addmm_(lo, ro.to(x.dtype) if grad_input else ro.t().to(x.dtype), alpha=scale)
    return out


def _nf4_config(M: int) -> dict:
    if _interpreting():
        return dict(bm=16, bn=32, bk=64, num_warps=4, num_stages=1)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    return dict(bm=bm, bn=64 if M <= 64 else 128, bk=64, num_warps=4 if bm * 128 <= 64 * 64 else 8, num_stages=3)


def _nf4_forward(x, w: Packed4bit, bias, xa, lora_b, scale):
    M, K = x.shape
    N = w.meta.shape[0]
    plan = mm4.plan_matmul(w.meta.quant_type, x.device, M, N, K)
    if plan.path == "gemv":  # a few rows: the 4-bit GEMV, then one tiny addmm for the update
        y = mm4.matmul_4bit(x, w, bias, plan=plan)
        return torch.addmm(y, xa, lora_b.t().to(y.dtype), alpha=scale)
    if plan.path == "dequant":  # many rows: decode W once into the scratch buffer, then the float kernel
        wd = mm4.dequantize_packed_4bit(w, x.dtype, reuse=True)
        return _dense_gemm(x, wd, False, (xa, lora_b), bias, scale)
    c = _nf4_config(M)
    consts = _weight_consts(w.meta, c["bk"])
    out = x.new_empty((M, N))
    grid = (triton.cdiv(M, c["bm"]) * triton.cdiv(N, c["bn"]),)
    _nf4_forward_kernel[grid](
        x, out, bias if bias is not None else out, *_weight_args(w), xa, lora_b,
        M, N, K, xa.shape[1], w.meta.nblocks, x.stride(0), out.stride(0),
        xa.stride(0), xa.stride(1), lora_b.stride(1), lora_b.stride(0), float(scale),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), BLOCK_M=c["bm"], BLOCK_N=c["bn"],
        BLOCK_R=_block_r(xa.shape[1]), GROUP_M=8, num_warps=c["num_warps"], num_stages=c["num_stages"], **consts,
    )  # fmt: skip
    return out


def _nf4_grad_input(g, w: Packed4bit, low, scale):
    M, N = g.shape
    K = w.meta.shape[1]
    if low is None:
        return mm4.matmul_4bit_grad_input(g, w)
    plan = mm4.plan_matmul(w.meta.quant_type, g.device, M, N, K)
    if plan.path == "dequant":
        wd = mm4.dequantize_packed_4bit(w, g.dtype, reuse=True)
        return _dense_gemm(g, wd, True, low, None, scale)
    gb, lora_a = low
    c = _nf4_config(M)
    consts = _weight_consts(w.meta, c["bk"])
    out = g.new_empty((M, K))
    grid = (triton.cdiv(M, c["bm"]), triton.cdiv(K, consts["BLOCK_K"]))
    _nf4_dx_kernel[grid](
        g, out, *_weight_args(w), gb, lora_a,
        M, N, K, gb.shape[1], w.meta.nblocks, g.stride(0), out.stride(0),
        gb.stride(0), gb.stride(1), lora_a.stride(0), lora_a.stride(1), float(scale),
        PRECISION=_precision(g.dtype), BLOCK_M=c["bm"], BLOCK_N=min(c["bn"], 64), BLOCK_R=_block_r(gb.shape[1]),
        num_warps=4, num_stages=c["num_stages"], **consts,
    )  # fmt: skip
    return out


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dropped, lora_a, lora_b, bias, base, meta):
        xa = x_dropped @ lora_a.t().to(x.dtype)  # [M, r], once per row
        if isinstance(base, Packed4bit):
            y = _nf4_forward(x, base, bias, xa, lora_b, meta.scale)
            ctx.w_meta = base.meta
            saved = (base.packed, base.absmax, base.qabsmax, base.nested_absmax, base.offset)
        else:
            y = _dense_gemm(x, base, False, (xa, lora_b), bias, meta.scale)
            ctx.w_meta = None
            saved = (base,)
        ctx.meta = meta
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        # kept for backward: x_d, the [M, r] product, the adapters and the packed (or frozen float) weight
        ctx.save_for_backward(x_dropped, xa, lora_a, lora_b, *saved)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        meta = ctx.meta
        x_dropped, xa, lora_a, lora_b, *saved = ctx.saved_tensors
        if ctx.w_meta is None:
            base = saved[0]
        else:
            packed, absmax, qabsmax, nested, offset = saved
            base = Packed4bit(packed, ctx.w_meta, absmax, qabsmax, nested, offset)
        grad_out = grad_out.contiguous()
        g = grad_out @ lora_b.to(grad_out.dtype)  # [M, r]
        low = None if meta.dropout else (g, lora_a)
        grad_x = grad_x_dropped = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if isinstance(base, Packed4bit):
                grad_x = _nf4_grad_input(grad_out, base, low, meta.scale)
            else:
                grad_x = _dense_gemm(grad_out, base, True, low, None, meta.scale)
            if meta.dropout:
                grad_x_dropped = meta.scale * (g @ lora_a.to(g.dtype))
        grad_a = (meta.scale * (g.t() @ x_dropped.to(g.dtype))).to(lora_a.dtype)
        grad_b = (meta.scale * (grad_out.t() @ xa.to(grad_out.dtype))).to(lora_b.dtype)
        grad_bias = grad_out.sum(0).to(ctx.bias_dtype) if ctx.bias_grad else None
        return grad_x, grad_x_dropped, grad_a, grad_b, grad_bias, None, None


def lora_linear(
    x: torch.Tensor,
    base: torch.Tensor | Packed4bit,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraMeta,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused y = x W^T + bias + s * (x_d A^T) B^T over a frozen float or 4-bit base, with autograd.

    Args:
        x: input [..., K] (fp16 / bf16 / fp32: the compute dtype).
        base: float weight [N, K] (any strides, frozen) or a :class:`Packed4bit` NF4/FP4 weight.
        bias: [N] or None.
        lora_a: A [r, K]; lora_b: B [N, r] (any float dtype; their gradients come back in it).
        meta: scale and dropout flag (:class:`LoraMeta`).
        x_dropped: dropout(x) when ``meta.dropout``; otherwise None.

    Returns:
        y [..., N] in the dtype of ``x``.

    Raises:
        ValueError: shapes disagree, the base weight requires grad, or x_dropped does not match meta.

    Example:
        >>> y = lora_linear(x, layer.weight, layer.bias, A, B, LoraMeta(scale=2.0))
    """
    if meta.dropout != (x_dropped is not None):
        raise ValueError("fused LoRA: pass x_dropped exactly when meta.dropout is True")
    if isinstance(base, Packed4bit):
        base.check()
        n, k = base.meta.shape
    else:
        if base.requires_grad:
            raise ValueError("fused LoRA: the base weight must be frozen (requires_grad=False)")
        n, k = base.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k or tuple(lora_a.shape) != (r, k) or tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"fused LoRA: shapes disagree: input features {x.shape[-1]}, base weight {(n, k)}, "
            f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} (need A [r, {k}] and B [{n}, r])"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, k)
    y = _LoraLinearFn.apply(x2, xd2, lora_a, lora_b, bias, base, meta)
    return y.reshape(*lead, n)
