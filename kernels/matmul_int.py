"""Weight-only integer matmuls: int4 per group (W4A16) and per-channel int8 / fp8 codes (W8A16).

Math (W of shape (N, K), activations fp16 / bf16 / fp32, fp32 accumulation):
    int4:        W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],  g = k // group_size, in fp32
                 q[n, 2j] = packed[n, j] >> 4, q[n, 2j+1] = packed[n, j] & 15 (rows packed separately)
    channelwise: W[n, k] = qdata[n, k] * scale[n]  (qdata int8, or fp8 e4m3 on sm89+ GPUs)
    forward y = x W^T + b; grad_input dx = dy W.

int4 runs the (even, odd) column-pair kernels of ``kernels/matmul_pairs.py`` with ``tiles.int4_tile`` as
their decoder: BLOCK_K divides group_size, so a tile lies in one group and its scale / zero are loaded
once per row. Channelwise codes are exact in
the activation dtype, so the forward multiplies x by the raw codes in ``tl.dot`` and applies the row
scale once in the epilogue. Paths ("gemv", "gemm", "dequant") and tiles come from ``kernels/planner.py``
(formats "int4" and "int8" / "fp8"); every kernel adds an optional LoRA update s * L Rm in its epilogue
(``kernels/tiles.py``; the fused LoRA linear of ``kernels/lora.py``). The "dequant" path decodes int4 with
``quant_int``'s dequantize kernel.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from .matmul_pairs import pair_product
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
    triton_has_fp8,
)
from .quant_int import launch_dequantize_int4
from .tiles import forward_tile, grad_tile, int4_tile, store_forward, store_grad

__all__ = [
    "dequantize_channelwise",
    "matmul_channelwise",
    "matmul_channelwise_grad_input",
    "matmul_int4",
    "matmul_int4_grad_input",
]

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _cw_forward_kernel(
    x_ptr, out_ptr, bias_ptr, q_ptr, scale_ptr,
    M, N, K, stride_xm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y = (x q^T) * scale[None, :] (+ bias + s (x_d A^T) B^T): the codes are exact in x's dtype, so the
    # row scale is applied once, before the epilogue
    offs_m, offs_n, m_ok, x_row, k_start, k_end = forward_tile(x_ptr, M, N, K, stride_xm, SPLIT_K, BLOCK_M, BLOCK_N,
                                                               BLOCK_K, GROUP_M)  # fmt: skip
    n_ok = offs_n < N
    q_row = q_ptr + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < K)[None, :]
        x = tl.load(x_row + offs_k[None, :], mask=m_ok & k_ok, other=0.0)
        q = tl.load(q_row + offs_k[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(q.to(tl.float32).to(x.dtype)), acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    store_forward(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tl.program_id(1), l_ptr, r_ptr, R,
                  stride_lm, stride_lr, stride_rr, stride_rp, lora_scale, HAS_BIAS, HAS_LORA, USE_DOT, SPLIT_K,
                  DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _cw_grad_kernel(
    g_ptr, out_ptr, q_ptr, scale_ptr, M, N, K, stride_gm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    HAS_LORA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dx[m-block, k-block] = sum_n dy[m, n] (q[n, k] * scale[n]) (+ s (dY B) A), W tiles decoded in registers
    offs_m, k0, m_ok, g_row = grad_tile(g_ptr, M, stride_gm, BLOCK_M, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = (offs_k < K)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        q = tl.load(q_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        s = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        g = tl.load(g_row + offs_n[None, :], mask=m_ok & n_ok[None, :], other=0.0)
        acc = tl.dot(g, (q.to(tl.float32) * s[:, None]).to(g.dtype), acc, input_precision=DOT_PRECISION)
    store_grad(acc, out_ptr, offs_m, offs_k, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr,
               stride_rp, lora_scale, HAS_LORA, DOT_PRECISION, BLOCK_R)  # fmt: skip


# ----------------------------------------------------------------------------------------- launchers


def _check_int4(packed, scale, zero, k: int, group_size: int) -> None:
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(
            f"int4 kernels need a power-of-two group_size >= 32, got {group_size}; requantize with 32, 64 or 128"
        )
    n, ngroups = packed.shape[0], -(-k // group_size)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, (k + 1) // 2):
        raise ValueError(
            f"int4 packed must be uint8 of shape ({n}, {(k + 1) // 2}) for K={k}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if tuple(scale.shape) != (n, ngroups) or tuple(zero.shape) != (n, ngroups):
        raise ValueError(f"int4 scale and zero must have shape ({n}, {ngroups}) for K={k} and group_size={group_size}")


def _dequantize_int4(packed, scale, zero, k: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    # the "dequant" path: W decoded into the reused scratch buffer (consume it before the next call)
    out = scratch_buffer(packed.shape[0], k, dtype, packed.device)
    launch_dequantize_int4(packed, scale, zero, out, group_size)
    return out


def matmul_int4(
    x, packed, scale, zero, group_size: int, bias=None, *, plan: MatmulPlan | None = None, lora: LowRank | None = None
) -> torch.Tensor:
    """y = x W^T + bias (+ s * L Rm) for an int4 per-group weight (W4A16), in x's dtype.

    Args:
        x: (..., K) fp16 / bf16 / fp32.
        packed: uint8 (N, ceil(K/2)); scale, zero: (N, ceil(K/group_size)) (bf16 in the format).
        group_size: power of two >= 32.
        bias: optional (N,).
        plan: force a path ("gemv", "gemm", "dequant"); default from :func:`plan_matmul`.
        lora: a LoRA update added in the epilogue (:class:`LowRank`; the fused LoRA linear).

    Returns:
        (..., N) in x's dtype.
    """
    k = x.shape[-1]
    _check_int4(packed, scale, zero, k, group_size)
    n = packed.shape[0]
    dense = partial(_dequantize_int4, packed, scale, zero, k, group_size)
    out = pair_product("int4", flatten_rows(x, k, "x"), n, k, (packed, scale, zero), int4_tile, group_size, dense,
                       bias=bias, plan=plan, lora=lora)  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def matmul_int4_grad_input(
    grad_out, packed, scale, zero, k: int, group_size: int, *, plan: MatmulPlan | None = None,
    lora: LowRank | None = None,
) -> torch.Tensor:  # fmt: skip
    """dx = grad_out @ W (+ s * L Rm) for an int4 per-group weight, from the packed codes; in grad_out's dtype."""
    _check_int4(packed, scale, zero, k, group_size)
    n = packed.shape[0]
    dense = partial(_dequantize_int4, packed, scale, zero, k, group_size)
    out = pair_product("int4", flatten_rows(grad_out, n, "grad_out"), n, k, (packed, scale, zero), int4_tile,
                       group_size, dense, plan=plan, lora=lora, grad=True)  # fmt: skip
    return out.reshape(*grad_out.shape[:-1], k)


