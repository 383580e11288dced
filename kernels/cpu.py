"""CPU matmuls y = x W^T + b for the quantized formats that read the packed weight once per call.

The references (``kernels/reference/matmul.py``) dequantize the whole weight to float and then call
``F.linear``: at one row of x that moves 4-8x the bytes of the packed weight and is ~30-60x slower than a
float layer. The paths here, picked per call by :func:`plan` (format, activation dtype, rows of x):

* ``gemv``: C kernels (``cpu_source.c``, compiled on first use with the system C compiler and
  ``-march=native``, cached under ``~/.cache/qlora_kit``; AVX2 + FMA and portable variants, plus an AVX-512 one
  for a single row of x, picked at compile time) that decode W in 32-value chunks into registers and never write
  the float weight. One row of x: six (AVX2) or eight (AVX-512) output rows at a time, each stream of codes
  prefetched ahead (into L1, or into L2 where x's row would not stay in L1; rows of 2-11 KiB are where the
  hardware prefetcher starts over), so the layer runs at memory bandwidth;
  2-4 rows of x: one output row at a time, each decoded chunk feeding every row; more: the row is decoded once
  into an L1 buffer, then 4-row dot products. One OpenMP region per call, rows handed out dynamically. The
  decoded values are bit-identical to the reference's (NF4/FP4: ``code[nibble] * absmax[block]``; int4:
  ``(q - zero) * scale``; int8/fp8: ``q * scale``, the row scale applied to the dot product; MXFP4:
  ``e2m1[nibble] * 2**(E - 127)``), so in fp32 only the summation order differs. The 4-bit GEMVs look the codes
  up in a permuted order (AVX2: vpshufb over byte planes; AVX-512: vpermps, even columns then odd ones) and
  permute x to match once per call. For bf16/fp16 x the product runs in fp32 on the exact weight (the reference
  rounds W to x's dtype first), then rounds once to x's dtype; bf16 x without a bias is converted inside the
  kernel (as PyTorch converts, round to nearest even), which saves two small PyTorch ops a call.
* ``dequant``: the same decoders write ``DEQUANT_BYTES`` of fp32 rows at a time into one reused buffer,
  then an fp32 ``F.linear`` per block into the output's columns: for many rows, where the GEMM dominates.
* ``int8pack`` / ``int4pack``: torch's packed CPU kernels ``torch._weight_int8pack_mm`` and
  ``torch._weight_int4pack_mm_for_cpu`` for bf16/fp16 x. Their scales live in x's dtype, so they round:
  int8 ``scale`` -> bf16, int4 ``zero`` -> ``(8 - zero) * scale`` in bf16 (W = (q - 8) * s + zp). The
  conversion is lossy, so the format keeps its own layout and the converted copy is cached here (keyed on
  the packed tensor, rebuilt when any of its tensors change in place), never stored in the state_dict.
  Measured: their bf16 error exceeds the documented bound (twice the reference's own bf16 error; seen
  2.07x for int4, more for int8 at 48x96), so :func:`plan` does not pick them by default; put them in
  ``_PLAN`` to trade that accuracy for speed (``benchmarks/results/cpu.md`` times them beside ``gemv``).
* ``reference``: everything else (weights under ``MIN_WEIGHT_NUMEL``, no C compiler; and
  ``QLORA_KIT_CPU_KERNELS=0``, which ``qlora_kit/_dispatch.use_cpu_kernels`` checks before calling here).

Each launcher returns None when the reference should run; ``qlora_kit/ops.py`` then calls it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from .reference import matmul as ref
from .reference.quant_4bit import code_table

SOURCE = Path(__file__).with_name("cpu_source.c")
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
DEQUANT_BYTES = 1 << 21  # fp32 weight block of the "dequant" path (fits in L2 next to the GEMM's tiles)
# ... but never fewer rows than this: at K = 11008 the 2 MiB block was 47 rows, and MKL's GEMM on such narrow
# blocks took 2270 ms at M = 256 (1 thread) where 142-row blocks took 1461 ms and the float layer 1231 ms
DEQUANT_MIN_ROWS = 128
MIN_WEIGHT_NUMEL = 1 << 18  # smaller weights take the reference (per-call overhead; keeps tiny test layers plain)

GEMV_MAX_ROWS = 16  # the planner's GEMV / blocked-GEMM threshold (measured: see _PLAN)
# Measured on the 2-core AVX2 EPYC (Zen 3) this project runs on, 4096x4096, nf4-dq and int8, fp32, min of 5
# (forced paths by replacing cpu.plan, timed side by side, M = 2 .. 32): with 1 thread, "gemv" wins up to
# M = 8 (15.5 vs 22.7 ms at M = 8), ties at 16 (24.8 vs 22.1 ms), loses from 32 (53 vs 36 ms); with 2 threads
# on the loaded machine "gemv" wins at every M up to 32 (one OpenMP region per call, where the blocked path runs
# two per block and MKL's threads stall on a busy machine). Hence: "gemv" up to 16 rows, "dequant" above.
_PLAN: dict[tuple[str, str], tuple[tuple[int, str], ...]] = {
    (family, dtype): ((GEMV_MAX_ROWS, "gemv"),)
    for family in ("4bit", "int4", "int8", "fp8", "mxfp4")
    for dtype in ("fp32", "half")
}


def plan(family: str, m: int, dtype: torch.dtype, numel: int) -> str:
    """The CPU path for ``m`` rows of ``dtype`` activations times a ``numel``-element weight of ``family``."""
    if numel < MIN_WEIGHT_NUMEL or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return "reference"
    for max_m, path in _PLAN[(family, "fp32" if dtype == torch.float32 else "half")]:
        if m <= max_m:
            return path
    return "dequant"


# ------------------------------------------------------------------------------------------ the library


def _cpu_tag() -> bytes:
    """Identifies the CPU the library is built for (-march=native): machine plus /proc/cpuinfo flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}".encode()


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True)
        os.replace(out, path)  # atomic: concurrent processes never load a half-written file


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built once per source and CPU), or None with one warning when that fails."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(CFLAGS).encode() + _cpu_tag()).hexdigest()[:16]
    cache = Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora_kit"))
    path = cache / "cpu_kernels" / f"qlora_kit_cpu_{tag}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace")[-300:] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"qlora_kit CPU kernels unavailable ({detail}); using the slower reference path", stacklevel=2)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qk_4bit.argtypes = [p, i32, i64, p, p, p, i64, i64, i64, p, p, i64, i64, i32]
    lib.qk_int4.argtypes = [p, i32, i64, p, p, p, i64, i64, i64, p, p, i64, i64, i32]
    lib.qk_chan.argtypes = [p, i32, i64, p, p, p, i32, i64, i64, p, p, i64, i64, i32]
    lib.qk_mxfp4.argtypes = [p, i32, i64, p, p, p, i64, i64, p, p, i64, i64, i32]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()  # ctypes passes an int to a c_void_p argument


