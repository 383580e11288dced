"""The ahead-of-time GPU compile gate (benchmarks/gpu_compile_check.py), run against the installed Triton.

Every Triton kernel, in every launch configuration the launchers and the planner produce for sm_80,
sm_89 and sm_90a, must compile through ptxas without spills and within shared memory. CI also runs the
same checker with Triton 3.6 (the GPU image's version) from ``.ci/run``. No GPU is needed.

The checker runs in subprocesses: it needs real ``triton.jit`` functions, while this suite imports the
kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKER = REPO / "benchmarks" / "gpu_compile_check.py"


def _run(*args: str, timeout: int, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    return subprocess.run(
        [sys.executable, str(CHECKER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_every_kernel_is_reached_on_every_target():
    """Recording only: every ``*_kernel`` is launched by the call grid for each target, no launcher fails,
    and the planner's per-target choices show (fp8 activations only from sm_89; 128-wide decode tiles only
    on sm_90a)."""
    proc = _run("--list", "--dtypes", "bf16", "--all-launches", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("sm_")]
    by_target = {t: {r[1] for r in rows if r[0] == t} for t in ("sm_80", "sm_89", "sm_90a")}
    kernels = set(next(ln for ln in proc.stdout.splitlines() if ln.startswith("# kernels:")).split()[2:])
    assert len(kernels) >= 18
    # the fused LoRA runs the base matmul kernels with their LoRA epilogue: no quantized copies in lora.py
    assert {k for k in kernels if k.startswith("lora.")} == {"lora._float_kernel"}
    assert by_target["sm_90a"] == kernels, kernels - by_target["sm_90a"]
    # sm_80 has no e4m3 conversion in Triton: the project never launches the fp8 activation kernels there
    assert by_target["sm_89"] == kernels
    assert not any("fp8e4nv" in " ".join(r) for r in rows if r[0] == "sm_80")
    wide_decode = [r for r in rows if r[1] == "matmul_pairs._forward_kernel" and "DECODE=int4_tile" in r
                   and "BLOCK_M=128" in r and "BLOCK_N=128" in r]  # fmt: skip
    assert wide_decode and {r[0] for r in wide_decode} == {"sm_90a"}


BROKEN = """
import triton
import triton.language as tl


@triton.jit
def _typo_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) + undefined_name)


