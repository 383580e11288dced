"""Ahead-of-time compile check of every Triton kernel for A100 (sm_80), Ada (sm_89) and Hopper (sm_90a).

No GPU needed. The question it answers on every commit: would each kernel, in each launch configuration
the project's launchers and the matmul planner produce for that GPU, compile, fit in registers without
spilling, fit in shared memory, and (on Hopper) put ``tl.dot`` on wgmma?

1. Record. The launchers (``quantize_4bit``, ``matmul_4bit``, ``lora_linear``, ...) are called on small
   CPU tensors while ``JITFunction.run`` is replaced by a recorder, under ``assume_arch(arch)`` so the
   planner picks what it would pick on that GPU. Nothing runs; each call is turned into what the JIT would
   compile: argument types and specialisation (the JIT's own ``native_specialize_impl``: pointers and ints
   divisible by 16, ints equal to 1 folded), constexprs, num_warps, num_stages. The launch list therefore
   follows the code; the only hand-written part is the grid of calls (:func:`calls`).
2. Compile. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=...)`` runs the
   whole pipeline down to a cubin with the ptxas bundled in Triton; its ``-v`` log gives registers, spills
   and static shared memory; the PTX tells whether a dot became ``wgmma.mma_async`` or ``mma.sync``.
3. Judge. Exit 1 on any compile failure, spill, shared memory over the per-block limit, launcher error,
   or a ``*_kernel`` that no recorded launch reaches; exit 0 otherwise.

Cost control (CI): sm_90a gets every recorded launch; sm_80 and sm_89 get one launch per distinct tile
configuration (kernel, operand dtypes, BLOCK_* sizes, warps, stages), since flags such as HAS_BIAS
change a few instructions, not the register tiles. ``--all-launches`` compiles everything everywhere.

Usage:
    python benchmarks/gpu_compile_check.py                        # installed qlora_kit, sm_80/89/90a
    python benchmarks/gpu_compile_check.py --repo . --arch 89     # kernels/ of a checkout, not installed
    python benchmarks/gpu_compile_check.py --kernels 'lora\\.' --list
    python benchmarks/gpu_compile_check.py --out benchmarks/results/gpu_compile  # .md + .json report
"""

from __future__ import annotations

import os

# before triton is imported: real JIT functions, no cached binaries (every run compiles), ptxas -v output
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

