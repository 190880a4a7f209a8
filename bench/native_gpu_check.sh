#!/usr/bin/env bash
# The native engine's GPU checks in one call: the `gpu` tests, then the benchmark (bench/native_gpu.py).
# Run on the GPU machine from the repository root, with the wheels of bench/gpu_wheels.txt carried in
# bench-results/gpu-wheels (that file says how to download them). With the device tool:
#   run(carry=["bench-results/gpu-wheels"], timeout_s=600, command="bash bench/native_gpu_check.sh")
# Logs and the benchmark's JSON land in $OUT (the device tool's return folder), else in bench-results/.
set -u
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
python -m pip install -q --no-deps bench-results/gpu-wheels/*.whl 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PYTHONPATH=src timeout 150 python -m pytest -m gpu tests/integration/test_native_engine.py -q -s -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu-tests.log" | tail -25
PYTHONPATH=src timeout 420 python bench/native_gpu.py --shape 7b --model-dir /tmp/qwen2-7b \
    --out-dir "$OUT/native-gpu" 2>&1 | tee "$OUT/native-gpu.log" | tail -30