def _check_channelwise(qdata, scale) -> None:
    if qdata.dim() != 2 or qdata.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"qdata must be a 2-D int8 or float8_e4m3fn matrix, got {qdata.dtype} {tuple(qdata.shape)}")
    if scale.numel() != qdata.shape[0]:
        raise ValueError(f"scale must hold one value per output row ({qdata.shape[0]}), got {scale.numel()}")


def dequantize_channelwise(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qdata * scale[:, None] in ``dtype``, into the reused scratch buffer (the "dequant" path; consume it
    before the next call). The product is computed in fp32 and rounded once to dtype, as the reference."""
    w = scratch_buffer(qdata.shape[0], qdata.shape[1], dtype, qdata.device)
    w.copy_(qdata)  # exact: int8 and e4m3 codes are representable in fp16 / bf16 / fp32
    return w.mul_(scale.float()[:, None])


def _channelwise_inputs(x, qdata, scale, plan: MatmulPlan | None, grad: bool):
    # (x as rows, fp32 scale, plan, operand kind): shared checks and planning of forward and grad_input
    _check_channelwise(qdata, scale)
    n, k = qdata.shape
    x2 = flatten_rows(x, n if grad else k, "grad_out" if grad else "x")
    fmt = "int8" if qdata.dtype == torch.int8 else "fp8"
    plan = plan or plan_matmul(fmt, x2.device, x2.shape[0], n, k)
    plan = dot_plan(plan, x2.dtype, x2.device, grad or plan.path == "gemm")
    if fmt == "fp8" and not triton_has_fp8(x2.device):
        plan = MatmulPlan("dequant")
    return x2, scale.float().contiguous(), plan, fmt


def matmul_channelwise(
    x, qdata, scale, bias=None, *, plan: MatmulPlan | None = None, lora: LowRank | None = None
) -> torch.Tensor:
    """y = x (qdata * scale[:, None])^T + bias (+ s * L Rm) for an int8 (or fp8 e4m3) per-channel weight.

    Args:
        x: (..., K) fp16 / bf16 / fp32.
        qdata: (N, K) int8 or float8_e4m3fn codes (fp8 needs an sm89+ GPU or the interpreter).
        scale: (N,) fp32.
        bias: optional (N,).
        plan: force a path; default from :func:`plan_matmul` with format "int8" / "fp8".
        lora: a LoRA update added in the epilogue (:class:`LowRank`; the fused LoRA linear).

    Returns:
        (..., N) in x's dtype.
    """
    x2, scale, plan, weight = _channelwise_inputs(x, qdata, scale, plan, grad=False)
    n, m = qdata.shape[0], x2.shape[0]
    if m == 0 or plan.path == "dequant":
        out = dense_product(x2, dequantize_channelwise(qdata, scale, x2.dtype), bias, lora)
    else:
        tiles = launch_tiles(plan.path, m, 128, device_arch(x2.device), weight, elem_bytes=x2.element_size(),
                             lora=lora is not None)  # fmt: skip
        tiles.pop("SUB_K")  # no quantization blocks along K: one tile per step
        out = launch_forward(_cw_forward_kernel, x2, n, (qdata, scale), (), bias, plan, lora, tiles)
    return out.reshape(*x.shape[:-1], n)


def matmul_channelwise_grad_input(
    grad_out, qdata, scale, *, plan: MatmulPlan | None = None, lora: LowRank | None = None
) -> torch.Tensor:
    """dx = grad_out @ (qdata * scale[:, None]) (+ s * L Rm) from the codes; in grad_out's dtype."""
    g2, scale, plan, weight = _channelwise_inputs(grad_out, qdata, scale, plan, grad=True)
    k, m = qdata.shape[1], g2.shape[0]
    if m == 0 or plan.path == "dequant":
        out = dense_product(g2, dequantize_channelwise(qdata, scale, g2.dtype), None, lora, grad_input=True)
    else:
        tiles = launch_tiles("grad", m, 128, device_arch(g2.device), weight, elem_bytes=g2.element_size(),
                             lora=lora is not None)  # fmt: skip
        out = launch_grad(_cw_grad_kernel, g2, k, (qdata, scale), (), lora, tiles)
    return out.reshape(*grad_out.shape[:-1], k)
