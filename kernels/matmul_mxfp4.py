"""MXFP4 weight-only matmuls (W4A16 with OCP Microscaling weights): forward and grad_input, fused LoRA epilogue.

Math (W of shape (N, K) in blocks of 32 along K; activations fp16 / bf16 / fp32; fp32 accumulation):
    W[n, k] = e2m1(q[n, k]) * 2**(E[n, k // 32] - 127)
    q[n, 2j] = packed[n, j] & 15, q[n, 2j + 1] = packed[n, j] >> 4   (low nibble first: gpt-oss layout)
    forward y = x W^T + b (+ s (x_d A^T) B^T);  grad_input dx = dy W (+ s (dY B) A)
Tiles are loaded as (even, odd) column pairs from contiguous bytes; a decoded tile spans at most 32 columns
(SUB_K <= 32), so it lies in one block and its power-of-two scale is one value per row. Paths ("gemv",
"gemm", "dequant") and tile sizes come from ``kernels/planner.py`` (format "mxfp4"); the epilogues and the
pair products are the shared ones of ``kernels/tiles.py``; "dequant" decodes with ``quant_mxfp4``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .planner import (
    LowRank,
    MatmulPlan,
    dense_product,
    device_arch,
    dot_plan,
    flatten_rows,
    launch_forward,
    launch_grad,
    launch_tiles,
    plan_matmul,
    scratch_buffer,
)
from .quant_mxfp4 import dequantize_mxfp4, e2m1_value
from .reference.mxfp4 import BLOCK, padded_k
from .reference.mxfp4 import quantize_mxfp4 as quantize_mxfp4_ref
from .tiles import forward_tile, grad_mac_pair, grad_tile, mac_pair, store_forward, store_grad_pair

__all__ = ["matmul_mxfp4", "matmul_mxfp4_grad_input"]


@triton.jit
def _mxfp4_tile(packed_ptr, scales_ptr, offs_n, k0, N, K, k_bytes, nblocks, BLOCK_K: tl.constexpr):
    # rows offs_n, columns k0 + 2j (c0: low nibbles) and k0 + 2j + 1 (c1: high nibbles) as E2M1 values in fp32,
    # and the block's scale 2**(E - 127) per row [BN, 1]; BLOCK_K <= 32, so the tile lies in one block
    j = tl.arange(0, BLOCK_K // 2)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    mask = n_ok[:, None] & (k0 + 2 * j < K)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * k_bytes + (k0 // 2 + j)[None, :], mask=mask, other=0).to(tl.int32)
    e = tl.load(scales_ptr + rows * nblocks + tl.minimum(k0 // 32, nblocks - 1), mask=n_ok, other=127).to(tl.int32)
    s = (tl.maximum(e, 1) << 23).to(tl.float32, bitcast=True) * tl.where(e < 1, 0.5, 1.0)  # 2**(e - 127), exact
    return e2m1_value(byte & 15), e2m1_value(byte >> 4), s[:, None]


@triton.jit
def _forward_kernel(
    x_ptr, out_ptr, bias_ptr, packed_ptr, scales_ptr,
    M, N, K, k_bytes, nblocks, stride_xm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = x W^T (+ bias + s (x_d A^T) B^T) over K-slice pid_k; each SUB_K-wide sub-tile has one scale per row
    offs_m, offs_n, m_ok, x_row, k_start, k_end = forward_tile(x_ptr, M, N, K, stride_xm, SPLIT_K, BLOCK_M, BLOCK_N,
                                                               BLOCK_K, GROUP_M)  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for ks in tl.static_range(0, BLOCK_K, SUB_K):
            c0, c1, s = _mxfp4_tile(packed_ptr, scales_ptr, offs_n, k0 + ks, N, K, k_bytes, nblocks, SUB_K)
            k_even = k0 + ks + 2 * tl.arange(0, SUB_K // 2)
            acc = mac_pair(acc, x_row, m_ok, k_even, K, c0, c1, s, s, True, USE_DOT, DOT_PRECISION, BLOCK_N)
    store_forward(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tl.program_id(1), l_ptr, r_ptr, R,
                  stride_lm, stride_lr, stride_rr, stride_rp, lora_scale, HAS_BIAS, HAS_LORA, USE_DOT, SPLIT_K,
                  DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _grad_kernel(
    g_ptr, out_ptr, packed_ptr, scales_ptr,
    M, N, K, k_bytes, nblocks, stride_gm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    HAS_LORA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dx[m-block, k-block] = sum_n dy[m, n] W[n, k] (+ s (dY B) A); even / odd output columns accumulated apart
    offs_m, k0, m_ok, g_row = grad_tile(g_ptr, M, stride_gm, BLOCK_M, BLOCK_K)
    acc0 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc1 = tl.zeros_like(acc0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c0, c1, s = _mxfp4_tile(packed_ptr, scales_ptr, offs_n, k0, N, K, k_bytes, nblocks, BLOCK_K)
        acc0, acc1 = grad_mac_pair(acc0, acc1, g_row, m_ok, offs_n, N, c0, c1, s, s, DOT_PRECISION)
    store_grad_pair(acc0, acc1, out_ptr, offs_m, k0, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr,
                    stride_rp, lora_scale, HAS_LORA, DOT_PRECISION, BLOCK_K, BLOCK_R)  # fmt: skip


def _check(packed, scales, k: int) -> None:
    n, nblocks = packed.shape[0], padded_k(k) // BLOCK
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, nblocks * BLOCK // 2):
        raise ValueError(f"mxfp4 packed must be uint8 of shape ({n}, {nblocks * BLOCK // 2}) for K={k}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")  # fmt: skip
    if scales.dtype != torch.uint8 or tuple(scales.shape) != (n, nblocks):
        raise ValueError(
            f"mxfp4 scales must be uint8 of shape ({n}, {nblocks}), got {scales.dtype} {tuple(scales.shape)}"
        )


def _dense(packed, scales, k: int, dtype: torch.dtype) -> torch.Tensor:
    # the "dequant" path: W decoded into the reused scratch buffer (consume it before the next call)
    return dequantize_mxfp4(packed, scales, k, dtype, out=scratch_buffer(packed.shape[0], k, dtype, packed.device))


def matmul_mxfp4(x, packed, scales, k: int, bias=None, *, plan: MatmulPlan | None = None,
                 lora: LowRank | None = None) -> torch.Tensor:  # fmt: skip
    """y = x W^T + bias (+ s * L Rm) for an MXFP4 weight, in x's dtype.

    Args:
        x: (..., K) fp16 / bf16 / fp32.
        packed: uint8 (N, ceil(K/32) * 16); scales: uint8 E8M0 (N, ceil(K/32)).
        k: K.
        bias: optional (N,).
        plan: force a path ("gemv", "gemm", "dequant"); default from :func:`plan_matmul`.
        lora: a LoRA update added in the epilogue (:class:`LowRank`).

    Returns:
        (..., N) in x's dtype.
    """
    _check(packed, scales, k)
    n = packed.shape[0]
    x2 = flatten_rows(x, k, "x")
    m = x2.shape[0]
    plan = plan or plan_matmul("mxfp4", x2.device, m, n, k)
    plan = dot_plan(plan, x2.dtype, x2.device, plan.path == "gemm")
    if m == 0 or plan.path == "dequant":
        out = dense_product(x2, _dense(packed, scales, k, x2.dtype), bias, lora)
    else:
        tiles = launch_tiles(plan.path, m, BLOCK, device_arch(x2.device), "mxfp4", elem_bytes=x2.element_size(),
                             lora=lora is not None)  # fmt: skip
        out = launch_forward(_forward_kernel, x2, n, (packed, scales), (packed.shape[1], scales.shape[1]), bias, plan,
                             lora, tiles)  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def matmul_mxfp4_grad_input(grad_out, packed, scales, k: int, *, plan: MatmulPlan | None = None,
                            lora: LowRank | None = None) -> torch.Tensor:  # fmt: skip
    """dx = grad_out @ W (+ s * L Rm) for an MXFP4 weight, from the packed codes; in grad_out's dtype."""
    _check(packed, scales, k)
    n = packed.shape[0]
    g2 = flatten_rows(grad_out, n, "grad_out")
    m = g2.shape[0]
    plan = plan or plan_matmul("mxfp4", g2.device, m, n, k)
    plan = dot_plan(plan, g2.dtype, g2.device, uses_dot=True)
    if m == 0 or plan.path == "dequant":
        out = dense_product(g2, _dense(packed, scales, k, g2.dtype), None, lora, grad_input=True)
    else:
        tiles = launch_tiles("grad", m, BLOCK, device_arch(g2.device), "mxfp4", elem_bytes=g2.element_size(),
                             lora=lora is not None)  # fmt: skip
        out = launch_grad(_grad_kernel, g2, k, (packed, scales), (packed.shape[1], scales.shape[1]), lora, tiles)
    return out.reshape(*grad_out.shape[:-1], k)


