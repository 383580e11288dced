"""`import qlora_kit` must not import triton, bitsandbytes or diffusers, nor initialise CUDA."""

import subprocess
import sys
from pathlib import Path

CODE = """
import sys, torch
import qlora_kit
qlora_kit.quantize, qlora_kit.NF4Config, qlora_kit.memory_footprint, qlora_kit.save_quantized
from qlora_kit.nn import quantized
heavy = [m for m in ("triton", "bitsandbytes", "diffusers") if m in sys.modules]
assert not heavy, heavy
assert not torch.cuda.is_initialized()
print("clean")
"""


def test_import_is_light_and_does_not_touch_cuda():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


def test_kernels_installed_under_qlora_kit_not_top_level(tmp_path):
    """kernels/ is installed as qlora_kit.kernels: the top-level name `kernels` belongs to an unrelated PyPI
    package (transformers and bitsandbytes import it), so our installation must not provide it."""
    code = (
        "import importlib.util as u, qlora_kit.kernels.quant_4bit as k; "
        "s = u.find_spec('kernels'); print(k.__name__); print(s.origin if s else None); "
        "print(list(s.submodule_search_locations or []) if s else [])"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr
    name, origin, locations = out.stdout.strip().splitlines()
    assert name == "qlora_kit.kernels.quant_4bit"
    repo_kernels = str(Path(__file__).resolve().parents[1] / "kernels")
    assert repo_kernels not in origin and repo_kernels not in locations
