"""NF4 / FP4 weight x fp16/bf16/fp32 activation matmuls (bitsandbytes layout): forward and grad_input.

Math (W of shape (N, K), flat index i = n*K + k):
    W[n, k] = code[nib(i)] * absmax[i // blocksize]            (fp32, then the activation dtype)
    nib(i)  = high nibble of packed[i // 2] if i is even, else its low nibble
    absmax[b] = DYNAMIC_MAP[qabsmax[b]] * nested_absmax[b // 256] + offset      (double quantization)
    forward:   y = x W^T + b          grad_input:   dx = dy W     (fp32 accumulation in both)

Tiles are loaded as (even column, odd column) pairs so that, when K is even, each row's bytes are
contiguous and each byte is read once (both nibbles used). When K is odd a row may start in the middle
of a byte; the pair's two nibbles then come from two bytes. A tile spans SUB_K <= blocksize columns, so
each row of it touches at most two absmax blocks (blocks straddle rows when K % blocksize != 0): the
two absmax values are decoded once per row and selected per element. When K % blocksize == 0 a tile
lies in one block per row, and the gemv scales its row sums instead of every element. Code values come
from a gather on the 64-byte table (L1-resident) or a select tree over it in registers (plan.lut).

Paths ("gemv", "gemm", "dequant") and tiles come from ``kernels/planner.py``. Every kernel adds an optional
LoRA update s * L Rm in its epilogue (``kernels/tiles.py``; the fused LoRA linear of ``kernels/lora.py``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .planner import (
    LowRank,
    MatmulPlan,
    assume_arch,
    dense_product,
    device_arch,
    dot_plan,
    flatten_rows,
    force_path,
    interpreting,
    launch_forward,
    launch_grad,
    launch_tiles,
    plan_matmul,
    scratch_buffer,
)
from .reference.matmul import Packed4bit, Quant4bitMeta
from .reference.quant_4bit import DYNAMIC_MAP, code_table
from .tiles import (
    forward_tile,
    grad_mac_pair,
    grad_tile,
    mac_pair,
    store_forward,
    store_grad_pair,
)

__all__ = [  # the planner's names are re-exported: they were defined here before kernels/planner.py
    "LowRank",
    "MatmulPlan",
    "Packed4bit",
    "Quant4bitMeta",
    "assume_arch",
    "dequantize_packed_4bit",
    "device_arch",
    "dot_plan",
    "force_path",
    "matmul_4bit",
    "matmul_4bit_grad_input",
    "plan_matmul",
]

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _lookup16_registers(q, code_ptr):
    # code[q] with the 16-entry table held in registers (16 scalar loads, hoisted out of loops by the
    # compiler) and a 4-level select tree on the bits of q: no per-element memory access, ~19 ALU ops.
    b = (q & 1) != 0
    v0 = tl.where(b, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
    v1 = tl.where(b, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
    v2 = tl.where(b, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
    v3 = tl.where(b, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
    v4 = tl.where(b, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
    v5 = tl.where(b, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
    v6 = tl.where(b, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
    v7 = tl.where(b, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
    b = (q & 2) != 0
    u0 = tl.where(b, v1, v0)
    u1 = tl.where(b, v3, v2)
    u2 = tl.where(b, v5, v4)
    u3 = tl.where(b, v7, v6)
    b = (q & 4) != 0
    t0 = tl.where(b, u1, u0)
    t1 = tl.where(b, u3, u2)
    return tl.where((q & 8) != 0, t1, t0)


@triton.jit
def _decode(q, code_ptr, LUT_REGISTERS: tl.constexpr):
    # 4-bit code -> fp32 value: select tree in registers, or one gather from the 64-byte table (L1-resident)
    if LUT_REGISTERS:
        value = _lookup16_registers(q, code_ptr)
    else:
        value = tl.load(code_ptr + q)
    return value


@triton.jit
def _block_absmax(blk, mask, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, DOUBLE_QUANT: tl.constexpr):
    # fp32 absmax of blocks `blk`; with double quantization decoded in-kernel from the uint8 code,
    # the 256-entry dynamic map and the fp32 absmax of its group of 256 blocks.
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)
        absmax = tl.load(dmap_ptr + qa) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def _load_tile(
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
    k_half,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT_REGISTERS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Tile of W at rows offs_n, columns k0 + 2j and k0 + 2j + 1 (j < BLOCK_K / 2), as fp32 code values
    # (c0, c1) and their block absmax (s0, s1): W = c * s. With ALIGNED (K % BLOCKSIZE == 0 and k0 a
    # multiple of BLOCK_K <= BLOCKSIZE) the tile sits in one block per row and s0 = s1 has shape [BN, 1].
    j = tl.arange(0, BLOCK_K // 2)
    k_even = k0 + 2 * j
    n_ok = offs_n < N
    m0 = n_ok[:, None] & (k_even < K)[None, :]
    row = offs_n.to(tl.int64) * K  # flat index of (n, 0)
    if EVEN_K:  # rows start on a byte: one contiguous byte per (even, odd) pair
        byte = tl.load(packed_ptr + (offs_n.to(tl.int64) * k_half)[:, None] + (k0 // 2 + j)[None, :], mask=m0, other=0)
        byte = byte.to(tl.int32)
        q0 = byte >> 4
        q1 = byte & 15
    else:  # rows of odd parity start mid-byte: the pair's nibbles come from two bytes
        m1 = n_ok[:, None] & (k_even + 1 < K)[None, :]
        i0 = row[:, None] + k_even[None, :]
        odd = (i0 & 1).to(tl.int32)
        b0 = tl.load(packed_ptr + (i0 >> 1), mask=m0, other=0).to(tl.int32)
        b1 = tl.load(packed_ptr + ((i0 + 1) >> 1), mask=m1, other=0).to(tl.int32)
        q0 = (b0 >> (4 - 4 * odd)) & 15
        q1 = (b1 >> (4 * odd)) & 15
    c0 = _decode(q0, code_ptr, LUT_REGISTERS)
    c1 = _decode(q1, code_ptr, LUT_REGISTERS)
    # the flat range [row + k0, row + k0 + BLOCK_K) has length <= BLOCKSIZE: at most two blocks per row
    first = tl.minimum((row + k0) // BLOCKSIZE, nblocks - 1)  # a tile past K must not read past the end
    a_first = _block_absmax(first, n_ok, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, DOUBLE_QUANT)
    if ALIGNED:
        s0 = a_first[:, None]
        s1 = s0
    else:
        a_next = _block_absmax(
            first + 1, n_ok & (first + 1 < nblocks), absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, DOUBLE_QUANT
        )
        split = ((first + 1) * BLOCKSIZE - row)[:, None]  # first column of the next block, per row
        s0 = tl.where(k_even[None, :] < split, a_first[:, None], a_next[:, None])
        s1 = tl.where(k_even[None, :] + 1 < split, a_first[:, None], a_next[:, None])
    return c0, c1, s0, s1


@triton.jit
def _forward_kernel(
    x_ptr, out_ptr, bias_ptr,
    packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr,
    M, N, K, k_half, nblocks, stride_xm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, LUT_REGISTERS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # y[m-block, n-block] = x W^T (+ bias + s (x_d A^T) B^T) over the K-slice pid_k (split-K partial sums
    # meet in fp32 atomics). Each K step handles BLOCK_K columns as independent SUB_K-wide tiles (more
    # loads in flight). gemv (USE_DOT=False): the decoded tile is reused for BLOCK_M rows by
    # broadcast-multiply-reduce; gemm (USE_DOT=True): the tile, cast to x's dtype, feeds tl.dot as its even
    # and odd column halves. With ALIGNED the gemv scales its row sums instead of every element.
    offs_m, offs_n, m_ok, x_row, k_start, k_end = forward_tile(x_ptr, M, N, K, stride_xm, SPLIT_K, BLOCK_M, BLOCK_N,
                                                               BLOCK_K, GROUP_M)  # fmt: skip
    j = tl.arange(0, SUB_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for ks in tl.static_range(0, BLOCK_K, SUB_K):
            c0, c1, s0, s1 = _load_tile(packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, offs_n,
                                        k0 + ks, N, K, k_half, nblocks, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, ALIGNED,
                                        LUT_REGISTERS, SUB_K)  # fmt: skip
            acc = mac_pair(acc, x_row, m_ok, k0 + ks + 2 * j, K, c0, c1, s0, s1, ALIGNED, USE_DOT, DOT_PRECISION,
                           BLOCK_N)  # fmt: skip
    store_forward(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tl.program_id(1), l_ptr, r_ptr, R,
                  stride_lm, stride_lr, stride_rr, stride_rp, lora_scale, HAS_BIAS, HAS_LORA, USE_DOT, SPLIT_K,
                  DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip


@triton.jit
def _grad_input_kernel(
    g_ptr, out_ptr,
    packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr,
    M, N, K, k_half, nblocks, stride_gm, stride_om,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    HAS_LORA: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr, LUT_REGISTERS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dx = dy W (+ s (dY B) A), the transposed product: program (pid_m, pid_k) owns dx[m-block, k-block] and
    # reduces over N; even and odd output columns are accumulated separately and stored with stride 2.
    offs_m, k0, m_ok, g_row = grad_tile(g_ptr, M, stride_gm, BLOCK_M, BLOCK_K)
    acc0 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c0, c1, s0, s1 = _load_tile(packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, offs_n, k0,
                                    N, K, k_half, nblocks, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, ALIGNED, LUT_REGISTERS,
                                    BLOCK_K)  # fmt: skip
        acc0, acc1 = grad_mac_pair(acc0, acc1, g_row, m_ok, offs_n, N, c0, c1, s0, s1, DOT_PRECISION)
    store_grad_pair(acc0, acc1, out_ptr, offs_m, k0, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr,
                    stride_rp, lora_scale, HAS_LORA, DOT_PRECISION, BLOCK_K, BLOCK_R)  # fmt: skip


@triton.jit
def _dequant_kernel(
    out_ptr, packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, N, K, k_half, nblocks,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    LUT_REGISTERS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # W[n-block, k-block] in the output dtype; even/odd halves interleaved back with join + reshape.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    c0, c1, s0, s1 = _load_tile(packed_ptr, absmax_ptr, dmap_ptr, nested_ptr, offset_ptr, code_ptr, offs_n, k0, N, K,
                                k_half, nblocks, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, ALIGNED, LUT_REGISTERS,
                                BLOCK_K)  # fmt: skip
    w = tl.reshape(tl.join(c0 * s0, c1 * s1), (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


# ----------------------------------------------------------------------------------------- launchers


@lru_cache(maxsize=32)
def _tables(device: torch.device, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    return code_table(quant_type).to(device), DYNAMIC_MAP.to(device)


def _weight_args(w: Packed4bit) -> tuple:
    w.check()
    m = w.meta
    code, dmap = _tables(w.packed.device, m.quant_type)
    if m.double_quant:
        return w.packed, w.qabsmax, dmap, w.nested_absmax.float(), w.offset.float().reshape(1), code
    return w.packed, w.absmax.float(), dmap, dmap, dmap, code  # unused pointers: any fp32 tensor


def _weight_consts(meta: Quant4bitMeta, lut: str) -> dict:
    k = meta.shape[1]
    return dict(
        BLOCKSIZE=meta.blocksize,
        DOUBLE_QUANT=meta.double_quant,
        EVEN_K=k % 2 == 0,
        ALIGNED=k % meta.blocksize == 0,
        LUT_REGISTERS=lut == "registers",
    )


def dequantize_packed_4bit(w: Packed4bit, dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
    """The (N, K) weight in ``dtype``, decoded by a Triton kernel.

    Args:
        w: packed weight.
        dtype: output dtype.
        reuse: write into a per-(device, dtype) scratch buffer that the next call overwrites (the
            "dequant" matmul path: no allocation per call; consume the result before the next call).
    """
    N, K = w.meta.shape
    if reuse:
        out = scratch_buffer(N, K, dtype, w.packed.device)
    else:
        out = torch.empty((N, K), device=w.packed.device, dtype=dtype)
    bn, bk = 32, min(64 if interpreting() else 128, w.meta.blocksize)
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _dequant_kernel[grid](
        out, *_weight_args(w), N, K, K // 2, w.meta.nblocks, BLOCK_N=bn, BLOCK_K=bk, **_weight_consts(w.meta, "memory")
    )
    return out


def matmul_4bit(
    x: torch.Tensor,
    w: Packed4bit,
    bias: torch.Tensor | None = None,
    *,
    plan: MatmulPlan | None = None,
    lora: LowRank | None = None,
) -> torch.Tensor:
    """y = x W^T + bias (+ s * L Rm) with W an NF4/FP4 weight, in x's dtype (fp32 accumulation).

    Args:
        x: activations (..., K), fp16 / bf16 / fp32.
        w: the packed weight (:class:`Packed4bit`), on x's device.
        bias: optional (N,).
        plan: force a path; by default :func:`plan_matmul` picks one.
        lora: a LoRA update (:class:`LowRank`, L of shape [rows of x, r]) added in the kernel's epilogue
            (the fused LoRA linear, ``kernels/lora.py``).

    Returns:
        (..., N) tensor in x's dtype.

    Example:
        >>> w = Packed4bit(packed, Quant4bitMeta((N, K), 64, "nf4", False), absmax=absmax)
        >>> y = matmul_4bit(x, w)
    """
    N, K = w.meta.shape
    x2 = flatten_rows(x, K, "x")
    plan = plan or plan_matmul(w.meta.quant_type, x2.device, x2.shape[0], N, K)
    plan = dot_plan(plan, x2.dtype, x2.device, plan.path == "gemm")
    if x2.shape[0] == 0:
        out = x2.new_zeros((0, N))
    elif plan.path in ("gemv", "gemm"):
        tiles = launch_tiles(plan.path, x2.shape[0], w.meta.blocksize, device_arch(x2.device), w.meta.quant_type,
                             K % 2 == 0, x2.element_size(), lora=lora is not None)  # fmt: skip
        out = launch_forward(_forward_kernel, x2, N, _weight_args(w), (K // 2, w.meta.nblocks), bias, plan, lora, tiles,
                             **_weight_consts(w.meta, plan.lut))  # fmt: skip
    else:
        out = dense_product(x2, dequantize_packed_4bit(w, x2.dtype, reuse=True), bias, lora)
    return out.reshape(*x.shape[:-1], N)


def matmul_4bit_grad_input(
    grad_out: torch.Tensor, w: Packed4bit, *, plan: MatmulPlan | None = None, lora: LowRank | None = None
) -> torch.Tensor:
    """dx = grad_out @ W (+ s * L Rm) from the packed weight (no full-precision W is kept); in grad_out's dtype.

    The "gemv" and "gemm" plans run the fused transposed-product kernel (tl.dot; split_k is not used);
    "dequant" decodes W into the reused buffer and calls ``torch.matmul``.
    """
    N, K = w.meta.shape
    g2 = flatten_rows(grad_out, N, "grad_out")
    M = g2.shape[0]
    plan = plan or plan_matmul(w.meta.quant_type, g2.device, M, N, K)
    plan = dot_plan(plan, g2.dtype, g2.device, uses_dot=True)
    if plan.path == "dequant" or M == 0:
        out = dense_product(g2, dequantize_packed_4bit(w, g2.dtype, reuse=True), None, lora, grad_input=True)
    else:
        tiles = launch_tiles("grad", M, w.meta.blocksize, device_arch(g2.device), w.meta.quant_type,
                             elem_bytes=g2.element_size(), lora=lora is not None)  # fmt: skip
        out = launch_grad(_grad_input_kernel, g2, K, _weight_args(w), (K // 2, w.meta.nblocks), lora, tiles,
                          **_weight_consts(w.meta, plan.lut))  # fmt: skip
    return out.reshape(*grad_out.shape[:-1], K)
