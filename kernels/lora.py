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
    float tensor [N, K] (any strides)                       ``_float_kernel``
    :class:`Packed4bit` NF4 / FP4 (bitsandbytes layout)     ``_nf4_forward_kernel``, ``_nf4_dx_kernel``
    :class:`PackedInt` int8 / fp8 e4m3 per channel          ``_cw_forward_kernel``, ``_cw_dx_kernel``
    :class:`PackedInt` int4 per group                       ``_int4_forward_kernel``, ``_int4_dx_kernel``
Every quantized kernel decodes tiles of the packed weight in registers; 4-bit tiles are decoded as their
even and odd column halves, so each byte is loaded once and both nibbles used (the layout trick of
``kernels/matmul_4bit.py`` / ``matmul_int.py``, whose private kernels are not imported: only their public
dispatcher, tile table and matmuls are). Per-channel codes are exact in the activation dtype, so the
forward multiplies by the raw codes and applies the row scale once, before the LoRA epilogue.

Paths follow the quantized-matmul dispatcher (``plan_matmul``, formats "nf4"/"fp4"/"int4"/"int8"/"fp8"):
    "gemv" (a few rows): broadcast-multiply-reduce, optional split-K; the update s * (x_d A^T) B^T is
        added in the same kernel's epilogue (by the first K-slice), as a reduction over r.
    "gemm": decoded tiles feed ``tl.dot``; the update is one more ``tl.dot`` in the epilogue.
    "dequant" (large M): W is decoded once into the reused scratch buffer, then the dense product runs
        ``_float_kernel`` (update in its epilogue) or, with ``QLORA_KIT_LORA_DENSE_GEMM=cublas``, cuBLAS
        plus one addmm.
dX always runs the transposed-product kernel of the format (gemv and gemm plans) or the dense product
("dequant"), with s G A in the epilogue. fp8 codes need an sm89+ GPU to be decoded in Triton; older GPUs
take the "dequant" path (decoded by PyTorch). Between forward and backward only the packed weight is kept;
the backward decodes tiles again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import matmul_4bit as mm4
from . import matmul_int as mi
from .matmul_4bit import _load_tile
from .matmul_int import _int4_tile
from .reference.lora import IntQuantMeta, PackedInt
from .reference.matmul import Packed4bit, Quant4bitMeta
from .reference.quant_4bit import DYNAMIC_MAP, code_table

__all__ = ["IntQuantMeta", "LoraMeta", "Packed4bit", "PackedInt", "Quant4bitMeta", "lora_linear"]


@dataclass(frozen=True)
class LoraMeta:
    """The non-tensor inputs of the fused LoRA linear.

    Attributes:
        scale: the LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: True when a separate ``x_dropped`` is passed (dropout active).
    """

    scale: float
    dropout: bool = False


# ------------------------------------------------------------------------------------- shared pieces


@triton.jit
def _low_rank(l_ptr, r_ptr, offs_m, offs_p, M, P, R, stride_lm, stride_lr, stride_rr, stride_rp,
              PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    # L[offs_m, :R] @ Rm[:R, offs_p] in fp32 with tl.dot (BLOCK_M >= 16); L holds x_d A^T (forward) or
    # dY B (dX), Rm is B^T or A
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
def _low_rank_rows(l_ptr, r_ptr, offs_m, offs_p, M, P, R, stride_lm, stride_lr, stride_rr, stride_rp,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    # the same product for a few rows (gemv, BLOCK_M < 16): broadcast-multiply-reduce over r in chunks
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    m_ok = (offs_m < M)[:, None]
    p_ok = (offs_p < P)[None, :]
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lo = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr, mask=m_ok & mask_r[None, :],
                     other=0.0)  # fmt: skip
        ro = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp, mask=mask_r[:, None] & p_ok,
                     other=0.0)  # fmt: skip
        # round the adapter to L's dtype first, as the tl.dot path does
        ro = ro.to(lo.dtype).to(tl.float32)
        acc += tl.sum(lo.to(tl.float32)[:, :, None] * ro[None, :, :], axis=1)
    return acc


