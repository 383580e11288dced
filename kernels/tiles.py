"""Triton helpers shared by the matmul kernel families: program order, K-slices, int4 decode, epilogues.

Device side only; the host side of the epilogue (:class:`LowRank`, ``lora_args``) is in ``kernels/planner.py``.

Math (x [M, K], W [N, K], fp32 accumulation):
    forward     acc[m, n] = sum_k x[m, k] W[n, k]          then + bias[n] + s * (L Rm)[m, n], store
    grad_input  acc[m, k] = sum_n dy[m, n] W[n, k]         then + s * (L Rm)[m, k], store
The optional LoRA term s * L Rm is the low-rank update of a fused LoRA linear: forward L = x_d A^T [M, r],
Rm = B^T [r, N]; grad_input L = dY B [M, r], Rm = A [r, K] (``kernels/lora.py``). It is added by the
first K-slice only, so split-K partial sums (fp32 atomics) count it once.

4-bit weights are decoded as their even and odd column halves (c0, c1) with scales (s0, s1), W = c * s;
:func:`mac_pair` and :func:`store_grad_pair` take that form. int4 codes: q[n, 2j] = packed[n, j] >> 4,
q[n, 2j + 1] = packed[n, j] & 15, W = (q - zero) * scale per group (:func:`int4_pair`, :func:`int4_tile`).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "cast_rne",
    "forward_tile",
    "grad_mac_pair",
    "grad_tile",
    "grouped_pids",
    "int4_pair",
    "int4_tile",
    "low_rank",
    "mac_pair",
    "store_forward",
    "store_grad",
    "store_grad_pair",
]

# ------------------------------------------------------------------------------------------ decoding


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even; bf16 by bit arithmetic because Triton's interpreter
    truncates fp32 -> bf16 casts (the GPU rounds to nearest even, so both paths agree)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _nibble_to_f32(q):
    # exact int 0..15 -> fp32 without a (quarter-rate) int->float convert: 2**23 + q has q in its mantissa
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def int4_pair(byte, zero):
    """int4 bytes (int32) -> (high nibble - zero, low nibble - zero) in fp32: columns 2j and 2j + 1."""
    return _nibble_to_f32(byte >> 4) - zero, _nibble_to_f32(byte & 15) - zero


@triton.jit
def int4_tile(
    packed_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, k_bytes, ngroups, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Tile of an int4 weight at rows offs_n, columns k0 + 2j (d0) and k0 + 2j + 1 (d1), as q - zero in
    fp32, and the row scale s [BN, 1]: W = d * s. BLOCK_K divides GROUP_SIZE: one group per row."""
    j = tl.arange(0, BLOCK_K // 2)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    mask = n_ok[:, None] & (k0 + 2 * j < K)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * k_bytes + (k0 // 2 + j)[None, :], mask=mask, other=0).to(tl.int32)
    g = tl.minimum(k0 // GROUP_SIZE, ngroups - 1)  # a tile past K must not read past the end
    s = tl.load(scale_ptr + rows * ngroups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    z = tl.load(zero_ptr + rows * ngroups + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    d0, d1 = int4_pair(byte, z)
    return d0, d1, s


# ------------------------------------------------------------------------------- program order, loops


@triton.jit
def grouped_pids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """program_id(0) -> (m-block, n-block), GROUP_M row blocks at a time so they share W tiles in L2."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * grid_n)) % size_m, (pid % (GROUP_M * grid_n)) // size_m


@triton.jit
def forward_tile(x_ptr, M, N, K, stride_xm, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """What a forward program owns: rows offs_m, columns offs_n (grouped order), the row mask [BM, 1], x's
    row pointers [BM, 1] and its K-slice [k_start, k_end) (program_id(1); whole multiples of BLOCK_K)."""
    pid_m, pid_n = grouped_pids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(1) * k_per_split
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    return offs_m, offs_n, (offs_m < M)[:, None], x_row, k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def mac_pair(acc, x_row, m_ok, k_even, K, c0, c1, s0, s1, ROW_SCALE: tl.constexpr, USE_DOT: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """acc += x[:, k_even] (c0 s0)^T + x[:, k_even + 1] (c1 s1)^T, x rows at ``x_row`` (pointers [BM, 1]).

    gemm (USE_DOT): the scaled tile, cast to x's dtype, feeds tl.dot. gemv: broadcast-multiply-reduce in
    fp32; with ROW_SCALE (s0 = s1 of shape [BN, 1]: one scale per row of the tile) the row sums are scaled
    instead of every element.
    """
    x0 = tl.load(x_row + k_even[None, :], mask=m_ok & (k_even < K)[None, :], other=0.0)
    x1 = tl.load(x_row + k_even[None, :] + 1, mask=m_ok & (k_even + 1 < K)[None, :], other=0.0)
    if USE_DOT:
        acc = tl.dot(x0, tl.trans((c0 * s0).to(x0.dtype)), acc, input_precision=PRECISION)
        acc = tl.dot(x1, tl.trans((c1 * s1).to(x1.dtype)), acc, input_precision=PRECISION)
    elif ROW_SCALE:
        part = tl.sum(
            x0.to(tl.float32)[:, None, :] * c0[None, :, :] + x1.to(tl.float32)[:, None, :] * c1[None, :, :], axis=2
        )
        acc += part * tl.reshape(s0, (BLOCK_N,))[None, :]
    else:
        acc += tl.sum(
            x0.to(tl.float32)[:, None, :] * (c0 * s0)[None, :, :]
            + x1.to(tl.float32)[:, None, :] * (c1 * s1)[None, :, :],
            axis=2,
        )
    return acc


@triton.jit
def grad_tile(g_ptr, M, stride_gm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """What a grad_input program owns: rows offs_m, first column k0 of its K-block (program_id(1)), the row
    mask [BM, 1] and dY's row pointers [BM, 1]; it reduces over N."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_m, tl.program_id(1) * BLOCK_K, (offs_m < M)[:, None], g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm


@triton.jit
def grad_mac_pair(acc0, acc1, g_row, m_ok, offs_n, N, c0, c1, s0, s1, PRECISION: tl.constexpr):
    """acc0 += dY[:, offs_n] (c0 s0), acc1 += dY[:, offs_n] (c1 s1): the even / odd output columns of the
    transposed product over one N-tile of a 4-bit weight (tiles [BN, BK / 2], cast to dY's dtype)."""
    g = tl.load(g_row + offs_n[None, :], mask=m_ok & (offs_n < N)[None, :], other=0.0)
    acc0 = tl.dot(g, (c0 * s0).to(g.dtype), acc0, input_precision=PRECISION)
    acc1 = tl.dot(g, (c1 * s1).to(g.dtype), acc1, input_precision=PRECISION)
    return acc0, acc1


# ----------------------------------------------------------------------------------------- epilogues


@triton.jit
def low_rank(l_ptr, r_ptr, offs_m, offs_p, M, P, R, stride_lm, stride_lr, stride_rr, stride_rp,
             PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """L[offs_m, :R] @ Rm[:R, offs_p] in fp32 with tl.dot (BLOCK_M >= 16; Rm rounded to L's dtype)."""
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
def store_forward(
    acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid_k,
    l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Forward epilogue: + s * (L Rm) (HAS_LORA) and + bias, by the first K-slice only; then store, or fp32
    atomic add for split-K."""
    offs_m64 = offs_m.to(tl.int64)
    if HAS_LORA:
        if pid_k == 0:
            offs_n64 = offs_n.to(tl.int64)
            if USE_DOT:
                acc += lora_scale * low_rank(l_ptr, r_ptr, offs_m64, offs_n64, M, N, R, stride_lm, stride_lr,
                                             stride_rr, stride_rp, PRECISION, BLOCK_R)  # fmt: skip
            else:
                acc += lora_scale * _low_rank_rows(l_ptr, r_ptr, offs_m64, offs_n64, M, N, R, stride_lm, stride_lr,
                                                   stride_rr, stride_rp, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    out = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def store_grad(acc, out_ptr, offs_m, offs_k, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr,
               stride_rp, lora_scale, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_R: tl.constexpr):  # fmt: skip
    """grad_input epilogue for columns offs_k: + s * (G A) (HAS_LORA), then store."""
    offs_m64 = offs_m.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    if HAS_LORA:
        acc += lora_scale * low_rank(l_ptr, r_ptr, offs_m64, offs_k64, M, K, R, stride_lm, stride_lr, stride_rr,
                                     stride_rp, PRECISION, BLOCK_R)  # fmt: skip
    out = out_ptr + offs_m64[:, None] * stride_om + offs_k64[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.jit
def store_grad_pair(acc0, acc1, out_ptr, offs_m, k0, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr,
                    stride_rr, stride_rp, lora_scale, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """grad_input epilogue of the 4-bit layouts: even (acc0) and odd (acc1) columns of the K-block at k0,
    two stride-2 stores."""
    k_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    store_grad(acc0, out_ptr, offs_m, k_even, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr,
               stride_rp, lora_scale, HAS_LORA, PRECISION, BLOCK_R)  # fmt: skip
    store_grad(acc1, out_ptr, offs_m, k_even + 1, M, K, stride_om, l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr,
               stride_rp, lora_scale, HAS_LORA, PRECISION, BLOCK_R)  # fmt: skip
