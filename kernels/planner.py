"""How each quantized matmul runs: the path planner, the tile table and the host-side launch helpers.

Shared by every kernel family (``matmul_4bit``, ``matmul_int``, ``lora``, ``act_quant``); no kernels here.

Paths, chosen per (device, format, M, N, K) by :func:`plan_matmul` from a measured table
(``matmul_table.json`` next to this file, written by ``benchmarks/bench_matmul.py --tune``; defaults
without one):
    "gemv":    few rows; broadcast-multiply-reduce, fp32 accumulate, optional split-K (fp32 atomics).
    "gemm":    dequantized tiles feed ``tl.dot``.
    "dequant": dequantize once into a reused buffer, then ``torch.matmul`` (cuBLAS) -- large M.
Tile sizes per path come from :func:`launch_tiles`, measured against spills and shared memory with
``benchmarks/gpu_compile_check.py`` on sm_80 / sm_89 / sm_90a. :func:`launch_forward` / :func:`launch_grad`
launch any format's kernel with an optional LoRA epilogue (:class:`LowRank`, added as s * L Rm).
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

from .reference.matmul import check_last_dim

__all__ = [
    "LowRank",
    "MatmulPlan",
    "assume_arch",
    "default_plan",
    "dense_product",
    "device_arch",
    "dot_plan",
    "dot_precision",
    "flatten_rows",
    "fma_dot",
    "force_path",
    "interpreting",
    "launch_forward",
    "launch_grad",
    "launch_tiles",
    "lora_args",
    "plan_matmul",
    "scratch_buffer",
    "split_k_output",
    "triton_has_fp8",
]

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
    """True under Triton's interpreter (``TRITON_INTERPRET=1``: CPU tensors, small tiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``."""
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
    weight: str = "nf4",
    even_k: bool = True,
    elem_bytes: int = 2,
    lora: bool = False,
) -> dict:
    """Tile sizes and launch options for a "gemv" / "gemm" forward or a "grad" (transposed) product.

    SUB_K (columns per decoded tile) is capped by ``max_sub_k`` (blocksize / group size: a tile must
    not span more than two quantization blocks); BLOCK_K = SUB_K * unroll. Interpreter runs use small
    tiles (and still unroll twice in gemv, so that code path is tested).

    ``arch`` (:func:`device_arch`), ``weight`` (the operand kind: "nf4" / "fp4" / "int4" tiles are decoded
    from 4-bit codes, "int8" / "fp8" codes are used as they are), ``even_k`` (4-bit rows start on a byte),
    ``elem_bytes`` (operand size) and ``lora`` (the kernel adds the LoRA update in its epilogue) pick tiles
    that compile without spills
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
    decodes = weight not in ("int8", "fp8")
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
    if kind == "gemm" and decodes and pre_hopper and not wide:
        warps = 8  # TF32 (fp32 operands) 64 x 64 decoded tiles spilled 8 B with 4 warps (Triton 3.6, sm_89)
    # before Hopper, 3 stages spilled 8-12 B in TF32 products (3.6, sm_80) and decoded grads (3.9, sm_89)
    stages = 2 if pre_hopper and ((kind == "gemm" and not wide) or (kind == "grad" and decodes)) else 3
    if kind == "gemm" and decodes and pre_hopper and not even_k:
        warps = 8  # odd K (nibble pairs straddling bytes): 4 warps spilled 20-592 B (3.6 and 3.9, 2 or 3 stages)
    if kind == "grad" and weight == "fp8" and bm == 32 and not lora:
        warps = 8  # 4 warps spill 12 B converting e4m3 codes (Triton 3.6, sm_90a); int8 is fine
    if kind == "gemm" and not decodes and lora and bm == 32:  # 32 x 64 + the LoRA epilogue spilled
        stages, sub_k = 2, 32  # 8-16 B at 3 stages / K-step 64 (sm_89, sm_90a)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=sub_k, SUB_K=sub_k, num_warps=warps, num_stages=stages)


def flatten_rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """x as a contiguous (rows, k) matrix, after checking its last dimension and dtype."""
    check_last_dim(x, k, what)
    if not x.is_floating_point():
        raise ValueError(f"{what} must be fp16, bf16 or fp32, got {x.dtype}")
    return x.reshape(-1, k).contiguous()


def split_k_output(x2: torch.Tensor, n: int, split_k: int) -> torch.Tensor:
    """Output buffer: zeroed fp32 for split-K atomics, else uninitialised in x's dtype."""
    m = x2.shape[0]
    return torch.zeros((m, n), device=x2.device, dtype=torch.float32) if split_k > 1 else x2.new_empty((m, n))


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