@triton.jit
def _forward_epilogue(
    acc, out_ptr, bias_ptr, l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_om, stride_lm, stride_lr, stride_rr,
    stride_rp, scale, pid_k, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # + s * (x_d A^T)[rows] B^T[:, cols] + bias, by the first K-slice only; then store (fp32 atomics for split-K)
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    if pid_k == 0:
        if USE_DOT:
            acc += scale * _low_rank(l_ptr, r_ptr, offs_m64, offs_n64, M, N, R, stride_lm, stride_lr, stride_rr,
                                     stride_rp, PRECISION, BLOCK_R)  # fmt: skip
        else:
            acc += scale * _low_rank_rows(l_ptr, r_ptr, offs_m64, offs_n64, M, N, R, stride_lm, stride_lr, stride_rr,
                                          stride_rp, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m64[:, None] * stride_om + offs_n64[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _dx_pair_epilogue(
    acc0, acc1, out_ptr, l_ptr, r_ptr, offs_m, k_even, M, K, R, stride_om, stride_lm, stride_lr, stride_rr,
    stride_rp, scale, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dX even / odd columns (4-bit layouts): + s * (G A) for each half, then two stride-2 stores
    offs_m64 = offs_m.to(tl.int64)
    k_even64 = k_even.to(tl.int64)
    if HAS_LORA:
        acc0 += scale * _low_rank(l_ptr, r_ptr, offs_m64, k_even64, M, K, R, stride_lm, stride_lr, stride_rr,
                                  stride_rp, PRECISION, BLOCK_R)  # fmt: skip
        acc1 += scale * _low_rank(l_ptr, r_ptr, offs_m64, k_even64 + 1, M, K, R, stride_lm, stride_lr, stride_rr,
                                  stride_rp, PRECISION, BLOCK_R)  # fmt: skip
    m_ok = (offs_m < M)[:, None]
    out = out_ptr + offs_m64[:, None] * stride_om + k_even64[None, :]
    tl.store(out, acc0.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even < K)[None, :])
    tl.store(out + 1, acc1.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even + 1 < K)[None, :])


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
def _k_slice(K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    # [k_start, k_end) of K-slice program_id(1); slices are whole multiples of BLOCK_K
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(1) * k_per_split
    return k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def _mac_pair(acc, x0, x1, w0, w1, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    # acc += x0 w0^T + x1 w1^T; w* [BN, BK/2] fp32 (decoded even / odd column halves)
    if USE_DOT:
        acc = tl.dot(x0, tl.trans(w0.to(x0.dtype)), acc, input_precision=PRECISION)
        acc = tl.dot(x1, tl.trans(w1.to(x1.dtype)), acc, input_precision=PRECISION)
    else:
        acc += tl.sum(
            x0.to(tl.float32)[:, None, :] * w0[None, :, :] + x1.to(tl.float32)[:, None, :] * w1[None, :, :], axis=2
        )
    return acc


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


# ------------------------------------------------------------------------------------- NF4 / FP4 base


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
    # W[offs_n, k0 + 2j] and W[offs_n, k0 + 2j + 1] (j < BLOCK_K / 2) in fp32, decoded by the fused matmul's
    # tile loader (any K, tiles may straddle two absmax blocks; code table read from memory)
    c0, c1, s0, s1 = _load_tile(packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, offs_n, k0, N, K,
                                K // 2, nblocks, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, False, False, BLOCK_K)  # fmt: skip
    return c0 * s0, c1 * s1


@triton.jit
def _nf4_forward_kernel(
    x_ptr, out_ptr, bias_ptr, l_ptr, r_ptr,
    M, N, K, R, stride_xm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, nblocks,
    HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = x W^T + bias + s * (x_d A^T) B^T over K-slice pid_k; each K step decodes BLOCK_K / SUB_K tiles
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = (offs_m < M)[:, None]
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_start, k_end = _k_slice(K, SPLIT_K, BLOCK_K)
    j = tl.arange(0, SUB_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for ks in tl.static_range(0, BLOCK_K, SUB_K):
            w0, w1 = _nf4_tile(packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, offs_n, k0 + ks,
                               N, K, nblocks, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, SUB_K)  # fmt: skip
            k_even = k0 + ks + 2 * j
            x0 = tl.load(x_row + k_even[None, :], mask=m_ok & (k_even < K)[None, :], other=0.0)
            x1 = tl.load(x_row + k_even[None, :] + 1, mask=m_ok & (k_even + 1 < K)[None, :], other=0.0)
            acc = _mac_pair(acc, x0, x1, w0, w1, USE_DOT, PRECISION)
    _forward_epilogue(acc, out_ptr, bias_ptr, l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_om, stride_lm, stride_lr,
                      stride_rr, stride_rp, scale, tl.program_id(1), HAS_BIAS, USE_DOT, SPLIT_K, PRECISION, BLOCK_M,
                      BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _nf4_dx_kernel(
    g_ptr, out_ptr, l_ptr, r_ptr,
    M, N, K, R, stride_gm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, nblocks,
    HAS_LORA: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dX[m-block, k-block] = dY W + s * G A, reduced over N; even and odd columns kept apart
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
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
    _dx_pair_epilogue(acc0, acc1, out_ptr, l_ptr, r_ptr, offs_m, k_even, M, K, R, stride_om, stride_lm, stride_lr,
                      stride_rr, stride_rp, scale, HAS_LORA, PRECISION, BLOCK_R)  # fmt: skip


# ------------------------------------------------------------------------------------------ int4 base


@triton.jit
def _int4_forward_kernel(
    x_ptr, out_ptr, bias_ptr, l_ptr, r_ptr,
    M, N, K, R, stride_xm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    packed_ptr, qscale_ptr, zero_ptr, k_bytes, ngroups,
    HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SUB_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = x W^T + bias + s * (x_d A^T) B^T; gemv sums x * (q - zero) per row and scales the row sums
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = (offs_m < M)[:, None]
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_start, k_end = _k_slice(K, SPLIT_K, BLOCK_K)
    j = tl.arange(0, SUB_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for ks in tl.static_range(0, BLOCK_K, SUB_K):
            d0, d1, s = _int4_tile(packed_ptr, qscale_ptr, zero_ptr, offs_n, k0 + ks, N, K, k_bytes, ngroups,
                                   GROUP_SIZE, SUB_K)  # fmt: skip
            k_even = k0 + ks + 2 * j
            x0 = tl.load(x_row + k_even[None, :], mask=m_ok & (k_even < K)[None, :], other=0.0)
            x1 = tl.load(x_row + k_even[None, :] + 1, mask=m_ok & (k_even + 1 < K)[None, :], other=0.0)
            if USE_DOT:
                acc = _mac_pair(acc, x0, x1, d0 * s, d1 * s, USE_DOT, PRECISION)
            else:  # one scale per row of the tile: scale the row sums instead of every element
                part = tl.sum(
                    x0.to(tl.float32)[:, None, :] * d0[None, :, :] + x1.to(tl.float32)[:, None, :] * d1[None, :, :],
                    axis=2,
                )
                acc += part * tl.reshape(s, (BLOCK_N,))[None, :]
    _forward_epilogue(acc, out_ptr, bias_ptr, l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_om, stride_lm, stride_lr,
                      stride_rr, stride_rp, scale, tl.program_id(1), HAS_BIAS, USE_DOT, SPLIT_K, PRECISION, BLOCK_M,
                      BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _int4_dx_kernel(
    g_ptr, out_ptr, l_ptr, r_ptr,
    M, N, K, R, stride_gm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    packed_ptr, qscale_ptr, zero_ptr, k_bytes, ngroups,
    HAS_LORA: tl.constexpr, GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dX[m-block, k-block] = dY W + s * G A, reduced over N; even and odd columns kept apart
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    k_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    m_ok = (offs_m < M)[:, None]
    g_row = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    acc0 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        d0, d1, s = _int4_tile(packed_ptr, qscale_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, ngroups, GROUP_SIZE,
                               BLOCK_K)  # fmt: skip
        g = tl.load(g_row + offs_n[None, :], mask=m_ok & (offs_n < N)[None, :], other=0.0)
        acc0 = tl.dot(g, (d0 * s).to(g.dtype), acc0, input_precision=PRECISION)
        acc1 = tl.dot(g, (d1 * s).to(g.dtype), acc1, input_precision=PRECISION)
    _dx_pair_epilogue(acc0, acc1, out_ptr, l_ptr, r_ptr, offs_m, k_even, M, K, R, stride_om, stride_lm, stride_lr,
                      stride_rr, stride_rp, scale, HAS_LORA, PRECISION, BLOCK_R)  # fmt: skip


# ---------------------------------------------------------------------------- int8 / fp8 per channel


@triton.jit
def _cw_forward_kernel(
    x_ptr, out_ptr, bias_ptr, l_ptr, r_ptr,
    M, N, K, R, stride_xm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    q_ptr, qscale_ptr,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = (x q^T) * qscale[None, :] + bias + s * (x_d A^T) B^T: codes are exact in x's dtype, so the row
    # scale is applied once, before the LoRA epilogue
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = (offs_m < M)[:, None]
    n_ok = offs_n < N
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_row = q_ptr + offs_n.to(tl.int64)[:, None] * K
    k_start, k_end = _k_slice(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < K)[None, :]
        x = tl.load(x_row + offs_k[None, :], mask=m_ok & k_ok, other=0.0)
        q = tl.load(q_row + offs_k[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(q.to(tl.float32).to(x.dtype)), acc, input_precision=PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
    acc = acc * tl.load(qscale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    _forward_epilogue(acc, out_ptr, bias_ptr, l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_om, stride_lm, stride_lr,
                      stride_rr, stride_rp, scale, tl.program_id(1), HAS_BIAS, USE_DOT, SPLIT_K, PRECISION, BLOCK_M,
                      BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _cw_dx_kernel(
    g_ptr, out_ptr, l_ptr, r_ptr,
    M, N, K, R, stride_gm, stride_om, stride_lm, stride_lr, stride_rr, stride_rp, scale,
    q_ptr, qscale_ptr,
    HAS_LORA: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dX[m-block, k-block] = dY (q * qscale[:, None]) + s * G A, W tiles decoded in registers
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = (offs_m < M)[:, None]
    k_ok = (offs_k < K)[None, :]
    g_row = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        q = tl.load(q_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        s = tl.load(qscale_ptr + offs_n, mask=n_ok, other=0.0)
        g = tl.load(g_row + offs_n[None, :], mask=m_ok & n_ok[None, :], other=0.0)
        acc = tl.dot(g, (q.to(tl.float32) * s[:, None]).to(g.dtype), acc, input_precision=PRECISION)
    offs_m64 = offs_m.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    if HAS_LORA:
        acc += scale * _low_rank(l_ptr, r_ptr, offs_m64, offs_k64, M, K, R, stride_lm, stride_lr, stride_rr,
                                 stride_rp, PRECISION, BLOCK_R)  # fmt: skip
    out = out_ptr + offs_m64[:, None] * stride_om + offs_k64[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok & k_ok)


# ----------------------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 unless the user allowed TF32 for matmuls, as torch.matmul does
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


_TABLES: dict[tuple[torch.device, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _nf4_weight_args(w: Packed4bit) -> tuple:
    """(packed, absmax or qabsmax, dynamic map, nested absmax, offset, code table, nblocks) for the 4-bit kernels."""
    key = (w.packed.device, w.meta.quant_type)
    if key not in _TABLES:
        _TABLES[key] = (code_table(w.meta.quant_type).to(w.packed.device), DYNAMIC_MAP.to(w.packed.device))
    code, dmap = _TABLES[key]
    if w.meta.double_quant:
        return w.packed, w.qabsmax, dmap, w.nested_absmax.float(), w.offset.float().reshape(1), code, w.meta.nblocks
    return w.packed, w.absmax.float(), dmap, dmap, dmap, code, w.meta.nblocks  # unused pointers: any fp32 tensor


def _fmt(w) -> str:
    return w.meta.quant_type if isinstance(w, Packed4bit) else w.meta.fmt


def _max_sub_k(w) -> int:
    """The widest decoded tile along K: one absmax block / int4 group at most (per-channel: no limit)."""
    if isinstance(w, Packed4bit):
        return w.meta.blocksize
    return w.meta.group_size if w.meta.fmt == "int4" else 128


def _weight_args(w) -> tuple[tuple, dict]:
    """(pointer / integer arguments, constexprs) describing a quantized weight to its kernels."""
    if isinstance(w, Packed4bit):
        consts = dict(BLOCKSIZE=w.meta.blocksize, DOUBLE_QUANT=w.meta.double_quant, EVEN_K=w.meta.shape[1] % 2 == 0)
        return _nf4_weight_args(w), consts
    if w.meta.fmt == "int4":
        return (w.qdata, w.scale, w.zero, w.qdata.shape[1], w.meta.ngroups), dict(GROUP_SIZE=w.meta.group_size)
    return (w.qdata, w.scale.float().contiguous()), {}


def _triton_decodes(w, device: torch.device) -> bool:
    # Triton converts e4m3 codes only on sm89+ GPUs (and in the interpreter)
    return not (isinstance(w, PackedInt) and w.meta.fmt == "fp8") or mm4.triton_has_fp8(device)


def _plan(w, x: torch.Tensor, n: int, k: int, grad: bool) -> mm4.MatmulPlan:
    if not _triton_decodes(w, x.device):
        return mm4.MatmulPlan("dequant")
    plan = mm4.plan_matmul(_fmt(w), x.device, x.shape[0], n, k)
    return mm4.dot_plan(plan, x.dtype, x.device, grad or plan.path == "gemm")


def _dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` in the reused scratch buffer (the "dequant" path; consume it before the next call)."""
    if isinstance(w, Packed4bit):
        return mm4.dequantize_packed_4bit(w, dtype, reuse=True)
    n, k = w.meta.shape
    if w.meta.fmt == "int4":
        return mi.dequantize_int4(w.qdata, w.scale, w.zero, k, w.meta.group_size, dtype, reuse=True)
    out = mm4.scratch_buffer(n, k, dtype, w.qdata.device)
    out.copy_(w.qdata)  # exact: int8 and e4m3 codes are representable in fp16 / bf16 / fp32
    return out.mul_(w.scale.float()[:, None])  # product in fp32, rounded once to dtype


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
    """A product with a dense W (float bases; quantized bases on the "dequant" path).

    ``$QLORA_KIT_LORA_DENSE_GEMM``: "triton" (default) runs ``_float_kernel`` with the update in its
    epilogue; "cublas" runs torch.matmul and adds the update with one addmm (an extra pass over the
    output, but cuBLAS's GEMM). Which is faster depends on the GPU: ``benchmarks/bench_lora.py`` times both.
    fp32 without TF32 always takes cuBLAS on a GPU (``mm4.fma_dot``: the Triton kernel would spill).
    """
    choice = os.environ.get(DENSE_GEMM_ENV, "triton")
    if choice not in ("triton", "cublas"):
        raise ValueError(f"{DENSE_GEMM_ENV}={choice!r} is not valid; use 'triton' or 'cublas'")
    if choice == "triton" and not mm4.fma_dot(x.dtype, x.device):
        return _float_gemm(x, w, grad_input, low, bias, scale)
    wt = w.to(x.dtype)
    out = x @ wt if grad_input else torch.nn.functional.linear(x, wt, None if bias is None else bias.to(x.dtype))
    if low is not None:
        lo, ro = low
        out.addmm_(lo, ro.to(x.dtype) if grad_input else ro.t().to(x.dtype), alpha=scale)
    return out


_FORWARD_KERNELS = {"nf4": _nf4_forward_kernel, "fp4": _nf4_forward_kernel, "int4": _int4_forward_kernel,
                    "int8": _cw_forward_kernel, "fp8": _cw_forward_kernel}  # fmt: skip
_DX_KERNELS = {"nf4": _nf4_dx_kernel, "fp4": _nf4_dx_kernel, "int4": _int4_dx_kernel, "int8": _cw_dx_kernel,
               "fp8": _cw_dx_kernel}  # fmt: skip


def _quant_forward(x, w, bias, xa, lora_b, scale):
    """y = x W^T + bias + s * xa B^T over a packed weight, the update in the matmul's epilogue on every path."""
    M, K = x.shape
    N = w.meta.shape[0]
    if M == 0:
        return x.new_empty((0, N))
    plan = _plan(w, x, N, K, grad=False)
    if plan.path == "dequant":  # many rows: decode W once into the scratch buffer, then the dense product
        return _dense_gemm(x, _dequantize(w, x.dtype), False, (xa, lora_b), bias, scale)
    fmt, R = _fmt(w), xa.shape[1]
    decodes = fmt not in ("int8", "fp8")
    arch = mm4.device_arch(x.device)
    tiles = mm4.launch_tiles(plan.path, M, _max_sub_k(w), arch, decodes, K % 2 == 0, x.element_size())
    if not decodes and plan.path == "gemm" and tiles["BLOCK_M"] == 32:  # 32 x 64 + the LoRA epilogue spilled
        tiles.update(num_stages=2, BLOCK_K=32, SUB_K=32)  # 8-16 B at 3 stages / K-step 64 (sm_89, sm_90a)
    if not decodes:
        tiles.pop("SUB_K")  # no quantization blocks along K: one tile per step
    split_k = max(1, min(plan.split_k, triton.cdiv(K, tiles["BLOCK_K"])))
    out = mm4.split_k_output(x, N, split_k)
    use_dot = plan.path == "gemm"
    # tl.dot needs r >= 16 (padded); the gemv reduces over r in chunks of at most 16
    block_r = _block_r(R) if use_dot else min(16, triton.next_power_of_2(R))
    weight, consts = _weight_args(w)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]), split_k)
    _FORWARD_KERNELS[fmt][grid](
        x, out, bias if bias is not None else out, xa, lora_b,
        M, N, K, R, x.stride(0), out.stride(0), xa.stride(0), xa.stride(1), lora_b.stride(1), lora_b.stride(0),
        float(scale), *weight,
        HAS_BIAS=bias is not None, USE_DOT=use_dot, SPLIT_K=split_k, PRECISION=_precision(x.dtype), BLOCK_R=block_r,
        GROUP_M=8, **tiles, **consts,
    )  # fmt: skip
    return out.to(x.dtype)


def _quant_grad_input(g, w, low, scale):
    """dX = dY W (+ s G A when ``low`` = (G, A)) from the packed weight."""
    M, N = g.shape
    K = w.meta.shape[1]
    if M == 0:
        return g.new_empty((0, K))
    plan = _plan(w, g, N, K, grad=True)
    if plan.path == "dequant":
        return _dense_gemm(g, _dequantize(w, g.dtype), True, low, None, scale)
    fmt = _fmt(w)
    decodes = _fmt(w) not in ("int8", "fp8")
    tiles = mm4.launch_tiles("grad", M, _max_sub_k(w), mm4.device_arch(g.device), decodes, elem_bytes=g.element_size())
    tiles.pop("SUB_K")
    gb, lora_a = low if low is not None else (g, g)
    R = gb.shape[1] if low is not None else 1
    lora_strides = (gb.stride(0), gb.stride(1), lora_a.stride(0), lora_a.stride(1)) if low is not None else (0,) * 4
    out = g.new_empty((M, K))
    weight, consts = _weight_args(w)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(K, tiles["BLOCK_K"]))
    _DX_KERNELS[fmt][grid](
        g, out, gb, lora_a, M, N, K, R, g.stride(0), out.stride(0), *lora_strides, float(scale), *weight,
        HAS_LORA=low is not None, PRECISION=_precision(g.dtype), BLOCK_R=_block_r(R), **tiles, **consts,
    )  # fmt: skip
    return out


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


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dropped, lora_a, lora_b, bias, base, meta):
        xa = x_dropped @ lora_a.t().to(x.dtype)  # [M, r], once per row
        if isinstance(base, (Packed4bit, PackedInt)):
            y = _quant_forward(x, base, bias, xa, lora_b, meta.scale)
        else:
            y = _dense_gemm(x, base, False, (xa, lora_b), bias, meta.scale)
        ctx.w_kind, saved = _split_weight(base)
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
        base = _join_weight(ctx.w_kind, tuple(saved))
        grad_out = grad_out.contiguous()
        g = grad_out @ lora_b.to(grad_out.dtype)  # [M, r]
        low = None if meta.dropout else (g, lora_a)
        grad_x = grad_x_dropped = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.w_kind is None:
                grad_x = _dense_gemm(grad_out, base, True, low, None, meta.scale)
            else:
                grad_x = _quant_grad_input(grad_out, base, low, meta.scale)
            if meta.dropout:
                grad_x_dropped = meta.scale * (g @ lora_a.to(g.dtype))
        grad_a = (meta.scale * (g.t() @ x_dropped.to(g.dtype))).to(lora_a.dtype)
        grad_b = (meta.scale * (grad_out.t() @ xa.to(grad_out.dtype))).to(lora_b.dtype)
        grad_bias = grad_out.sum(0).to(ctx.bias_dtype) if ctx.bias_grad else None
        return grad_x, grad_x_dropped, grad_a, grad_b, grad_bias, None, None


def lora_linear(
    x: torch.Tensor,
    base: torch.Tensor | Packed4bit | PackedInt,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraMeta,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
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
    if meta.dropout != (x_dropped is not None):
        raise ValueError("fused LoRA: pass x_dropped exactly when meta.dropout is True")
    if isinstance(base, (Packed4bit, PackedInt)):
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
