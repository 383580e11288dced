"""Weight-only integer matmuls: int4 per group (W4A16) and per-channel int8 / fp8 codes (W8A16).

Math (W of shape (N, K), activations fp16 / bf16 / fp32, fp32 accumulation):
    int4:        W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],  g = k // group_size, in fp32
                 q[n, 2j] = packed[n, j] >> 4, q[n, 2j+1] = packed[n, j] & 15 (rows packed separately)
    channelwise: W[n, k] = qdata[n, k] * scale[n]  (qdata int8, or fp8 e4m3 on sm89+ GPUs)
    forward y = x W^T + b; grad_input dx = dy W.

int4 tiles are loaded as (even, odd) column pairs from contiguous bytes; BLOCK_K divides group_size, so
a tile lies in one group and its scale / zero are loaded once per row. Channelwise codes are exact in
the activation dtype, so the forward multiplies x by the raw codes in ``tl.dot`` and applies the row
scale once in the epilogue. Paths ("gemv", "gemm", "dequant") and their choice are shared with the
4-bit kernels (:func:`qlora_kit.kernels.matmul_4bit.plan_matmul`, formats "int4" and "int8"/"fp8").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul_4bit import (
    MatmulPlan,
    device_arch,
    dot_plan,
    dot_precision,
    flatten_rows,
    interpreting,
    launch_tiles,
    plan_matmul,
    scratch_buffer,
    split_k_output,
    triton_has_fp8,
)

__all__ = [
    "dequantize_int4",
    "matmul_channelwise",
    "matmul_channelwise_grad_input",
    "matmul_int4",
    "matmul_int4_grad_input",
]

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _nibble_to_f32(q):
    # exact int 0..15 -> fp32 without a (quarter-rate) int->float convert: 2**23 + q has q in its mantissa
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _int4_tile(
    packed_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, ngroups, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr
):
    # Tile of W at rows offs_n, columns k0 + 2j (d0) and k0 + 2j + 1 (d1), as q - zero in fp32, and the
    # row scale s [BN, 1]: W = d * s. BLOCK_K divides GROUP_SIZE, so the tile lies in one group per row.
    j = tl.arange(0, BLOCK_K // 2)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    mask = n_ok[:, None] & (k0 + 2 * j < K)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * k_bytes + (k0 // 2 + j)[None, :], mask=mask, other=0).to(tl.int32)
    g = tl.minimum(k0 // GROUP_SIZE, ngroups - 1)  # a tile past K must not read past the end
    s = tl.load(scale_ptr + rows * ngroups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    z = tl.load(zero_ptr + rows * ngroups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    d0 = _nibble_to_f32(byte >> 4) - z
    d1 = _nibble_to_f32(byte & 15) - z
    return d0, d1, s


@triton.jit
def _grouped_pids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # program id -> (m-block, n-block), GROUP_M row blocks at a time so they share W tiles in L2
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * grid_n)) % size_m, (pid % (GROUP_M * grid_n)) // size_m


@triton.jit
def _int4_forward_kernel(
    x_ptr,
    out_ptr,
    bias_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    M,
    N,
    K,
    k_bytes,
    ngroups,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SUB_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # y = x W^T over K-slice pid_k, BLOCK_K columns per step as independent SUB_K-wide tiles; gemv sums
    # x * (q - zero) per row and scales the row sums, gemm feeds (q - zero) * scale to tl.dot.
    pid_m, pid_n = _grouped_pids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = (offs_m < M)[:, None]
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    j = tl.arange(0, SUB_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for ks in tl.static_range(0, BLOCK_K, SUB_K):
            d0, d1, s = _int4_tile(
                packed_ptr, scale_ptr, zero_ptr, offs_n, k0 + ks, N, K, k_bytes, ngroups, GROUP_SIZE, SUB_K
            )
            k_even = k0 + ks + 2 * j
            x0 = tl.load(x_row + k_even[None, :], mask=m_ok & (k_even < K)[None, :], other=0.0)
            x1 = tl.load(x_row + k_even[None, :] + 1, mask=m_ok & (k_even + 1 < K)[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(x0, tl.trans((d0 * s).to(x0.dtype)), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(x1, tl.trans((d1 * s).to(x1.dtype)), acc, input_precision=DOT_PRECISION)
            else:
                part = tl.sum(
                    x0.to(tl.float32)[:, None, :] * d0[None, :, :] + x1.to(tl.float32)[:, None, :] * d1[None, :, :],
                    axis=2,
                )
                acc += part * tl.reshape(s, (BLOCK_N,))[None, :]
    _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _store_output(
    acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid_k, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr
):
    # epilogue: + bias (once, by the first K-slice), then store, or fp32 atomic add for split-K
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _int4_grad_kernel(
    g_ptr,
    out_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    M,
    N,
    K,
    k_bytes,
    ngroups,
    stride_gm,
    stride_om,
    GROUP_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dx[m-block, k-block] = sum_n dy[m, n] W[n, k]; even / odd output columns accumulated apart
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    k_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    m_ok = (offs_m < M)[:, None]
    g_row = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    acc0 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        d0, d1, s = _int4_tile(packed_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, ngroups, GROUP_SIZE, BLOCK_K)
        g = tl.load(g_row + offs_n[None, :], mask=m_ok & (offs_n < N)[None, :], other=0.0)
        acc0 = tl.dot(g, (d0 * s).to(g.dtype), acc0, input_precision=DOT_PRECISION)
        acc1 = tl.dot(g, (d1 * s).to(g.dtype), acc1, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + k_even[None, :]
    tl.store(out, acc0.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even < K)[None, :])
    tl.store(out + 1, acc1.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even + 1 < K)[None, :])


@triton.jit
def _int4_dequant_kernel(
    out_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    N,
    K,
    k_bytes,
    ngroups,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    d0, d1, s = _int4_tile(packed_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, ngroups, GROUP_SIZE, BLOCK_K)
    w = tl.reshape(tl.join(d0 * s, d1 * s), (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _cw_forward_kernel(
    x_ptr,
    out_ptr,
    bias_ptr,
    q_ptr,
    scale_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # y = (x q^T) * scale[None, :]: the codes are exact in x's dtype, the row scale goes in the epilogue
    pid_m, pid_n = _grouped_pids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = (offs_m < M)[:, None]
    n_ok = offs_n < N
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_row = q_ptr + offs_n.to(tl.int64)[:, None] * K
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
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
    _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _cw_grad_kernel(
    g_ptr,
    out_ptr,
    q_ptr,
    scale_ptr,
    M,
    N,
    K,
    stride_gm,
    stride_om,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dx[m-block, k-block] = sum_n dy[m, n] (q[n, k] * scale[n]), W tiles dequantized in registers
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
        s = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        g = tl.load(g_row + offs_n[None, :], mask=m_ok & n_ok[None, :], other=0.0)
        acc = tl.dot(g, (q.to(tl.float32) * s[:, None]).to(g.dtype), acc, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok & k_ok)


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


def dequantize_int4(packed, scale, zero, k: int, group_size: int, dtype: torch.dtype, *, reuse: bool = False):
    """The (N, K) int4 weight in ``dtype`` decoded by a Triton kernel (``reuse``: into the scratch buffer)."""
    _check_int4(packed, scale, zero, k, group_size)
    n = packed.shape[0]
    if reuse:
        out = scratch_buffer(n, k, dtype, packed.device)
    else:
        out = torch.empty((n, k), device=packed.device, dtype=dtype)
    bn, bk = 32, min(64 if interpreting() else 128, group_size)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _int4_dequant_kernel[grid](
        out, packed, scale, zero, n, k, packed.shape[1], scale.shape[1], GROUP_SIZE=group_size, BLOCK_N=bn, BLOCK_K=bk
    )
    return out


def matmul_int4(x, packed, scale, zero, group_size: int, bias=None, *, plan: MatmulPlan | None = None) -> torch.Tensor:
    """y = x W^T + bias for an int4 per-group weight (W4A16), in x's dtype.

    Args:
        x: (..., K) fp16 / bf16 / fp32.
        packed: uint8 (N, ceil(K/2)); scale, zero: (N, ceil(K/group_size)) (bf16 in the format).
        group_size: power of two >= 32.
        bias: optional (N,).
        plan: force a path ("gemv", "gemm", "dequant"); default from :func:`plan_matmul`.

    Returns:
        (..., N) in x's dtype.
    """
    k = x.shape[-1]
    _check_int4(packed, scale, zero, k, group_size)
    n = packed.shape[0]
    x2 = flatten_rows(x, k, "x")
    m = x2.shape[0]
    plan = plan or plan_matmul("int4", x2.device, m, n, k)
    plan = dot_plan(plan, x2.dtype, x2.device, plan.path == "gemm")
    if m == 0 or plan.path == "dequant":
        w = dequantize_int4(packed, scale, zero, k, group_size, x2.dtype, reuse=True)
        out = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x2.dtype))
    else:
        tiles = launch_tiles(plan.path, m, group_size, device_arch(x2.device), elem_bytes=x2.element_size())
        split_k = max(1, min(plan.split_k, triton.cdiv(k, tiles["BLOCK_K"])))
        out = split_k_output(x2, n, split_k)
        grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]), split_k)
        _int4_forward_kernel[grid](
            x2,
            out,
            bias if bias is not None else out,
            packed,
            scale,
            zero,
            m,
            n,
            k,
            packed.shape[1],
            scale.shape[1],
            x2.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            GROUP_SIZE=group_size,
            USE_DOT=plan.path == "gemm",
            DOT_PRECISION=dot_precision(x2.dtype),
            SPLIT_K=split_k,
            GROUP_M=8,
            **tiles,
        )
        out = out.to(x2.dtype)
    return out.reshape(*x.shape[:-1], n)


def matmul_int4_grad_input(
    grad_out, packed, scale, zero, k: int, group_size: int, *, plan: MatmulPlan | None = None
) -> torch.Tensor:
    """dx = grad_out @ W for an int4 per-group weight, from the packed codes; in grad_out's dtype."""
    _check_int4(packed, scale, zero, k, group_size)
    n = packed.shape[0]
    g2 = flatten_rows(grad_out, n, "grad_out")
    m = g2.shape[0]
    plan = plan or plan_matmul("int4", g2.device, m, n, k)
    plan = dot_plan(plan, g2.dtype, g2.device, uses_dot=True)
    if m == 0 or plan.path == "dequant":
        out = torch.matmul(g2, dequantize_int4(packed, scale, zero, k, group_size, g2.dtype, reuse=True))
    else:
        tiles = launch_tiles("grad", m, group_size, device_arch(g2.device), elem_bytes=g2.element_size())
        tiles.pop("SUB_K")
        out = g2.new_empty((m, k))
        grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(k, tiles["BLOCK_K"]))
        _int4_grad_kernel[grid](
            g2,
            out,
            packed,
            scale,
            zero,
            m,
            n,
            k,
            packed.shape[1],
            scale.shape[1],
            g2.stride(0),
            out.stride(0),
            GROUP_SIZE=group_size,
            DOT_PRECISION=dot_precision(g2.dtype),
            **tiles,
        )
    return out.reshape(*grad_out.shape[:-1], k)


