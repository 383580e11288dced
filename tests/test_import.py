"""`import qlora_kit` must not import triton, bitsandbytes or diffusers, nor initialise CUDA."""

import subprocess
import sys

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