@triton.jit
def _wide_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # 8192 fp32 values on one warp: 256 per thread, all live across the sum, past the 255-register limit
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x * tl.sum(x, axis=0))
"""


def test_checker_reports_compile_errors_and_spills(tmp_path):
    """The gate can fail: a kernel that does not compile and one that spills are both reported."""
    (tmp_path / "broken_kernels.py").write_text(BROKEN)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path[:0] = [{str(REPO / "benchmarks")!r}, {str(tmp_path)!r}]
        import gpu_compile_check as gcc
        import broken_kernels as bk
        kernels = {{"bk._typo_kernel": bk._typo_kernel, "bk._wide_kernel": bk._wide_kernel}}
        sig = {{"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"}}
        launches = [
            gcc.Launch("bk._typo_kernel", 90, sig, {{"BLOCK": 128}}, [], {{"num_warps": 4}}, "typo"),
            gcc.Launch("bk._wide_kernel", 80, sig, {{"BLOCK": 8192}}, [], {{"num_warps": 1}}, "wide"),
        ]
        results = gcc.compile_all(launches, kernels, jobs=2)
        print(json.dumps([gcc.verdict(la, r) for la, r in zip(launches, results)]))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert verdicts[0] == "FAIL"
    assert verdicts[1].startswith("SPILL"), verdicts


@pytest.mark.slow
def test_every_launch_compiles_for_sm80_sm89_sm90a(tmp_path):
    """The gate itself (installed Triton): 0 compile failures, 0 spills, 0 shared-memory overflows, 0
    unreached kernels, 0 launcher errors. The report names each problem (kernel, target, call, config)."""
    proc = _run("--repo", str(REPO), "--jobs", str(os.cpu_count() or 2), "--out", str(tmp_path / "gpu"), timeout=3000)
    report = (tmp_path / "gpu.md").read_text() if (tmp_path / "gpu.md").exists() else proc.stdout
    assert proc.returncode == 0, report[-6000:] + proc.stderr[-2000:]
    assert "result: PASS" in report


def test_planner_tiles_follow_the_target(monkeypatch):
    """The per-target choices the gate measured, as plain planner behaviour (no compile)."""
    import torch
    from qlora_kit.kernels import planner as pl

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter has its own small tiles
    hopper = pl.launch_tiles("gemm", 256, 64, arch=90)
    ampere = pl.launch_tiles("gemm", 256, 64, arch=80)
    assert (hopper["BLOCK_M"], hopper["BLOCK_N"], hopper["num_warps"]) == (128, 128, 8)
    assert (ampere["BLOCK_M"], ampere["BLOCK_N"], ampere["num_warps"]) == (64, 64, 4)  # 128 rows spilled
    assert pl.launch_tiles("gemm", 256, 128, arch=80, weight="int8")["BLOCK_M"] == 128  # int8 codes: no decode
    assert pl.launch_tiles("gemm", 256, 64, arch=90, even_k=False)["BLOCK_N"] == 64  # odd K spilled on sm_90a
    assert pl.launch_tiles("gemm", 256, 64, arch=89, elem_bytes=4)["BLOCK_K"] == 32  # TF32 smem on sm_89
    assert pl.launch_tiles("gemm", 256, 64, arch=89, elem_bytes=4)["num_warps"] == 8  # 4 spilled 8 B (3.6)
    # odd K before Hopper: 4 warps spilled 20-592 B (3.6 and 3.9, 2 or 3 stages); even K keeps 4
    assert pl.launch_tiles("gemm", 128, 64, arch=80, even_k=False)["num_warps"] == 8
    assert pl.launch_tiles("gemm", 128, 64, arch=80, even_k=True)["num_warps"] == 4
    assert pl.launch_tiles("grad", 64, 64, arch=80)["BLOCK_K"] == 32
    assert pl.launch_tiles("gemv", 1, 128, arch=90, elem_bytes=4)["BLOCK_K"] == 128
    # the two operand-kind cases: fp8 codes in the transposed product at 32 rows (4 warps spilled; with the
    # LoRA epilogue 4 warps compile clean), and per-channel codes + the LoRA epilogue at 32 rows
    assert pl.launch_tiles("grad", 32, 128, arch=90, weight="fp8")["num_warps"] == 8
    assert pl.launch_tiles("grad", 32, 128, arch=90, weight="int8")["num_warps"] == 4
    assert pl.launch_tiles("grad", 32, 128, arch=90, weight="fp8", lora=True)["num_warps"] == 4
    lora_cw = pl.launch_tiles("gemm", 32, 128, arch=89, weight="int8", lora=True)
    assert (lora_cw["num_stages"], lora_cw["BLOCK_K"], lora_cw["SUB_K"]) == (2, 32, 32)
    assert pl.launch_tiles("gemm", 32, 128, arch=89, weight="int8")["BLOCK_K"] == 64
    assert pl.device_arch(torch.device("cpu")) is None
    gemm = pl.MatmulPlan("gemm")
    with pl.assume_arch(90):
        assert pl.device_arch(torch.device("cpu")) == 90
        assert pl.dot_plan(gemm, torch.float32, torch.device("cpu"), True).path == "dequant"  # no FMA dots
        assert pl.dot_plan(gemm, torch.bfloat16, torch.device("cpu"), True).path == "gemm"
    with pl.assume_arch(80):
        assert not pl.triton_has_fp8(torch.device("cpu"))
    assert pl.dot_plan(gemm, torch.float32, torch.device("cpu"), True).path == "gemm"  # interpreter: kept