# ---------------------------------------------------------------------------- converted-layout cache

_CACHE: dict[int, tuple[tuple, object]] = {}


def _cached(tensors: tuple[torch.Tensor, ...], what: str, build):
    """``build()``, cached on the first tensor's identity; rebuilt when any tensor is replaced or edited."""
    key = (id(tensors[0]), what)
    stamp = []  # a loop, not a generator: one Python frame less per tensor on the per-call path
    for t in tensors:
        stamp += (id(t), t._version, t.data_ptr())
    stamp = tuple(stamp)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is None:
        weakref.finalize(tensors[0], _CACHE.pop, key, None)
    value = build()
    _CACHE[key] = (stamp, value)
    return value


# ------------------------------------------------------------------------------------------ launchers


def _launch(kernel, x: torch.Tensor, m: int, n: int, path: str, bias, weight_args: tuple) -> torch.Tensor:
    """Run ``kernel`` as a GEMV over x's ``m`` rows ("gemv") or as blocked dequantize + GEMM ("dequant").

    Both compute in fp32 and round to x's dtype once at the end: for bf16/fp16 x that is more accurate than the
    reference (which rounds W to x's dtype and runs a half-precision GEMM) and, on CPUs without native bf16
    matmul units, several times faster than torch's half-precision GEMM on narrow blocks.
    """
    # Right after a layer has streamed its weight, every tensor op from Python costs tens of microseconds (measured
    # on the 2-core EPYC: torch.empty ~50 us, a reshape ~40 us, against ~130 us for a whole 1 MB int8 GEMV), so a
    # contiguous x of the kernel's dtype goes in as it is, of any rank, and y is made in its final shape.
    threads = torch.get_num_threads()
    out_shape = (*x.shape[:-1], n)
    if path == "gemv" and bias is None and x.dtype == torch.bfloat16:  # the kernel converts x and y itself
        xc = x if x.is_contiguous() else x.contiguous()
        y = torch.empty(out_shape, dtype=torch.bfloat16)
        kernel(xc.data_ptr(), 1, m, *weight_args, y.data_ptr(), None, 0, n, threads)
        return y
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    y = torch.empty(out_shape, dtype=torch.float32)
    if path == "dequant":
        # DEQUANT_BYTES of fp32 rows at a time into one reused buffer (stays in cache), GEMM per block
        k = x.shape[-1]
        x2, y2 = x32.reshape(m, k), y.view(m, n)
        rows = max(DEQUANT_MIN_ROWS, DEQUANT_BYTES // (4 * k))
        buf = torch.empty(min(rows, n), k, dtype=torch.float32)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            kernel(None, 0, 0, *weight_args, None, buf.data_ptr(), n0, n1, threads)
            y2[:, n0:n1] = F.linear(x2, buf[: n1 - n0])
    else:
        kernel(x32.data_ptr(), 0, m, *weight_args, y.data_ptr(), None, 0, n, threads)
    if bias is not None:
        y += bias.float()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _rows(x: torch.Tensor, k: int) -> int:
    """x's row count, after checking x's last dimension against the weight's K (the kernels take K from the
    weight and would read past the end of a narrower x instead of failing)."""
    ref.check_last_dim(x, k)
    return x.numel() // max(k, 1)


def matmul_4bit(x: torch.Tensor, w: ref.Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """NF4/FP4 ``x @ dequant(W)^T + bias`` on the CPU, or None when the reference should run."""
    n, k = w.meta.shape
    m = _rows(x, k)
    path = plan("4bit", m, x.dtype, n * k)
    lib = library() if path != "reference" else None
    if lib is None or not w.packed.is_contiguous():
        return None
    stats = (w.packed, w.qabsmax, w.nested_absmax, w.offset) if w.meta.double_quant else (w.packed, w.absmax)
    absmax = _cached(stats, "absmax", lambda: w.block_absmax().float().contiguous())
    table = code_table(w.meta.quant_type)
    args = (w.packed.data_ptr(), absmax.data_ptr(), table.data_ptr(), n, k, w.meta.blocksize)
    return _launch(lib.qk_4bit, x, m, n, path, bias, args)


def _int4pack(packed, scale, zero, k: int, group_size: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 layout as torch's CPU int4pack: codes [N, K'] and [K' / g, N, 2] (scale, (8 - zero) * scale)."""
    n = packed.shape[0]
    kp = -(-k // group_size) * group_size
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(n, -1)[:, :k].to(torch.int32)
    q = F.pad(q, (0, kp - k), value=8)  # padded columns meet zero activations
    s, z = scale.float(), zero.float()
    sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), sz


def matmul_int4(x, packed, scale, zero, group_size: int, bias=None) -> torch.Tensor | None:
    """int4 per-group ``x @ dequant(W)^T + bias`` on the CPU, or None when the reference should run."""
    n, k = packed.shape[0], x.shape[-1]  # the int4 layout stores K only through the packed width and groups
    if packed.shape[1] != (k + 1) // 2 or scale.shape[-1] != -(-k // group_size):
        raise ValueError(
            f"x has last dimension {k} but the int4 weight ({packed.shape[1]} bytes a row, {scale.shape[-1]} groups "
            f"of {group_size}) does not hold that many; check the layer's in/out sizes"
        )
    m = _rows(x, k)
    path = plan("int4", m, x.dtype, n * k)
    if path == "int4pack" and n % 16:  # torch's packing needs N % 16 == 0
        path = "gemv"
    if path == "int4pack":
        wq, sz = _cached(
            (packed, scale, zero), f"int4pack-{x.dtype}", lambda: _int4pack(packed, scale, zero, k, group_size, x.dtype)
        )
        x2 = F.pad(x.reshape(-1, k), (0, wq.shape[1] * 2 - k)).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(x2, wq, group_size, sz)
        y = y if bias is None else y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], n)
    lib = library() if path != "reference" else None
    if lib is None or not packed.is_contiguous():
        return None
    s, z = _cached((packed, scale, zero), "int4-fp32", lambda: (scale.float().contiguous(), zero.float().contiguous()))
    args = (packed.data_ptr(), s.data_ptr(), z.data_ptr(), n, k, group_size)
    return _launch(lib.qk_int4, x, m, n, path, bias, args)


@functools.cache
def _fp8_lut() -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def matmul_channelwise(x, qdata, scale, bias=None) -> torch.Tensor | None:
    """int8 / fp8 per-channel ``x @ (qdata * scale)^T + bias`` on the CPU, or None for the reference."""
    n, k = qdata.shape
    is_int8 = qdata.dtype == torch.int8
    m = _rows(x, k)
    path = plan("int8" if is_int8 else "fp8", m, x.dtype, n * k)
    if path == "int8pack" and k % 32:  # torch's kernel reads out of bounds on other K (seen: K = 33, 40, 100)
        path = "gemv"
    if path == "int8pack":
        s = _cached((qdata, scale), f"int8pack-{x.dtype}", lambda: scale.to(x.dtype))
        y = torch._weight_int8pack_mm(x.reshape(-1, k).contiguous(), qdata, s)
        y = y if bias is None else y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], n)
    lib = library() if path != "reference" else None
    if lib is None or not qdata.is_contiguous():
        return None
    s = scale if scale.dtype == torch.float32 and scale.is_contiguous() else scale.float().contiguous()
    args = (qdata.data_ptr(), _fp8_lut().data_ptr(), s.data_ptr(), int(is_int8), n, k)
    return _launch(lib.qk_chan, x, m, n, path, bias, args)


@functools.cache
def _e2m1_table() -> torch.Tensor:
    from .reference.mxfp4 import E2M1_MAGNITUDES

    return torch.cat([E2M1_MAGNITUDES, -E2M1_MAGNITUDES]).contiguous()


def matmul_mxfp4(x, packed, scales, k: int, bias=None) -> torch.Tensor | None:
    """MXFP4 ``x @ dequant(W)^T + bias`` on the CPU, or None when the reference should run."""
    n = packed.shape[0]
    m = _rows(x, k)
    path = plan("mxfp4", m, x.dtype, n * k)
    lib = library() if path != "reference" else None
    if lib is None or not packed.is_contiguous():
        return None
    # 2**(E - 127) in fp32 (exact, subnormal at E = 0), as the reference's ldexp computes it
    s = _cached((packed, scales), "mxfp4-scale", lambda: torch.ldexp(torch.ones(scales.shape), scales.float() - 127))
    args = (packed.data_ptr(), s.data_ptr(), _e2m1_table().data_ptr(), n, k)
    return _launch(lib.qk_mxfp4, x, m, n, path, bias, args)
