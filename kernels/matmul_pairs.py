"""Weight-only matmuls over 4-bit codes decoded as (even, odd) column pairs: int4 per group and MXFP4.

Math (W of shape (N, K); activations fp16 / bf16 / fp32; fp32 accumulation):
    a format's DECODE tile function returns, for rows offs_n and columns k0 + 2j (d0) and k0 + 2j + 1 (d1),
    j < BLOCK_K / 2, the decoded values in fp32 and the scale s [BN, 1] of the quantization group holding
    the tile: W[n, k0 + 2j] = d0 * s, W[n, k0 + 2j + 1] = d1 * s. BLOCK_K divides the group, so one scale
    per row and tile.
    forward y = x W^T + b (+ s_lora (x_d A^T) B^T);  grad_input dx = dy W (+ s_lora (dY B) A)
DECODE's arguments: (packed_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, ngroups, GROUP_SIZE, BLOCK_K);
a format without zero points passes its scale pointer as ``zero_ptr`` and ignores it. The formats'
launchers (``matmul_int.matmul_int4``, ``matmul_mxfp4.matmul_mxfp4`` and their grad_input) check their
operands and call :func:`pair_product`; paths and tiles come from ``kernels/planner.py``, the epilogues and
the pair products from ``kernels/tiles.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .planner import (
    LowRank,
    MatmulPlan,
    dense_product,
    device_arch,
    dot_plan,
    launch_forward,
    launch_grad,
    launch_tiles,
    plan_matmul,
)
from .tiles import forward_tile, grad_mac_pair, grad_tile, mac_pair, store_forward, store_grad_pair

__all__ = ["pair_product"]


@triton.jit
def _forward_kernel(
    x_ptr, out_ptr, bias_ptr, packed_ptr, scale_ptr, zero_ptr,
    M, N, K, k_bytes, ngroups, stride_xm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    DECODE: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = x W^T (+ bias + s (x_d A^T) B^T) over K-slice pid_k, BLOCK_K columns per step as independent
    # SUB_K-wide tiles (one group each); gemv sums x * d per row and scales the row sums, gemm feeds d * s to tl.dot
    offs_m, offs_n, m_ok, x_row, k_start, k_end = forward_tile(x_ptr, M, N, K, stride_xm, SPLIT_K, BLOCK_M, BLOCK_N,
                                                               BLOCK_K, GROUP_M)  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for ks in tl.static_range(0, BLOCK_K, SUB_K):
            d0, d1, s = DECODE(packed_ptr, scale_ptr, zero_ptr, offs_n, k0 + ks, N, K, k_bytes, ngroups, GROUP_SIZE,
                               SUB_K)  # fmt: skip
            k_even = k0 + ks + 2 * tl.arange(0, SUB_K // 2)
            acc = mac_pair(acc, x_row, m_ok, k_even, K, d0, d1, s, s, True, USE_DOT, DOT_PRECISION, BLOCK_N)
    store_forward(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tl.program_id(1), l_ptr, r_ptr, R,
                  stride_lm, stride_lr, stride_rr, stride_rp, lora_scale, HAS_BIAS, HAS_LORA, USE_DOT, SPLIT_K,
                  DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _grad_kernel(
    g_ptr, out_ptr, packed_ptr, scale_ptr, zero_ptr,
    M, N, K, k_bytes, ngroups, stride_gm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    DECODE: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_LORA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dx[m-block, k-block] = sum_n dy[m, n] W[n, k] (+ s (dY B) A); even / odd output columns accumulated apart
    offs_m, k0, m_ok, g_row = grad_tile(g_ptr, M, stride_gm, BLOCK_M, BLOCK_K)
    acc0 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc1 = tl.zeros_like(acc0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        d0, d1, s = DECODE(packed_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, ngroups, GROUP_SIZE, BLOCK_K)
        acc0, acc1 = grad_mac_pair(acc0, acc1, g_row, m_ok, offs_n, N, d0, d1, s, s, DOT_PRECISION)
    store_grad_pair(acc0, acc1, out_ptr, offs_m, k0, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr,
                    stride_rp, lora_scale, HAS_LORA, DOT_PRECISION, BLOCK_K, BLOCK_R)  # fmt: skip


def pair_product(
    fmt: str,
    rows: torch.Tensor,
    n: int,
    k: int,
    weight: tuple,
    decode,
    group_size: int,
    dense: Callable[[torch.dtype], torch.Tensor],
    *,
    bias: torch.Tensor | None = None,
    plan: MatmulPlan | None = None,
    lora: LowRank | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """rows W^T (+ bias) (the forward) or rows W (``grad=True``: grad_input) on the planned path, 2-D.

    Args:
        fmt: the planner's format name ("int4", "mxfp4").
        rows: x [M, k], or grad_out [M, n] with ``grad``.
        n, k: W's shape.
        weight: (packed uint8 [n, k_bytes], scale [n, ngroups], zero [n, ngroups] or the scale again).
        decode: the format's DECODE tile function (``@triton.jit``; see the module docstring).
        group_size: columns per scale (a power of two >= 32); bounds the decoded tile width.
        dense: dtype -> W decoded as a dense [n, k] tensor, for the "dequant" path.
        bias, plan, lora: as the formats' launchers.
        grad: grad_input instead of the forward.

    Returns:
        [M, n] (forward) or [M, k] (grad) in rows' dtype.
    """
    m = rows.shape[0]
    plan = plan or plan_matmul(fmt, rows.device, m, n, k)
    plan = dot_plan(plan, rows.dtype, rows.device, uses_dot=grad or plan.path == "gemm")
    if m == 0 or plan.path == "dequant":
        return dense_product(rows, dense(rows.dtype), bias, lora, grad_input=grad)
    tiles = launch_tiles("grad" if grad else plan.path, m, group_size, device_arch(rows.device), fmt,
                         elem_bytes=rows.element_size(), lora=lora is not None)  # fmt: skip
    sizes, consts = (weight[0].shape[1], weight[1].shape[1]), dict(DECODE=decode, GROUP_SIZE=group_size)
    if grad:
        return launch_grad(_grad_kernel, rows, k, weight, sizes, lora, tiles, **consts)
    return launch_forward(_forward_kernel, rows, n, weight, sizes, bias, plan, lora, tiles, **consts)
