"""Dynamic per-token activation quantization (int8, fp8 e4m3) and the row/column-scaled GEMMs (W8A8, fp8).

Math, per row m of the flattened (M, K) activations (all in fp32, divisions correctly rounded):
    scale[m] = absmax_k |x[m, k]| / QMAX        (QMAX = 127 for int8, 448 for e4m3; 1.0 if the row is 0)
    int8:  q[m, k] = clamp(round_half_even(x[m, k] / scale[m]), -127, 127)
    fp8:   q[m, k] = e4m3(clamp(x[m, k] / scale[m], -448, 448))     (round half to even)
GEMM: acc = q_x q_w^T exactly (int32 for int8, fp32 for fp8), then, in fp32 and this order,
    y = acc * x_scale[:, None] * w_scale[None, :] + bias, cast to the output dtype.
Every M works (1..16 included: the tile is masked, unlike torch._int_mm) and N, K need not be multiples
of 16. fp8 products need an sm89+ GPU (Ada, Hopper); elsewhere ``fp8_dynamic_linear`` raises.

The e4m3 codes are produced with integer bit manipulation (Triton's interpreter converts fp32 -> fp8
incorrectly, so this keeps one code path that is testable on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .planner import device_arch, flatten_rows, interpreting, triton_has_fp8

__all__ = [
    "fp8_dynamic_linear",
    "int8_dynamic_linear",
    "quantize_per_token_fp8",
    "quantize_per_token_int8",
    "scaled_gemm",
]

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _e4m3_bits(v):
    # fp32 v with |v| <= 448 -> e4m3fn bit pattern (int32 0..255), round half to even.
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # normal range: round the 23-bit mantissa to 3 bits (ties to even) and rebias the exponent 127 -> 7;
    # a mantissa carry rolls into the exponent as it should
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # below 2**-6: multiples of 2**-9 (a * 512 is exact; the magic constant rounds half to even)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return code | (sign << 7)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program per row: pass 1 finds the absmax, pass 2 writes the codes
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    absmax = tl.max(amax, axis=0)
    qmax = 448.0 if FP8 else 127.0
    scale = tl.where(absmax > 0, tl.math.div_rn(absmax, qmax), 1.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -qmax), qmax)
        if FP8:
            q = _e4m3_bits(v).to(tl.uint8)
        else:
            q = ((v + 12582912.0) - 12582912.0).to(tl.int8)  # round half to even (|v| <= 127)
        tl.store(q_row + k0 + offs, q, mask=mask)


@triton.jit
def _scaled_gemm_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # out = (a b^T) * a_scale[:, None] * b_scale[None, :] + bias; exact int32 (int8) or fp32 (fp8) sums
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_row = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_row = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < K)[None, :]
        a = tl.load(a_row + offs_k[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
        b = tl.load(b_row + offs_k[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32 if INT8 else tl.float32)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------- launchers


def _quantize_rows(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = flatten_rows(x, x.shape[-1], "x")
    m, k = x2.shape
    q = torch.empty((m, k), device=x2.device, dtype=torch.uint8 if fp8 else torch.int8)
    scale = torch.empty(m, device=x2.device, dtype=torch.float32)
    if m:
        block_k = min(triton.next_power_of_2(k), 1024 if interpreting() else 4096)
        _quant_rows_kernel[(m,)](
            x2, q, scale, k, x2.stride(0), q.stride(0), FP8=fp8, BLOCK_K=block_k, num_warps=4 if block_k <= 1024 else 8
        )
    return (q.view(torch.float8_e4m3fn) if fp8 else q), scale


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row (token) of the flattened activations.

    Args:
        x: (..., K) fp16 / bf16 / fp32.

    Returns:
        (q int8 [M, K], scale fp32 [M]) with M the product of the leading dims; x ~= q * scale[:, None].
    """
    return _quantize_rows(x, fp8=False)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 e4m3 per row: (q float8_e4m3fn [M, K], scale fp32 [M]), scale = absmax / 448."""
    return _quantize_rows(x, fp8=True)


def _check_fp8_device(device: torch.device) -> None:
    if not triton_has_fp8(device):
        raise RuntimeError(
            f"fp8 matmuls need an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper); this one is "
            f"sm_{device_arch(device)}: use Int8DynamicActivationConfig (W8A8 int8) instead"
        )


def scaled_gemm(xq, x_scale, wq, w_scale, bias=None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(xq wq^T) * x_scale[:, None] * w_scale[None, :] + bias for int8 or fp8 e4m3 operands.

    Args:
        xq: (M, K) int8 or float8_e4m3fn; x_scale: (M,) fp32.
        wq: (N, K) of the same dtype as xq; w_scale: (N,) fp32.
        bias: optional (N,).
        out_dtype: dtype of the (M, N) result.

    Raises:
        ValueError: mismatched dtypes or shapes. RuntimeError: fp8 on a GPU older than sm89.
    """
    if xq.dtype != wq.dtype or xq.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"xq and wq must both be int8 or both float8_e4m3fn, got {xq.dtype} and {wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"scaled_gemm needs xq (M, K) and wq (N, K), got {tuple(xq.shape)} and {tuple(wq.shape)}")
    int8 = xq.dtype == torch.int8
    if not int8:
        _check_fp8_device(xq.device)
    xq, wq = xq.contiguous(), wq.contiguous()
    (m, k), n = xq.shape, wq.shape[0]
    out = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    if m == 0:
        return out
    if interpreting():
        bm, bn, bk, warps, stages = 16, 32, 32, 4, 1
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        bn, bk = (64 if m <= 64 else 128), (128 if int8 else 64)
        warps, stages = (4 if bm * bn <= 64 * 64 else 8), 3
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _scaled_gemm_kernel[grid](
        xq,
        wq,
        x_scale.float().contiguous(),
        w_scale.float().contiguous(),
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        xq.stride(0),
        wq.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        INT8=int8,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def int8_dynamic_linear(x, w_int8, w_scale, bias=None) -> torch.Tensor:
    """W8A8: y = x W^T + bias with x quantized per token to int8 on the fly and W int8 per channel.

    Args:
        x: (..., K) fp16 / bf16 / fp32 (the output has its dtype).
        w_int8: (N, K) int8; w_scale: (N,) fp32 (W ~= w_int8 * w_scale[:, None]).
        bias: optional (N,).

    Example:
        >>> y = int8_dynamic_linear(x, qweight.qdata, qweight.scale, bias)
    """
    xq, xs = quantize_per_token_int8(x)
    return scaled_gemm(xq, xs, w_int8, w_scale, bias, x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


def fp8_dynamic_linear(x, w_fp8, w_scale, bias=None) -> torch.Tensor:
    """fp8 e4m3 rowwise: x quantized per token to e4m3, W e4m3 per channel; needs sm89+ on CUDA."""
    _check_fp8_device(x.device)
    xq, xs = quantize_per_token_fp8(x)
    return scaled_gemm(xq, xs, w_fp8, w_scale, bias, x.dtype).reshape(*x.shape[:-1], w_fp8.shape[0])