def _check_channelwise(qdata, scale) -> None:
    if qdata.dim() != 2 or qdata.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"qdata must be a 2-D int8 or float8_e4m3fn matrix, got {qdata.dtype} {tuple(qdata.shape)}")
    if scale.numel() != qdata.shape[0]:
        raise ValueError(f"scale must hold one value per output row ({qdata.shape[0]}), got {scale.numel()}")


def _dequant_into_scratch(qdata, scale, dtype) -> torch.Tensor:
    # (q * scale) computed in fp32 and rounded once to dtype, as the reference; no allocation per call
    w = scratch_buffer(qdata.shape[0], qdata.shape[1], dtype, qdata.device)
    w.copy_(qdata)  # exact: int8 and e4m3 codes are representable in fp16 / bf16 / fp32
    return w.mul_(scale[:, None])


def matmul_channelwise(x, qdata, scale, bias=None, *, plan: MatmulPlan | None = None) -> torch.Tensor:
    """y = x (qdata * scale[:, None])^T + bias for an int8 (or fp8 e4m3) per-channel weight, in x's dtype.

    Args:
        x: (..., K) fp16 / bf16 / fp32.
        qdata: (N, K) int8 or float8_e4m3fn codes (fp8 needs an sm89+ GPU or the interpreter).
        scale: (N,) fp32.
        bias: optional (N,).
        plan: force a path; default from :func:`plan_matmul` with format "int8" / "fp8".
    """
    _check_channelwise(qdata, scale)
    n, k = qdata.shape
    x2 = flatten_rows(x, k, "x")
    m = x2.shape[0]
    fmt = "int8" if qdata.dtype == torch.int8 else "fp8"
    plan = plan or plan_matmul(fmt, x2.device, m, n, k)
    plan = dot_plan(plan, x2.dtype, x2.device, plan.path == "gemm")
    if fmt == "fp8" and not triton_has_fp8(x2.device):
        plan = MatmulPlan("dequant")
    scale = scale.float().contiguous()
    if m == 0 or plan.path == "dequant":
        w = _dequant_into_scratch(qdata, scale, x2.dtype)
        out = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x2.dtype))
    else:
        tiles = launch_tiles(plan.path, m, 128, device_arch(x2.device), decodes=False, elem_bytes=x2.element_size())
        tiles.pop("SUB_K")  # no quantization blocks along K: one tile per step
        split_k = max(1, min(plan.split_k, triton.cdiv(k, tiles["BLOCK_K"])))
        out = split_k_output(x2, n, split_k)
        grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]), split_k)
        _cw_forward_kernel[grid](
            x2,
            out,
            bias if bias is not None else out,
            qdata,
            scale,
            m,
            n,
            k,
            x2.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            USE_DOT=plan.path == "gemm",
            DOT_PRECISION=dot_precision(x2.dtype),
            SPLIT_K=split_k,
            GROUP_M=8,
            **tiles,
        )
        out = out.to(x2.dtype)
    return out.reshape(*x.shape[:-1], n)