# ------------------------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class LowRank:
    """The LoRA update s * L @ Rm that a matmul kernel adds in its epilogue.

    Attributes:
        left: L [M, r] (x_d A^T in the forward, dY B for grad_input), in the activation dtype.
        right: Rm [r, P] (B^T in the forward, A for grad_input); any strides (a transposed view is fine).
        scale: s.
    """

    left: torch.Tensor
    right: torch.Tensor
    scale: float


def lora_args(low: LowRank | None, dummy: torch.Tensor, use_dot: bool = True) -> tuple[tuple, dict]:
    """(l_ptr, r_ptr, R, stride_lm, stride_lr, stride_rr, stride_rp, lora_scale) and the HAS_LORA / BLOCK_R
    constexprs for a kernel's epilogue; without ``low``, placeholders (``dummy``: any tensor)."""
    if low is None:
        return (dummy, dummy, 1, 0, 0, 0, 0, 0.0), dict(HAS_LORA=False, BLOCK_R=16)
    left, right = low.left, low.right
    r = left.shape[1]
    # tl.dot needs every dimension >= 16 (r is padded); the gemv reduces over r in chunks of at most 16
    block_r = max(16, triton.next_power_of_2(r)) if use_dot else min(16, triton.next_power_of_2(r))
    args = (left, right, r, left.stride(0), left.stride(1), right.stride(0), right.stride(1), float(low.scale))
    return args, dict(HAS_LORA=True, BLOCK_R=block_r)


def dense_product(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, low: LowRank | None, grad_input: bool = False
) -> torch.Tensor:
    """The "dequant" path with a dense (just decoded) W [N, K]: x W^T + bias, or x W for grad_input, by
    cuBLAS; a LoRA update is added with one addmm (an extra pass over the output)."""
    if grad_input:
        out = torch.matmul(x, w)
    else:
        out = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if low is not None:
        out.addmm_(low.left.to(x.dtype), low.right.to(x.dtype), alpha=low.scale)
    return out


def launch_forward(kernel, x2, n: int, weight: tuple, sizes: tuple, bias, plan: MatmulPlan, low: LowRank | None,
                   tiles: dict, **consts) -> torch.Tensor:  # fmt: skip
    """y [M, n] = x2 W^T (+ bias) (+ s L Rm) by a format's forward ``kernel`` on the "gemv" / "gemm" plan.

    Every forward kernel takes (x, out, bias, *weight pointers, M, N, K, *weight sizes, stride_xm, stride_om,
    *LoRA epilogue arguments) and the constexprs HAS_BIAS, HAS_LORA, USE_DOT, DOT_PRECISION, SPLIT_K, GROUP_M,
    the ``tiles`` (:func:`launch_tiles`) and its own ``consts``.
    """
    m, k = x2.shape
    split_k = max(1, min(plan.split_k, triton.cdiv(k, tiles["BLOCK_K"])))
    out = split_k_output(x2, n, split_k)
    lora, lora_consts = lora_args(low, out, use_dot=plan.path == "gemm")
    grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]), split_k)
    kernel[grid](
        x2, out, bias if bias is not None else out, *weight, m, n, k, *sizes, x2.stride(0), out.stride(0), *lora,
        HAS_BIAS=bias is not None, USE_DOT=plan.path == "gemm", DOT_PRECISION=dot_precision(x2.dtype),
        SPLIT_K=split_k, GROUP_M=8, **tiles, **lora_consts, **consts,
    )  # fmt: skip
    return out.to(x2.dtype)


def launch_grad(kernel, g2, k: int, weight: tuple, sizes: tuple, low: LowRank | None, tiles: dict,
                **consts) -> torch.Tensor:  # fmt: skip
    """dx [M, k] = g2 W (+ s L Rm) by a format's grad_input ``kernel``: arguments (g, out, *weight pointers,
    M, N, K, *weight sizes, stride_gm, stride_om, *LoRA epilogue arguments), one program per (m, k) block."""
    m, n = g2.shape
    tiles = {key: v for key, v in tiles.items() if key != "SUB_K"}  # the transposed product: one tile per step
    out = g2.new_empty((m, k))
    lora, lora_consts = lora_args(low, out)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(k, tiles["BLOCK_K"]))
    kernel[grid](
        g2, out, *weight, m, n, k, *sizes, g2.stride(0), out.stride(0), *lora,
        DOT_PRECISION=dot_precision(g2.dtype), **tiles, **lora_consts, **consts,
    )  # fmt: skip
    return out