def gate_calls(dtype: torch.dtype, plan_cls, rows) -> list[tuple]:
    """The launches ``benchmarks/gpu_compile_check.py`` compiles for this family, per activation dtype: (label,
    launcher, args, plan) for the planner's gemv / gemm / grad tile buckets, K with a partial block, bias, split-K,
    and the quantize / dequantize kernels. ``rows(m, k, dtype)`` makes activations."""
    from .quant_mxfp4 import quantize_mxfp4

    n, k, k_odd = 256, 4096, 4040  # 4040: a partial last block of 8 columns
    g = torch.Generator().manual_seed(5)
    w = {kk: quantize_mxfp4_ref(torch.randn(n, kk, generator=g) * 0.05) for kk in (k, k_odd)}
    gemv, gemm = plan_cls("gemv"), plan_cls("gemm")
    out = [("mxfp4 quantize", quantize_mxfp4, (rows(n, k, dtype),), None),
           ("mxfp4 dequantize", dequantize_mxfp4, (*w[k], k, dtype), None)]  # fmt: skip
    for kk, (packed, scales) in w.items():
        for m in (1, 2, 4):
            out.append((f"mxfp4 K={kk} gemv M={m}", matmul_mxfp4, (rows(m, kk, dtype), packed, scales, kk), gemv))
        for m in (16, 32, 64, 128):
            out.append((f"mxfp4 K={kk} gemm M={m}", matmul_mxfp4, (rows(m, kk, dtype), packed, scales, kk), gemm))
        for m in (16, 32, 64):
            out.append((f"mxfp4 K={kk} grad_input M={m}", matmul_mxfp4_grad_input, (rows(m, n, dtype), packed, scales,
                                                                                      kk), gemm))  # fmt: skip
    packed, scales = w[k]
    bias = torch.randn(n).to(dtype)
    out.append(("mxfp4 gemv M=1 bias", matmul_mxfp4, (rows(1, k, dtype), packed, scales, k, bias), gemv))
    out.append(("mxfp4 gemm M=128 bias", matmul_mxfp4, (rows(128, k, dtype), packed, scales, k, bias), gemm))
    out.append(("mxfp4 gemv split4 M=1", matmul_mxfp4, (rows(1, k, dtype), packed, scales, k), plan_cls("gemv", 4)))
    return out