def matmul_channelwise_grad_input(grad_out, qdata, scale, *, plan: MatmulPlan | None = None) -> torch.Tensor:
    """dx = grad_out @ (qdata * scale[:, None]) from the codes; in grad_out's dtype."""
    _check_channelwise(qdata, scale)
    n, k = qdata.shape
    g2 = flatten_rows(grad_out, n, "grad_out")
    m = g2.shape[0]
    fmt = "int8" if qdata.dtype == torch.int8 else "fp8"
    plan = plan or plan_matmul(fmt, g2.device, m, n, k)
    plan = dot_plan(plan, g2.dtype, g2.device, uses_dot=True)
    if fmt == "fp8" and not triton_has_fp8(g2.device):
        plan = MatmulPlan("dequant")
    scale = scale.float().contiguous()
    if m == 0 or plan.path == "dequant":
        out = torch.matmul(g2, _dequant_into_scratch(qdata, scale, g2.dtype))
    else:
        tiles = launch_tiles("grad", m, 128, device_arch(g2.device), decodes=False, elem_bytes=g2.element_size())
        tiles.pop("SUB_K")
        if fmt == "fp8" and tiles["BLOCK_M"] == 32:
            tiles["num_warps"] = 8  # 4 warps spill 12 B converting e4m3 codes (Triton 3.6, sm_90a); int8 is fine
        out = g2.new_empty((m, k))
        grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(k, tiles["BLOCK_K"]))
        _cw_grad_kernel[grid](
            g2, out, qdata, scale, m, n, k, g2.stride(0), out.stride(0), DOT_PRECISION=dot_precision(g2.dtype), **tiles
        )
    return out.reshape(*grad_out.shape[:-1], k)