KERNEL_MODULES = ("quant_4bit", "quant_int", "act_quant", "matmul_4bit", "matmul_int", "lora")
# arch -> (name, shared memory one block may opt into, bytes; CUDA C programming guide, compute capabilities)
TARGETS = {80: ("sm_80", 163 * 1024), 89: ("sm_89", 99 * 1024), 90: ("sm_90a", 227 * 1024)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------ loading


def load_kernels(repo: str | None) -> dict[str, types.ModuleType]:
    """The kernel modules as ``qlora_kit.kernels.<name>``; from ``repo/kernels`` without installing qlora_kit.

    With ``repo`` an empty ``qlora_kit`` package stands in for the library, so only torch and triton are
    needed (the CI's Triton 3.6 environment holds nothing else).
    """
    if repo:
        kdir = os.path.join(os.path.abspath(repo), "kernels")
        if not os.path.isfile(os.path.join(kdir, "__init__.py")):
            raise SystemExit(f"--repo {repo}: no kernels/ package there")
        parent = types.ModuleType("qlora_kit")
        parent.__path__ = []
        sys.modules["qlora_kit"] = parent
        spec = importlib.util.spec_from_file_location(
            "qlora_kit.kernels", os.path.join(kdir, "__init__.py"), submodule_search_locations=[kdir]
        )
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["qlora_kit.kernels"] = pkg
        spec.loader.exec_module(pkg)
    pkg_dir = os.path.dirname(sys.modules["qlora_kit.kernels"].__file__) if repo else None
    if pkg_dir is None:
        pkg_dir = os.path.dirname(importlib.import_module("qlora_kit.kernels").__file__)
    # every module of kernels/ that defines Triton kernels, so a new one cannot escape the unreached check
    names = sorted(
        f[:-3]
        for f in os.listdir(pkg_dir)
        if f.endswith(".py") and "@triton.jit" in open(os.path.join(pkg_dir, f), encoding="utf-8").read()
    )
    return {name: importlib.import_module(f"qlora_kit.kernels.{name}") for name in (*KERNEL_MODULES, "planner", *names)}


def kernels_of(mods) -> dict[str, JITFunction]:
    """Every ``@triton.jit`` function named ``*_kernel`` defined in the modules, keyed "module.name"."""
    return {
        f"{name}.{attr}": fn
        for name, mod in mods.items()
        for attr, fn in vars(mod).items()
        if isinstance(fn, JITFunction) and fn.__module__ == mod.__name__ and attr.endswith("_kernel")
    }


# ---------------------------------------------------------------------------------------- recording


# constexprs besides the BLOCK_* sizes that change a kernel's register and shared-memory tiles
TILE_FLAGS = ("SUB_K", "HAS_LORA", "DECODE", "EVEN_K", "ALIGNED")


def _short(value) -> object:
    # a constexpr as the report shows it: a @triton.jit function (a DECODE) by its name
    return getattr(getattr(value, "fn", None), "__name__", value)


@dataclasses.dataclass
class Launch:
    """One distinct compile: what ``triton.compile`` needs, and the call that produced it."""

    kernel: str
    arch: int
    signature: dict  # arg -> "*bf16", "i32", "fp32", "constexpr", ...
    constexprs: dict  # arg -> value (declared constexprs and ints the JIT folds because they equal 1)
    divisible: list  # args specialised as divisible by 16
    options: dict  # num_warps, num_stages
    call: str  # first call that made it
    calls: int = 1

    def key(self) -> str:
        return json.dumps(
            [self.kernel, self.arch, self.signature, sorted(self.constexprs.items(), key=str), self.divisible,
             sorted(self.options.items())], default=str)  # fmt: skip

    def tile_key(self) -> str:
        """Kernel, operand types, tile sizes, launch options, the LoRA epilogue, the tile decoder, and K's
        alignment (odd K and K not a multiple of 16 mask and split loads): what sizes the register and smem
        tiles."""
        tiles = {k: _short(v) for k, v in self.constexprs.items() if k.startswith("BLOCK") or k in TILE_FLAGS}
        pointers = {k: v for k, v in self.signature.items() if v.startswith("*")}
        aligned = sorted(k for k in self.divisible if k in ("K", "k_bytes"))
        return json.dumps([self.kernel, pointers, sorted(tiles.items()), sorted(self.options.items()), aligned])

    def config(self) -> str:
        flags = " ".join(f"{k}={_short(v)}" for k, v in self.constexprs.items() if k != "GROUP_M" and v is not None)
        dtypes = sorted({t[1:] for t in self.signature.values() if t.startswith("*")})
        return f"{'/'.join(dtypes)} {flags} w{self.options.get('num_warps', 4)}s{self.options.get('num_stages', 3)}"


class Recorder:
    """Replaces ``JITFunction.run``: every ``kernel[grid](...)`` becomes a :class:`Launch`, nothing runs."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.launches: dict[str, Launch] = {}
        self.errors: list[str] = []
        self.arch = 90
        self.call = ""

    def record(self, fn: JITFunction, args, kwargs) -> None:
        sig = inspect.signature(fn.fn)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        bound.apply_defaults()
        options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
        declared = {p.name for p in fn.params if p.is_constexpr}
        signature, constexprs, divisible = {}, {}, []
        for name, value in bound.arguments.items():
            if name in declared:
                signature[name], constexprs[name] = "constexpr", value
                continue
            kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = spec
            elif spec == "D":
                divisible.append(name)
        launch = Launch(self.names.get(id(fn), fn.__name__), self.arch, signature, constexprs, divisible, options,
                        self.call)  # fmt: skip
        if launch.key() in self.launches:
            self.launches[launch.key()].calls += 1
        else:
            self.launches[launch.key()] = launch

    @contextlib.contextmanager
    def intercepting(self):
        original = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            self.record(fn, args, kwargs)

        JITFunction.run = run
        try:
            yield
        finally:
            JITFunction.run = original

    def play(self, mods, arch: int, calls) -> None:
        """Run every (label, thunk) as the planner would plan it for ``arch``."""
        self.arch = arch
        with self.intercepting(), mods["planner"].assume_arch(arch):
            for label, thunk in calls:
                self.call = label
                try:
                    thunk()
                except Exception as e:  # a launcher that cannot be driven is a finding
                    self.errors.append(f"sm_{arch} {label}: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------ the call grid

N, K = 256, 4096  # weight (out, in); K divisible by every blocksize / group size
K_ODD = 4041  # 4-bit rows starting mid-byte, absmax blocks straddling rows
GEMV_M, GEMM_M, GRAD_M, FLOAT_M = (1, 2, 4), (16, 32, 64, 128), (16, 32, 64), (1, 16, 64, 128)
DEQUANT_M = 2048  # past the default plan's gemm range: dequantize kernel + dense product


def _x(m: int, k: int, dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)


@contextlib.contextmanager
def _interpreter_flag():
    """quant_int / act_quant launchers refuse CPU tensors unless TRITON_INTERPRET=1 (their tiles ignore it)."""
    old = os.environ.get("TRITON_INTERPRET", "0")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ["TRITON_INTERPRET"] = old


@contextlib.contextmanager
def _tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class Weights:
    """Packed weights of every format, built with the pure-PyTorch reference quantizers (seeded, so each one
    is built once and shared by every target's call grid: the launchers only read them)."""

    def __init__(self):
        from qlora_kit.kernels.reference import lora as rl
        from qlora_kit.kernels.reference import matmul as rm
        from qlora_kit.kernels.reference import quant_4bit as r4
        from qlora_kit.kernels.reference import quant_int as ri

        self.r4, self.ri, self.rl, self.rm = r4, ri, rl, rm

    @functools.cache  # noqa: B019 - one process-lifetime instance (_weights)
    def dense(self, n=N, k=K):
        return torch.randn(n, k, generator=torch.Generator().manual_seed(n * 31 + k)) * 0.05

    @functools.cache  # noqa: B019 - one process-lifetime instance (_weights)
    def four_bit(self, k=K, blocksize=64, double_quant=True, quant_type="nf4"):
        packed, absmax = self.r4.quantize_4bit(self.dense(N, k), blocksize, quant_type)
        meta = self.rm.Quant4bitMeta((N, k), blocksize, quant_type, double_quant)
        if double_quant:
            return self.rm.Packed4bit(packed, meta, None, *self.r4.double_quantize(absmax))
        return self.rm.Packed4bit(packed, meta, absmax, None, None, None)

    @functools.cache  # noqa: B019 - one process-lifetime instance (_weights)
    def int4(self, group_size=128):
        packed, scale, zero = self.ri.quantize_int4(self.dense(), group_size)
        return self.rl.PackedInt(packed, scale, self.rl.IntQuantMeta((N, K), "int4", group_size), zero)

    @functools.cache  # noqa: B019 - one process-lifetime instance (_weights)
    def channelwise(self, fmt):
        q, scale = (self.ri.quantize_int8 if fmt == "int8" else self.ri.quantize_fp8)(self.dense())
        return self.rl.PackedInt(q, scale, self.rl.IntQuantMeta((N, K), fmt))


@functools.cache
def _weights() -> Weights:
    return Weights()


def calls(mods, dtypes: dict, arch: int, variations: bool = True) -> list[tuple[str, object]]:
    """(label, thunk) pairs covering every kernel x dtype x tile configuration of the planner's paths, and
    (``variations``, bf16 only) each flag the launchers set varied one at a time. fp8 activations are
    left out below sm_89, where the project refuses them (the fp8 *weight* paths stay: they fall back)."""
    q4, qi, aq, mm4, mi, lo = (mods[n] for n in KERNEL_MODULES)
    pl = mods["planner"]
    W = _weights()
    Plan = pl.MatmulPlan
    out: list[tuple[str, object]] = []

    def add(label, fn, *args, plan=None, interp=False, tf32=False, **kwargs):
        def thunk():
            with (
                pl.force_path(plan) if plan else contextlib.nullcontext(),
                _interpreter_flag() if interp else contextlib.nullcontext(),
                _tf32() if tf32 else contextlib.nullcontext(),
            ):
                fn(*args, **kwargs)

        out.append((label, thunk))

    def lora(base, m, dt, r=16, adapters=torch.float32, dropout=False, bias=False):
        n, k = base.meta.shape if hasattr(base, "meta") else base.shape

        def call():  # forward and backward: the forward and the dX kernels
            x = _x(m, k, dt).requires_grad_()
            a = (torch.randn(r, k) * 0.01).to(adapters).requires_grad_()
            b = (torch.randn(n, r) * 0.01).to(adapters).requires_grad_()
            xd = torch.nn.functional.dropout(x, 0.1) if dropout else None
            y = lo.lora_linear(x, base, torch.randn(n).to(dt) if bias else None, a, b,
                               lo.LoraMeta(scale=2.0, dropout=dropout), x_dropped=xd)  # fmt: skip
            y.float().sum().backward()

        return call

    gemv, gemm = Plan("gemv"), Plan("gemm")
    nf4, int4 = W.four_bit(), W.int4()
    cw = {f: W.channelwise(f) for f in ("int8", "fp8")}
    for dn, dt in dtypes.items():
        # quantize / dequantize kernels
        for bs in (64, 4096):
            add(f"quantize_4bit {dn} bs{bs}", q4.quantize_4bit, _x(N, K, dt), bs, "nf4")
        packed, absmax = W.r4.quantize_4bit(W.dense(), 64, "nf4")
        add(f"dequantize_4bit ->{dn}", q4.dequantize_4bit, packed, absmax, (N, K), 64, "nf4", dt)
        for f, quant, dequant in (("int8", qi.quantize_int8, qi.dequantize_int8),
                                  ("fp8", qi.quantize_fp8, qi.dequantize_fp8)):  # fmt: skip
            add(f"quantize_{f} {dn}", quant, _x(N, K, dt), interp=True)
            add(f"dequantize_{f} ->{dn}", dequant, cw[f].qdata, cw[f].scale, dt, interp=True)
        for gs in (32, 64, 128):
            p = W.int4(gs)
            add(f"quantize_int4 {dn} g{gs}", qi.quantize_int4, _x(N, K, dt), gs, interp=True)
            add(f"int4_quantize_with_params {dn} g{gs}", qi.int4_quantize_with_params, _x(N, K, dt), p.scale, p.zero,
                gs, interp=True)  # fmt: skip
            add(f"dequantize_int4 ->{dn} g{gs}", qi.dequantize_int4, p.qdata, p.scale, p.zero, K, gs, dt, interp=True)
        # activation quantization and the W8A8 / fp8 rowwise GEMM
        for k in (256, K):
            add(f"quantize_per_token_int8 {dn} K={k}", aq.quantize_per_token_int8, _x(4, k, dt))
            if arch >= 89:
                add(f"quantize_per_token_fp8 {dn} K={k}", aq.quantize_per_token_fp8, _x(4, k, dt))
        for f, linear in (("int8", aq.int8_dynamic_linear), ("fp8", aq.fp8_dynamic_linear))[: 1 + (arch >= 89)]:
            for m in GEMM_M:
                add(f"{f}_dynamic_linear {dn} M={m}", linear, _x(m, K, dt), cw[f].qdata, cw[f].scale)
        # weight-only matmuls: each path's tile configurations, forward and grad_input
        mats = [("nf4", mm4.matmul_4bit, mm4.matmul_4bit_grad_input, nf4, ()),
                ("int4", mi.matmul_int4, mi.matmul_int4_grad_input, int4, "int4"),
                ("int8", mi.matmul_channelwise, mi.matmul_channelwise_grad_input, cw["int8"], "cw"),
                ("fp8", mi.matmul_channelwise, mi.matmul_channelwise_grad_input, cw["fp8"], "cw")]  # fmt: skip
        for f, fwd, grad, w, kind in mats:
            wargs = (w,) if kind == () else (w.qdata, w.scale, w.zero, 128) if kind == "int4" else (w.qdata, w.scale)
            gargs = (w,) if kind == () else (w.qdata, w.scale, w.zero, K, 128) if kind == "int4" else wargs
            for m in GEMV_M:
                add(f"{f} gemv {dn} M={m}", fwd, _x(m, K, dt), *wargs, plan=gemv)
            for m in GEMM_M:
                add(f"{f} gemm {dn} M={m}", fwd, _x(m, K, dt), *wargs, plan=gemm)
            for m in GRAD_M:
                add(f"{f} grad_input {dn} M={m}", grad, _x(m, N, dt), *gargs, plan=gemm)
            add(f"{f} default plan {dn} M={DEQUANT_M}", fwd, _x(DEQUANT_M, K, dt), *wargs)
        # fused LoRA over every base and path
        for bname, base in (("float", W.dense().to(dt)), ("nf4", nf4), ("int4", int4), ("int8", cw["int8"]),
                            ("fp8", cw["fp8"])):  # fmt: skip
            if bname == "float":
                for m in FLOAT_M:
                    add(f"lora float {dn} M={m}", lora(base, m, dt))
                continue
            for plan, ms in ((gemv, GEMV_M), (gemm, GEMM_M)):
                for m in ms:
                    add(f"lora {bname} {plan.path} {dn} M={m}", lora(base, m, dt), plan=plan)
            add(f"lora {bname} default plan {dn} M={DEQUANT_M}", lora(base, DEQUANT_M, dt))
        if dt == torch.float32:  # torch.backends.cuda.matmul.allow_tf32: the tl.dot paths switch to TF32
            add("nf4 gemm fp32 tf32 M=128", mm4.matmul_4bit, _x(128, K, dt), nf4, plan=gemm, tf32=True)
            add("nf4 grad_input fp32 tf32 M=64", mm4.matmul_4bit_grad_input, _x(64, N, dt), nf4, plan=gemm, tf32=True)
            add("int4 gemm fp32 tf32 M=128", mi.matmul_int4, _x(128, K, dt), int4.qdata, int4.scale, int4.zero, 128,
                plan=gemm, tf32=True)  # fmt: skip
            add("int8 gemm fp32 tf32 M=128", mi.matmul_channelwise, _x(128, K, dt), cw["int8"].qdata,
                cw["int8"].scale, plan=gemm, tf32=True)  # fmt: skip
            add("lora nf4 gemm fp32 tf32 M=128", lora(nf4, 128, dt), plan=gemm, tf32=True)
            add("lora float fp32 tf32 M=128", lora(W.dense(), 128, dt), tf32=True)
    if variations:
        _variations(mods, W, add, lora)
    for name, mod in mods.items():  # a kernel family declares its own launches beside its kernels (``gate_calls``)
        hook = getattr(mod, "gate_calls", None)
        if callable(hook) and name not in KERNEL_MODULES:
            for dn, dt in dtypes.items():
                for label, fn, args, plan in hook(dt, Plan, _x):
                    add(f"{label} {dn}", fn, *args, plan=plan)
    absmax = torch.rand(K * N // 64)
    add("quantize_blockwise_8bit", q4.quantize_blockwise_8bit, absmax)
    add("dequantize_blockwise_8bit", q4.dequantize_blockwise_8bit, *W.r4.quantize_blockwise_8bit(absmax))
    return out


def _variations(mods, W, add, lora) -> None:
    """Each flag a launcher sets, varied one at a time (bf16) at the smallest gemv and the largest tiles."""
    mm4, mi = mods["matmul_4bit"], mods["matmul_int"]
    Plan, dt = mods["planner"].MatmulPlan, torch.bfloat16
    nf4, int4 = W.four_bit(), W.int4()
    fours = {"nf4 no-dq": W.four_bit(double_quant=False), "nf4 bs32": W.four_bit(blocksize=32),
             "nf4 bs128": W.four_bit(blocksize=128), "nf4 bs4096": W.four_bit(blocksize=4096),
             f"nf4 K={K_ODD}": W.four_bit(k=K_ODD), "fp4": W.four_bit(quant_type="fp4")}  # fmt: skip
    bias = torch.randn(N).to(dt)
    for name, w in fours.items():
        k = w.meta.shape[1]
        add(f"{name} gemv M=1", mm4.matmul_4bit, _x(1, k, dt), w, plan=Plan("gemv"))
        add(f"{name} gemm M=128", mm4.matmul_4bit, _x(128, k, dt), w, plan=Plan("gemm"))
        add(f"{name} grad_input M=64", mm4.matmul_4bit_grad_input, _x(64, N, dt), w, plan=Plan("gemm"))
        add(f"{name} dequantize", mm4.dequantize_packed_4bit, w, dt)
        add(f"lora {name} gemv M=1", lora(w, 1, dt), plan=Plan("gemv"))
        add(f"lora {name} gemm M=128", lora(w, 128, dt), plan=Plan("gemm"))
    for split in (2, 4, 8, 16):  # the default plan splits K on a GPU until two waves of SMs are busy
        add(f"nf4 gemv split{split} M=1", mm4.matmul_4bit, _x(1, K, dt), nf4, plan=Plan("gemv", split))
        add(f"int4 gemv split{split} M=1", mi.matmul_int4, _x(1, K, dt), int4.qdata, int4.scale, int4.zero, 128,
            plan=Plan("gemv", split))  # fmt: skip
        add(f"lora nf4 gemv split{split} M=1", lora(nf4, 1, dt), plan=Plan("gemv", split))
    for f in ("int8", "fp8"):
        w = W.channelwise(f)
        add(f"{f} gemv split4 M=1", mi.matmul_channelwise, _x(1, K, dt), w.qdata, w.scale, plan=Plan("gemv", 4))
        add(f"{f} gemv M=1 bias", mi.matmul_channelwise, _x(1, K, dt), w.qdata, w.scale, bias, plan=Plan("gemv"))
        add(f"{f} gemm M=128 bias", mi.matmul_channelwise, _x(128, K, dt), w.qdata, w.scale, bias, plan=Plan("gemm"))
        add(f"lora {f} gemv split4 M=1", lora(w, 1, dt), plan=Plan("gemv", 4))
    for lut in ("registers",):
        add(f"nf4 gemv lut={lut} M=1", mm4.matmul_4bit, _x(1, K, dt), nf4, plan=Plan("gemv", 1, lut))
        add(f"nf4 gemm lut={lut} M=128", mm4.matmul_4bit, _x(128, K, dt), nf4, plan=Plan("gemm", 1, lut))
        add(f"nf4 grad_input lut={lut} M=64", mm4.matmul_4bit_grad_input, _x(64, N, dt), nf4, plan=Plan("gemm", 1, lut))
        add(f"lora nf4 gemv lut={lut} M=1", lora(nf4, 1, dt), plan=Plan("gemv", 1, lut))  # fused LoRA follows the plan
        add(f"lora nf4 gemm lut={lut} M=128", lora(nf4, 128, dt), plan=Plan("gemm", 1, lut))
    for m, plan in ((1, Plan("gemv")), (128, Plan("gemm"))):
        add(f"nf4 {plan.path} M={m} bias", mm4.matmul_4bit, _x(m, K, dt), nf4, bias, plan=plan)
        add(f"int4 {plan.path} M={m} bias", mi.matmul_int4, _x(m, K, dt), int4.qdata, int4.scale, int4.zero, 128, bias,
            plan=plan)  # fmt: skip
    for gs in (32, 64):
        w = W.int4(gs)
        add(f"int4 g{gs} gemv M=1", mi.matmul_int4, _x(1, K, dt), w.qdata, w.scale, w.zero, gs, plan=Plan("gemv"))
        add(f"int4 g{gs} gemm M=128", mi.matmul_int4, _x(128, K, dt), w.qdata, w.scale, w.zero, gs, plan=Plan("gemm"))
        add(f"int4 g{gs} grad_input M=64", mi.matmul_int4_grad_input, _x(64, N, dt), w.qdata, w.scale, w.zero, K, gs,
            plan=Plan("gemm"))  # fmt: skip
        add(f"lora int4 g{gs} gemm M=128", lora(w, 128, dt), plan=Plan("gemm"))
    for bname, base in (("float", W.dense().to(dt)), ("float^T", W.dense(K, N).to(dt).t()), ("nf4", nf4)):
        plan = None if bname.startswith("float") else Plan("gemm")
        for kw in (dict(r=64), dict(dropout=True), dict(bias=True), dict(adapters=dt)):
            add(f"lora {bname} M=128 {kw}", lora(base, 128, dt, **kw), plan=plan)
        if plan is not None:
            add(f"lora {bname} gemv M=1 r=64", lora(base, 1, dt, r=64), plan=Plan("gemv"))


# ---------------------------------------------------------------------------------------- compiling

_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_STATE: dict = {}  # launches and kernel functions, inherited by forked compile workers


@contextlib.contextmanager
def _capture_fds():
    """Redirect fds 1 and 2 (where MLIR, LLVM and ptxas print) into a temporary file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    box = {}
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield box
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            box["log"] = f.read()


def compile_one(index: int) -> dict:
    """Compile launch ``index`` for its target; registers, spills, shared memory and dot lowering."""
    la: Launch = _STATE["launches"][index]
    fn = _STATE["kernels"][la.kernel]
    position = {p: i for i, p in enumerate(inspect.signature(fn.fn).parameters)}
    src = ASTSource(
        fn=fn,
        signature=la.signature,
        constexprs={(position[k],): v for k, v in la.constexprs.items()},
        attrs={(position[k],): BaseBackend.parse_attr("D") for k in la.divisible},
    )
    res = {"index": index, "ok": False, "error": "", "regs": None, "spill": 0, "stack": 0, "shared": 0, "dot": "-"}
    t0 = time.perf_counter()
    with _capture_fds() as cap:
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", la.arch, 32), options=dict(la.options))
        except Exception as e:  # MLIR pass failures, type errors, ptxas errors
            compiled, res["error"] = None, f"{type(e).__name__}: {e}"
    res["seconds"] = round(time.perf_counter() - t0, 2)
    log = cap["log"]
    if compiled is None:
        ptxas = re.search(r"error\s*:\s*(.*)", log + "\n" + res["error"])
        res["error"] = _headline(res["error"]) + (f" | ptxas: {ptxas.group(1)[:200]}" if ptxas else "")
        return res
    res["ok"] = True
    if m := _USED.search(log):
        res["regs"] = int(m.group(1))
    if m := _SPILL.search(log):
        res["stack"], res["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
    res["shared"] = (compiled.metadata.shared or 0) + (int(m.group(1)) if (m := _SMEM.search(log)) else 0)
    ptx = compiled.asm.get("ptx", "")
    res["dot"] = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else (
        "fma" if "tt.dot" in compiled.asm.get("ttir", "") else "-")  # fmt: skip
    return res


def _headline(error: str) -> str:
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    return (lines[0][:200] + (" ... " + lines[-1][:200] if len(lines) > 1 else "")) if lines else "?"


def compile_all(launches: list[Launch], kernels: dict, jobs: int) -> list[dict]:
    _STATE.update(launches=launches, kernels=kernels)
    results, t0 = [], time.time()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(compile_one, i): i for i in range(len(launches))}
        for n, fut in enumerate(cf.as_completed(futures), 1):
            try:
                results.append(fut.result())
            except Exception as e:  # a worker killed by a crash in LLVM / ptxas still yields a row
                results.append({"index": futures[fut], "ok": False, "error": f"worker died: {e}", "regs": None,
                                "spill": 0, "stack": 0, "shared": 0, "dot": "-", "seconds": 0})  # fmt: skip
            if n % 25 == 0 or n == len(futures):
                print(f"  compiled {n}/{len(futures)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return sorted(results, key=lambda r: r["index"])


# ------------------------------------------------------------------------------------------ report


def verdict(la: Launch, r: dict) -> str:
    if not r["ok"]:
        return "FAIL"
    if r["spill"]:
        return f"SPILL {r['spill']} B"
    if r["shared"] > TARGETS[la.arch][1]:
        return "SMEM > limit"
    return "ok"


def summarize(rows: list[dict], unreached, errors, versions: str) -> tuple[list[str], int]:
    """Markdown lines (one row per kernel: registers / shared memory per target, dot lowering on sm_90a;
    then every problem) and the exit status. ``rows``: one dict per compile (:func:`result_rows`)."""
    archs = sorted({r["arch"] for r in rows})
    heads = " | ".join(f"{TARGETS[a][0]} regs / smem KiB" for a in archs)
    rule = "|---|---:|" + "---:|" * len(archs) + "---|"
    lines = [f"{versions}; {len(rows)} compiles", "", f"| kernel | launches | {heads} | tl.dot on sm_90a |", rule]
    for kernel in sorted({r["kernel"] for r in rows}):
        mine = [r for r in rows if r["kernel"] == kernel]
        cells = []
        for a in archs:
            ok = [r for r in mine if r["arch"] == a and r["ok"]]
            regs = max((r["regs"] or 0 for r in ok), default=0)
            cells.append(f"{regs} / {max((r['shared'] for r in ok), default=0) / 1024:.1f}" if ok else "-")
        lines.append(f"| {kernel} | {len(mine)} | {' | '.join(cells)} | {_dot_cell(mine)} |")
    bad = [r for r in rows if r["verdict"] != "ok"]
    lines.append("")
    for r in bad:
        lines.append(
            f"- {r['verdict']}: {r['kernel']} {TARGETS[r['arch']][0]} [{r['call']}] {r['config']} {r['error']}"
        )
    for name in unreached:
        lines.append(f"- UNREACHED: {name}: no call of the grid launches it there (it would go unchecked)")
    for e in errors:
        lines.append(f"- LAUNCHER ERROR: {e}")
    n_bad = len(bad) + len(unreached) + len(errors)
    lines += [f"result: {'PASS' if n_bad == 0 else f'FAIL ({n_bad} problems)'}"]
    return lines, int(n_bad > 0)


def _dot_cell(rows: list[dict]) -> str:
    """How tl.dot lowered on sm_90a, with the row-tile sizes (BLOCK_M) of each lowering."""
    by_kind: dict = {}
    for r in rows:
        if r["arch"] == 90 and r["ok"] and r["dot"] != "-":
            by_kind.setdefault(r["dot"], set()).add(r["constexprs"].get("BLOCK_M", "?"))
    parts = [
        f"{kind} (BLOCK_M {','.join(str(m) for m in sorted(ms, key=lambda v: int(v) if str(v).isdigit() else 0))})"
        for kind, ms in sorted(by_kind.items())
    ]
    return "; ".join(parts) or "no dot"


def result_rows(launches: list[Launch], results: list[dict]) -> list[dict]:
    """One JSON-ready dict per compile: the launch, its result and the verdict."""
    return [{**_fields(la), **r, "config": la.config(), "target": TARGETS[la.arch][0], "verdict": verdict(la, r)}
            for la, r in zip(launches, results, strict=True)]  # fmt: skip


def _fields(la: Launch) -> dict:
    # the launch as JSON-ready values (a DECODE constexpr is a @triton.jit function: its name)
    out = {f.name: getattr(la, f.name) for f in dataclasses.fields(Launch)}
    return {**out, "constexprs": {k: _short(v) for k, v in la.constexprs.items()}}


def select(recorder: Recorder, full_archs, tile_archs, pattern: str) -> list[Launch]:
    """Every launch on ``full_archs``; one per distinct tile configuration on ``tile_archs``."""
    chosen, seen = [], set()
    for la in recorder.launches.values():
        if not re.search(pattern, la.kernel):
            continue
        if la.arch in full_archs:
            chosen.append(la)
        elif la.arch in tile_archs and (la.arch, la.tile_key()) not in seen:
            seen.add((la.arch, la.tile_key()))
            chosen.append(la)
    return chosen


def write_report(out: str, rows, lines, versions, unreached, errors) -> None:
    """OUT.md (the report, with the command) and OUT.json (every compile; ``--report`` renders it again)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    command = "python benchmarks/gpu_compile_check.py " + " ".join(a for a in sys.argv[1:])
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(f"# GPU compile check ({versions})\n\nCommand: `{command}`\n\n" + "\n".join(lines) + "\n")
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump({"versions": versions, "unreached": unreached, "errors": errors, "compiles": rows}, f, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", help="load kernels/ from this checkout instead of the installed qlora_kit")
    p.add_argument("--arch", default="80,89,90", help="targets: comma-separated compute capabilities (80,89,90)")
    p.add_argument("--all-launches", action="store_true", help="every launch on every target (default: every "
                   "launch on sm_90a, one per tile configuration on sm_80 / sm_89)")  # fmt: skip
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="activation dtypes of the call grid")
    p.add_argument("--no-variations", action="store_true", help="skip the one-flag-at-a-time variations")
    p.add_argument("--kernels", default="", help="regex on 'module._name_kernel': compile only those")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--list", action="store_true", help="print the selected launches and exit")
    p.add_argument("--out", help="write OUT.md (report) and OUT.json (every compile) here")
    p.add_argument("--report", metavar="JSON", help="print the report of an earlier --out run's JSON and exit")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            data = json.load(f)
        versions = data.get("versions") or f"triton {data['triton']}, torch {data['torch']}"
        fields = {f.name for f in dataclasses.fields(Launch)}
        for r in data["compiles"]:
            r.setdefault("config", Launch(**{k: v for k, v in r.items() if k in fields}).config())
        lines, status = summarize(data["compiles"], data.get("unreached", []), data.get("errors", []), versions)
        print("\n".join(lines))
        return status
    archs = [int(a) for a in args.arch.split(",")]
    if any(a not in TARGETS for a in archs):
        p.error(f"--arch takes {sorted(TARGETS)}")
    mods = load_kernels(args.repo)
    kernels = kernels_of(mods)
    recorder = Recorder({id(fn): name for name, fn in kernels.items()})
    dtypes = {d: DTYPES[d] for d in args.dtypes.split(",")}
    t0 = time.time()
    for arch in archs:
        grid = calls(mods, dtypes, arch, not args.no_variations)
        recorder.play(mods, arch, grid)
    unreached = [
        f"{name} on {TARGETS[arch][0]}"
        for arch in archs
        for name in sorted(kernels)
        if re.search(args.kernels, name)
        and not any(la.kernel == name and la.arch == arch for la in recorder.launches.values())
    ]
    full = set(archs) if args.all_launches else {a for a in archs if a == 90}
    launches = select(recorder, full, set(archs) - full, args.kernels)
    print(f"recorded {len(recorder.launches)} launches ({len(grid)} calls x {len(archs)} targets) in "
          f"{time.time() - t0:.0f} s; compiling {len(launches)}", file=sys.stderr)  # fmt: skip
    if args.list:
        print("# kernels: " + " ".join(sorted(kernels)))
        for la in launches:
            print(f"{TARGETS[la.arch][0]:7} {la.kernel:36} {la.config()}  [{la.call}]")
        problems = [f"UNREACHED: {u}" for u in unreached] + [f"LAUNCHER ERROR: {e}" for e in recorder.errors]
        print("\n".join(problems), file=sys.stderr)
        return int(bool(problems))
    results = compile_all(launches, kernels, max(1, args.jobs))
    rows = result_rows(launches, results)
    versions = f"triton {triton.__version__}, torch {torch.__version__}"
    lines, status = summarize(rows, unreached, recorder.errors, versions)
    print("\n".join(lines))
    if args.out:
        write_report(args.out, rows, lines, versions, unreached, recorder.errors)
    return status


if __name__ == "__main__":
    sys.exit(main())
