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

Paths, chosen per (device, M, N, K) by :func:`plan_matmul` from a measured table (``matmul_table.json``
next to this file, written by ``benchmarks/bench_matmul.py --tune``; defaults without one):
    "gemv":    few rows; broadcast-multiply-reduce, fp32 accumulate, optional split-K (fp32 atomics).
    "gemm":    dequantized tiles feed ``tl.dot``.
    "dequant": dequantize once into a reused buffer, then ``torch.matmul`` (cuBLAS) -- large M.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from .reference.matmul import Packed4bit, Quant4bitMeta
from .reference.quant_4bit import DYNAMIC_MAP, code_table

__all__ = [
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
    x_ptr,
    out_ptr,
    bias_ptr,
    packed_ptr,
    absmax_ptr,
    dmap_ptr,
    nested_ptr,
    offset_ptr,
    code_ptr,
    M,
    N,
    K,
    k_half,
    nblocks,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT_REGISTERS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SUB_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # y[m-block, n-block] = x W^T over the K-slice pid_k (split-K partial sums meet in fp32 atomics).
    # Each K step handles BLOCK_K columns as independent SUB_K-wide tiles (more loads in flight).
    # gemv (USE_DOT=False): the decoded tile is reused for BLOCK_M rows by broadcast-multiply-reduce;
    # gemm (USE_DOT=True): the tile, cast to x's dtype, feeds tl.dot as its even and odd column halves.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)  # grouped ordering: GROUP_M row blocks share W tiles in L2
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
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
            c0, c1, s0, s1 = _load_tile(
                packed_ptr,
                absmax_ptr,
                dmap_ptr,
                nested_ptr,
                offset_ptr,
                code_ptr,
                offs_n,
                k0 + ks,
                N,
                K,
                k_half,
                nblocks,
                BLOCKSIZE,
                DOUBLE_QUANT,
                EVEN_K,
                ALIGNED,
                LUT_REGISTERS,
                SUB_K,
            )
            k_even = k0 + ks + 2 * j
            x0 = tl.load(x_row + k_even[None, :], mask=m_ok & (k_even < K)[None, :], other=0.0)
            x1 = tl.load(x_row + k_even[None, :] + 1, mask=m_ok & (k_even + 1 < K)[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(x0, tl.trans((c0 * s0).to(x0.dtype)), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(x1, tl.trans((c1 * s1).to(x1.dtype)), acc, input_precision=DOT_PRECISION)
            elif ALIGNED:  # one absmax per row of the tile: scale the row sums instead of every element
                part = tl.sum(
                    x0.to(tl.float32)[:, None, :] * c0[None, :, :] + x1.to(tl.float32)[:, None, :] * c1[None, :, :],
                    axis=2,
                )
                acc += part * tl.reshape(s0, (BLOCK_N,))[None, :]
            else:
                acc += tl.sum(
                    x0.to(tl.float32)[:, None, :] * (c0 * s0)[None, :, :]
                    + x1.to(tl.float32)[:, None, :] * (c1 * s1)[None, :, :],
                    axis=2,
                )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = m_ok & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _grad_input_kernel(
    g_ptr,
    out_ptr,
    packed_ptr,
    absmax_ptr,
    dmap_ptr,
    nested_ptr,
    offset_ptr,
    code_ptr,
    M,
    N,
    K,
    k_half,
    nblocks,
    stride_gm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT_REGISTERS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dx = dy W (the transposed product): program (pid_m, pid_k) owns dx[m-block, k-block] and reduces
    # over N; even and odd output columns are accumulated separately and stored with stride 2.
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
        c0, c1, s0, s1 = _load_tile(
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
            BLOCKSIZE,
            DOUBLE_QUANT,
            EVEN_K,
            ALIGNED,
            LUT_REGISTERS,
            BLOCK_K,
        )
        g = tl.load(g_row + offs_n[None, :], mask=m_ok & (offs_n < N)[None, :], other=0.0)
        acc0 = tl.dot(g, (c0 * s0).to(g.dtype), acc0, input_precision=DOT_PRECISION)
        acc1 = tl.dot(g, (c1 * s1).to(g.dtype), acc1, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + k_even[None, :]
    tl.store(out, acc0.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even < K)[None, :])
    tl.store(out + 1, acc1.to(out_ptr.dtype.element_ty), mask=m_ok & (k_even + 1 < K)[None, :])


@triton.jit
def _dequant_kernel(
    out_ptr,
    packed_ptr,
    absmax_ptr,
    dmap_ptr,
    nested_ptr,
    offset_ptr,
    code_ptr,
    N,
    K,
    k_half,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT_REGISTERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # W[n-block, k-block] in the output dtype; even/odd halves interleaved back with join + reshape.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    c0, c1, s0, s1 = _load_tile(
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
        BLOCKSIZE,
        DOUBLE_QUANT,
        EVEN_K,
        ALIGNED,
        LUT_REGISTERS,
        BLOCK_K,
    )
    w = tl.reshape(tl.join(c0 * s0, c1 * s1), (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


# ---------------------------------------------------------------------------------------- dispatcher

PATHS = ("gemv", "gemm", "dequant")
LUTS = ("memory", "registers")
TABLE_ENV = "QLORA_KIT_MATMUL_TABLE"
PATH_ENV = "QLORA_KIT_MATMUL_PATH"
DEFAULT_TABLE = Path(__file__).with_name("matmul_table.json")
_FORCED: list[MatmulPlan] = []


@dataclass(frozen=True)
class MatmulPlan:
    """How one quantized matmul runs.

    Args:
        path: "gemv" (few rows), "gemm" (dequantized tiles into ``tl.dot``) or "dequant" (dequantize
            into a reused buffer, then ``torch.matmul``).
        split_k: K-slices reduced in parallel (fp32 atomics when > 1); gemv and gemm forward only.
        lut: NF4/FP4 code lookup: "memory" (one gather per value from the 64-byte table, L1-resident)
            or "registers" (a select tree over the table held in registers).
    """

    path: str
    split_k: int = 1
    lut: str = "memory"

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"MatmulPlan.path must be one of {list(PATHS)}, got {self.path!r}")
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or not 1 <= self.split_k <= 64:
            raise ValueError(f"MatmulPlan.split_k must be an int in [1, 64], got {self.split_k!r}")
        if self.lut not in LUTS:
            raise ValueError(f"MatmulPlan.lut must be one of {list(LUTS)}, got {self.lut!r}")


@contextmanager
def force_path(path: str | MatmulPlan):
    """Run every quantized matmul inside the block on one plan (tests, benchmarks).

    Example:
        >>> with force_path("gemm"):
        ...     y = matmul_4bit(x, w)
    """
    _FORCED.append(path if isinstance(path, MatmulPlan) else MatmulPlan(path))
    try:
        yield
    finally:
        _FORCED.pop()


_ASSUMED_ARCH: list[int] = []


@contextmanager
def assume_arch(arch: int):
    """Plan and pick tiles as on an sm_<arch> GPU (80, 89, 90), whatever device the tensors are on.

    The ahead-of-time compile check (``benchmarks/gpu_compile_check.py``) records the launches the
    launchers make for each target with CPU tensors inside this block.
    """
    _ASSUMED_ARCH.append(int(arch))
    try:
        yield
    finally:
        _ASSUMED_ARCH.pop()


def device_arch(device: torch.device) -> int | None:
    """10 * major + minor compute capability of a CUDA device (80 A100, 89 Ada, 90 Hopper); None otherwise."""
    if _ASSUMED_ARCH:
        return _ASSUMED_ARCH[-1]
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def triton_has_fp8(device: torch.device) -> bool:
    """Triton converts e4m3 codes on sm89+ GPUs (and on the CPU, in the interpreter); older GPUs dequantize
    fp8 weights with PyTorch instead."""
    arch = device_arch(device)
    return arch is None or arch >= 89


@lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_plan(m: int, n: int, k: int, device: torch.device | None = None) -> MatmulPlan:
    """The plan without measurements: gemv up to 8 rows, tiles up to 1024 rows, then dequant + cuBLAS.

    On a GPU the gemv splits K until its programs cover about two waves of the SMs (each slice keeping
    at least 1024 columns), since a decode-sized product has too few output tiles to fill the GPU.
    """
    if m > 8:
        return MatmulPlan("gemm" if m <= 1024 else "dequant")
    split = 1
    if device is not None and torch.device(device).type == "cuda":
        tiles = triton.cdiv(m, min(triton.next_power_of_2(m), 4)) * triton.cdiv(n, 32)
        while tiles * split < 2 * _sm_count(torch.device(device)) and k // (2 * split) >= 1024 and split < 16:
            split *= 2
    return MatmulPlan("gemv", split)


@lru_cache(maxsize=4)
def _read_table(path: str) -> tuple[dict, ...]:
    if not os.path.exists(path):
        return ()
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != 1:
        raise ValueError(f"{path} is not a version-1 matmul table; delete it or rerun bench_matmul.py --tune")
    return tuple(data.get("plans", ()))


def table_path() -> str:
    """Where the measured table is read from (``$QLORA_KIT_MATMUL_TABLE`` or ``kernels/matmul_table.json``)."""
    return os.environ.get(TABLE_ENV) or str(DEFAULT_TABLE)


@lru_cache(maxsize=16)
def device_key(device: torch.device) -> str:
    """Name the table is keyed by: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def plan_matmul(fmt: str, device: torch.device, m: int, n: int, k: int) -> MatmulPlan:
    """Pick the plan for an (m x k) @ (k x n) product of weight format ``fmt`` on ``device``.

    Order: :func:`force_path` / ``$QLORA_KIT_MATMUL_PATH``; else the measured entry of this device and
    format nearest in (log n, log k), then in log m; else :func:`default_plan`.
    """
    if _FORCED:
        return _FORCED[-1]
    if os.environ.get(PATH_ENV):
        return MatmulPlan(os.environ[PATH_ENV])
    device = torch.device(device)
    name = device_key(device)
    rows = [r for r in _read_table(table_path()) if r.get("device") == name and r.get("format") == fmt]
    if not rows:
        return default_plan(m, n, k, device)

    def dist(a: float, b: float) -> float:
        return abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))

    nk = min(rows, key=lambda r: dist(r["n"], n) + dist(r["k"], k))
    same = [r for r in rows if (r["n"], r["k"]) == (nk["n"], nk["k"])]
    best = min(same, key=lambda r: (dist(r["m"], m), r["m"]))
    return MatmulPlan(best["path"], int(best.get("split_k", 1)), best.get("lut", "memory"))


# ----------------------------------------------------------------------------------------- launchers


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 unless the user allowed TF32 for matmuls, as torch.matmul does
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def fma_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """Would a ``tl.dot`` here run on FMA units (fp32 operands without TF32, on a GPU)?

    Triton lowers such a dot to FMA loops that spill at our tile sizes (ptxas on sm_90a: up to 52 KB of
    spill per thread at 128 x 128), while cuBLAS' SGEMM is the better fp32 product anyway; so those
    products take the "dequant" path (:func:`dot_plan`). The interpreter (no GPU arch) keeps the tile
    kernels: the tests check their arithmetic in fp32.
    """
    return device_arch(device) is not None and dtype == torch.float32 and dot_precision(dtype) == "ieee"


def dot_plan(plan: MatmulPlan, dtype: torch.dtype, device: torch.device, uses_dot: bool) -> MatmulPlan:
    """``plan``, or the "dequant" plan when it would run a ``tl.dot`` on FMA units (:func:`fma_dot`)."""
    return MatmulPlan("dequant") if uses_dot and fma_dot(dtype, device) else plan


def launch_tiles(
    kind: str,
    m: int,
    max_sub_k: int,
    arch: int | None = None,
    decodes: bool = True,
    even_k: bool = True,
    elem_bytes: int = 2,
) -> dict:
    """Tile sizes and launch options for a "gemv" / "gemm" forward or a "grad" (transposed) product.

    SUB_K (columns per decoded tile) is capped by ``max_sub_k`` (blocksize / group size: a tile must
    not span more than two quantization blocks); BLOCK_K = SUB_K * unroll. Interpreter runs use small
    tiles (and still unroll twice in gemv, so that code path is tested).

    ``arch`` (:func:`device_arch`), ``decodes`` (the weight tile is decoded from 4-bit codes), ``even_k``
    (4-bit rows start on a byte) and ``elem_bytes`` (operand size) pick tiles that compile without spills
    with Triton 3.6 and 3.9 on sm_80 / sm_89 / sm_90a (``benchmarks/gpu_compile_check.py``, whose reports
    are in ``benchmarks/results/gpu_compile_*``): before Hopper, decoding kernels keep to 64 x 64 tiles (at
    128 rows the mma accumulators and the decoded operand spilled) and a K-step of 32 in the transposed
    product; on sm_90a, wgmma holds 128 x 128 except with odd K (two-byte nibble pairs spilled 72-128 B).
    fp32 operands (TF32 dots; fp32 gemv) halve the K-step: 128 x 64 x 64 fp32 tiles in 3 stages need 144 KiB
    of shared memory, over sm_89's 99 KiB, and the fp32 gemv's broadcast product spilled at K-step 128.
    """
    if interpreting():
        bm = 16 if kind != "gemv" else min(triton.next_power_of_2(m), 16)
        sub_k = min(32 if kind == "gemv" else 64, max_sub_k)
        return dict(
            BLOCK_M=bm,
            BLOCK_N=32,
            BLOCK_K=max(sub_k, 64) if kind == "gemv" else sub_k,
            SUB_K=sub_k,
            num_warps=4,
            num_stages=1,
        )
    wide = elem_bytes <= 2  # fp32 operands get half the K-step everywhere (registers in gemv, smem in dots)
    if kind == "gemv":  # BLOCK_M * BLOCK_K bounded so the 3-D broadcast product stays in registers
        bm = min(triton.next_power_of_2(m), 4)
        sub_k = min(128 if wide else 64, max_sub_k)
        return dict(
            BLOCK_M=bm, BLOCK_N=32, BLOCK_K=max(sub_k, (256 if wide else 128) // bm), SUB_K=sub_k, num_warps=4,
            num_stages=2,
        )  # fmt: skip
    pre_hopper = arch is not None and arch < 90
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if kind == "grad" or (decodes and pre_hopper):
        bm = min(bm, 64)
    bn = 64 if m <= 64 or kind == "grad" or (decodes and not even_k) or bm < 128 else 128
    sub_k = min(64 if wide else 32, max_sub_k)
    if kind == "grad" and decodes and pre_hopper:
        sub_k = min(sub_k, 32)
    warps = 4 if bm * bn <= 64 * 64 else 8
    # before Hopper, 3 stages spilled 8-12 B in TF32 products (3.6, sm_80) and decoded grads (3.9, sm_89)
    stages = 2 if pre_hopper and ((kind == "gemm" and not wide) or (kind == "grad" and decodes)) else 3
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=sub_k, SUB_K=sub_k, num_warps=warps, num_stages=stages)


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


def flatten_rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """x as a contiguous (rows, k) matrix, after checking its last dimension and dtype."""
    if x.shape[-1] != k:
        raise ValueError(
            f"{what} has last dimension {x.shape[-1]} but the weight needs {k}; check the layer's in/out sizes"
        )
    if not x.is_floating_point():
        raise ValueError(f"{what} must be fp16, bf16 or fp32, got {x.dtype}")
    return x.reshape(-1, k).contiguous()


def split_k_output(x2: torch.Tensor, n: int, split_k: int) -> torch.Tensor:
    """Output buffer: zeroed fp32 for split-K atomics, else uninitialised in x's dtype."""
    m = x2.shape[0]
    return torch.zeros((m, n), device=x2.device, dtype=torch.float32) if split_k > 1 else x2.new_empty((m, n))


def _forward(x2, w: Packed4bit, bias, plan: MatmulPlan) -> torch.Tensor:
    M, K = x2.shape
    N = w.meta.shape[0]
    tiles = launch_tiles(
        plan.path, M, w.meta.blocksize, device_arch(x2.device), even_k=K % 2 == 0, elem_bytes=x2.element_size()
    )
    split_k = max(1, min(plan.split_k, triton.cdiv(K, tiles["BLOCK_K"])))
    out = split_k_output(x2, N, split_k)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]), split_k)
    _forward_kernel[grid](
        x2,
        out,
        bias if bias is not None else out,
        *_weight_args(w),
        M,
        N,
        K,
        K // 2,
        w.meta.nblocks,
        x2.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        USE_DOT=plan.path == "gemm",
        DOT_PRECISION=dot_precision(x2.dtype),
        SPLIT_K=split_k,
        GROUP_M=8,
        **tiles,
        **_weight_consts(w.meta, plan.lut),
    )
    return out.to(x2.dtype)


_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch_buffer(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An (n, k) view of a per-(device, dtype) buffer that grows to the largest size asked and is reused.

    The "dequant" paths decode a weight into it and consume it right away (one stream: the next
    call's write is ordered after this call's matmul).
    """
    key = (torch.device(device), dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n * k:
        buf = _BUFFERS[key] = torch.empty(n * k, device=device, dtype=dtype)
    return buf[: n * k].view(n, k)


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
    x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None, *, plan: MatmulPlan | None = None
) -> torch.Tensor:
    """y = x W^T + bias with W an NF4/FP4 weight, in x's dtype (fp32 accumulation).

    Args:
        x: activations (..., K), fp16 / bf16 / fp32.
        w: the packed weight (:class:`Packed4bit`), on x's device.
        bias: optional (N,).
        plan: force a path; by default :func:`plan_matmul` picks one.

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
        out = _forward(x2, w, bias, plan)
    else:
        wd = dequantize_packed_4bit(w, x2.dtype, reuse=True)
        out = torch.nn.functional.linear(x2, wd, None if bias is None else bias.to(x2.dtype))
    return out.reshape(*x.shape[:-1], N)


def matmul_4bit_grad_input(grad_out: torch.Tensor, w: Packed4bit, *, plan: MatmulPlan | None = None) -> torch.Tensor:
    """dx = grad_out @ W from the packed weight (no full-precision W is kept); in grad_out's dtype.

    The "gemv" and "gemm" plans run the fused transposed-product kernel (tl.dot; split_k is not used);
    "dequant" decodes W into the reused buffer and calls ``torch.matmul``.
    """
    N, K = w.meta.shape
    g2 = flatten_rows(grad_out, N, "grad_out")
    M = g2.shape[0]
    plan = plan or plan_matmul(w.meta.quant_type, g2.device, M, N, K)
    plan = dot_plan(plan, g2.dtype, g2.device, uses_dot=True)
    if plan.path == "dequant" or M == 0:
        out = torch.matmul(g2, dequantize_packed_4bit(w, g2.dtype, reuse=True))
    else:
        tiles = launch_tiles("grad", M, w.meta.blocksize, device_arch(g2.device), elem_bytes=g2.element_size())
        tiles.pop("SUB_K")
        out = g2.new_empty((M, K))
        grid = (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(K, tiles["BLOCK_K"]))
        _grad_input_kernel[grid](
            g2,
            out,
            *_weight_args(w),
            M,
            N,
            K,
            K // 2,
            w.meta.nblocks,
            g2.stride(0),
            out.stride(0),
            DOT_PRECISION=dot_precision(g2.dtype),
            **tiles,
            **_weight_consts(w.meta, plan.lut),
        )
    return out.reshape(*grad_out.shape[:-1], K)
