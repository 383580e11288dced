"""MXFP4 weight-only matmuls (W4A16 with OCP Microscaling weights): forward and grad_input, fused LoRA epilogue.

Math (W of shape (N, K) in blocks of 32 along K; activations fp16 / bf16 / fp32; fp32 accumulation):
    W[n, k] = e2m1(q[n, k]) * 2**(E[n, k // 32] - 127)
    q[n, 2j] = packed[n, j] & 15, q[n, 2j + 1] = packed[n, j] >> 4   (low nibble first: gpt-oss layout)
    forward y = x W^T + b (+ s (x_d A^T) B^T);  grad_input dx = dy W (+ s (dY B) A)
The forward and grad_input run the (even, odd) column-pair kernels of ``kernels/matmul_pairs.py`` with
``_mxfp4_tile`` as their decoder: a decoded tile spans at most 32 columns (SUB_K <= 32), so it lies in one
block and its power-of-two scale is one value per row. Paths ("gemv", "gemm", "dequant") and tile sizes come
from ``kernels/planner.py`` (format "mxfp4"); "dequant" decodes with ``quant_mxfp4``.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from .matmul_pairs import pair_product
from .planner import LowRank, MatmulPlan, flatten_rows, scratch_buffer
from .quant_mxfp4 import dequantize_mxfp4, e2m1_value
from .reference.mxfp4 import BLOCK, padded_k
from .reference.mxfp4 import quantize_mxfp4 as quantize_mxfp4_ref

__all__ = ["matmul_mxfp4", "matmul_mxfp4_grad_input"]


@triton.jit
def _mxfp4_tile(packed_ptr, scales_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, nblocks, GROUP_SIZE: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    # the DECODE of ``matmul_pairs``: rows offs_n, columns k0 + 2j (c0: low nibbles) and k0 + 2j + 1 (c1: high
    # nibbles) as E2M1 values in fp32, and the block's scale 2**(E - 127) per row [BN, 1]; BLOCK_K <= 32 = GROUP_SIZE,
    # so the tile lies in one block. No zero points: zero_ptr is unused.
    j = tl.arange(0, BLOCK_K // 2)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    mask = n_ok[:, None] & (k0 + 2 * j < K)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * k_bytes + (k0 // 2 + j)[None, :], mask=mask, other=0).to(tl.int32)
    e = tl.load(scales_ptr + rows * nblocks + tl.minimum(k0 // 32, nblocks - 1), mask=n_ok, other=127).to(tl.int32)
    s = (tl.maximum(e, 1) << 23).to(tl.float32, bitcast=True) * tl.where(e < 1, 0.5, 1.0)  # 2**(e - 127), exact
    return e2m1_value(byte & 15), e2m1_value(byte >> 4), s[:, None]


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
    out = pair_product("mxfp4", flatten_rows(x, k, "x"), n, k, (packed, scales, scales), _mxfp4_tile, BLOCK,
                       partial(_dense, packed, scales, k), bias=bias, plan=plan, lora=lora)  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def matmul_mxfp4_grad_input(grad_out, packed, scales, k: int, *, plan: MatmulPlan | None = None,
                            lora: LowRank | None = None) -> torch.Tensor:  # fmt: skip
    """dx = grad_out @ W (+ s * L Rm) for an MXFP4 weight, from the packed codes; in grad_out's dtype."""
    _check(packed, scales, k)
    n = packed.shape[0]
    out = pair_product("mxfp4", flatten_rows(grad_out, n, "grad_out"), n, k, (packed, scales, scales), _mxfp4_tile,
                       BLOCK, partial(_dense, packed, scales, k), plan=plan, lora=lora, grad=True)  # fmt: skip
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
