#!/usr/bin/env bash
# The native engine's GPU checks in one call, phase by phase (default: all of them, in this order):
#   tests  - `pytest -m gpu` on the native engine (bf16 and fp32 against transformers, Triton kernel, CUDA graphs)
#   build  - the 7B-shaped random-weight model, initialised on the GPU, in $MODEL_DIR
#   steps  - bench/native_steps.py: the decode step alone (CUDA graph and eager), the engine's API overlapped and in turn
#   serve  - bench/native_gpu.py: the servers in $SERVERS under bench/serve_bench.py's client
# Run on the GPU machine from the repository root, with the wheels of bench/gpu_wheels.txt carried in
# bench-results/gpu-wheels (that file says how to download them). With the device tool:
#   run(carry=["bench-results/gpu-wheels"], timeout_s=600, command="bash bench/native_gpu_check.sh")
# Each phase has its own time limit, so one that hangs leaves time for the next, and none runs past $DEADLINE
# seconds from the start (the device tool stops a call at 600 s): a phase gets what is left, a phase with under
# 30 s left is skipped, and the serve phase starts no server it could not finish. The phases fit one call only
# when the steps phase or the slower servers are left out; otherwise run them in two calls back to back (the
# machine stays warm between them and the model built by the first is reused):
#   bash bench/native_gpu_check.sh build serve     then     bash bench/native_gpu_check.sh tests steps
# Logs and JSON land in $OUT (the device tool's return folder), else in bench-results/; the serve phase writes its
# JSON after each server, so what finished comes back even from a call that was stopped.
set -u
OUT=${OUT:-bench-results}
MODEL_DIR=${MODEL_DIR:-/tmp/qwen2-7b}
SERVERS=${SERVERS:-qwen-api-native,qwen-api-transformers,transformers-serve,qwen-api-native+prefill-delay=2}
BUDGET=${BUDGET:-330}  # seconds into the serve phase after which no further server is started
DEADLINE=${DEADLINE:-570}
PHASES=${*:-tests build steps serve}
export PYTHONUNBUFFERED=1 PYTHONPATH=src HF_HUB_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)
phase() { echo "=== $1 at $(($(date +%s) - start)) s"; }
# the smaller of a phase's own limit and the seconds left before the deadline (less 5 for the rest of the script)
limit() { local left=$((DEADLINE - ($(date +%s) - start) - 5)); echo $(($1 < left ? $1 : left)); }
phase install
python -m pip install -q --no-deps --no-compile bench-results/gpu-wheels/*.whl 2>&1 | grep -v "already installed" | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for p in $PHASES; do
  phase "$p"
  case $p in tests) t=$(limit 170) ;; build) t=$(limit 120) ;; steps) t=$(limit 150) ;; serve) t=$(limit $((BUDGET + 150))) ;; *) t=0 ;; esac
  if [ "$t" -lt 30 ]; then echo "skipped: $t s left before the ${DEADLINE} s deadline"; continue; fi
  case $p in
    tests)
      timeout "$t" python -m pytest -m gpu tests/integration/test_native_engine.py -q -s -p no:cacheprovider -W default \
        2>&1 | tee "$OUT/gpu-tests.log" | tail -30 ;;
    build)
      [ -f "$MODEL_DIR/config.json" ] || timeout "$t" python -m qwen_api.dev.random_qwen2 "$MODEL_DIR" --shape 7b \
        --dtype bfloat16 --device cuda 2>&1 | tail -2
      du -sh "$MODEL_DIR" ;;
    steps)
      timeout "$t" python bench/native_steps.py --model-dir "$MODEL_DIR" --concurrency 1,16,64 ${STEPS_ARGS:---compare-in-turn} \
        --out "$OUT/native_steps.json" 2>&1 | grep -v "^USDT" | tee "$OUT/native-steps.log" | tail -45 ;;
    serve)
      budget=$((t - 150 < BUDGET ? t - 150 : BUDGET))  # no server starts later than 150 s before the phase ends
      timeout "$t" python bench/native_gpu.py --shape 7b --model-dir "$MODEL_DIR" --servers "$SERVERS" \
        --budget-s "$((budget > 0 ? budget : 0))" --py-spy --out-dir "$OUT/native-gpu" 2>&1 | tail -80
      for log in "$OUT"/native-gpu/logs/*.log; do
        echo "--- $log"; grep -h "elementwise\|CUDA graphs\|KV cache" "$log"; tail -n 5 "$log"
      done ;;
  esac
done
phase done
