#!/usr/bin/env bash
# lm-evaluation-harness against qwen-api: its loglikelihood requests (local-completions: echo, logprobs, token-id
# prompts, batches) through each engine, against lm-eval's own `hf` backend on the same checkpoint, per request.
# Offline: two small local tasks (bench/lm_eval/*.jsonl), the tiny Qwen2 built here. lm-eval gets a venv of its own
# ($WORK/venv): it is no dependency of qwen-api. The server's tokenizer is found by lm-eval itself (/tokenizer_info).
#
#     bash bench/lm_eval/check.sh                 # native and transformers engines
#     ENGINES=native WORK=/tmp/lm-eval bash bench/lm_eval/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-/tmp/qwen-api-lm-eval}
ENGINES=${ENGINES:-"native transformers"}
PORT=${PORT:-18231}
mkdir -p "$WORK/tasks"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$WORK/hf
[ -x "$WORK/venv/bin/lm-eval" ] || {
    python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q "lm-eval[hf,api]==0.4.13" torch==2.13.0 transformers==5.24.0
}
MODEL=$WORK/tiny
[ -f "$MODEL/config.json" ] || .venv/bin/python -m qwen_api.dev.random_qwen2 "$MODEL" --shape tiny
for kind in mc roll; do
    printf 'task: probe_%s\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: %s\ntest_split: test\n' \
        "$kind" "$ROOT/bench/lm_eval/$kind.jsonl" > "$WORK/tasks/probe_$kind.yaml"
done
cat >> "$WORK/tasks/probe_mc.yaml" <<'YAML'
output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
YAML
cat >> "$WORK/tasks/probe_roll.yaml" <<'YAML'
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
YAML
run() {  # OUTPUT MODEL_ARGS...
    local out=$1
    shift
    "$WORK/venv/bin/lm-eval" run --include_path "$WORK/tasks" --tasks probe_mc,probe_roll --batch_size 4 \
        --log_samples --output_path "$WORK/out/$out" "$@" > "$WORK/$out.log" 2>&1
}
rm -rf "$WORK/out"
run hf --model hf --model_args "pretrained=$MODEL,dtype=float32" --device cpu
status=0
for engine in $ENGINES; do
    .venv/bin/qwen-api serve --model "$MODEL" --served-model-name tiny --engine "$engine" --device cpu \
        --dtype float32 --host 127.0.0.1 --port "$PORT" > "$WORK/server-$engine.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
    run "$engine" --model local-completions \
        --model_args "model=tiny,base_url=http://127.0.0.1:$PORT/v1/completions,num_concurrent=1,max_retries=1"
    kill "$server"
    wait "$server" || true
    echo "== $engine against lm-eval's hf backend"
    grep -h "remote tokenizer" "$WORK/$engine.log" | head -1 || true
    "$WORK/venv/bin/python" bench/lm_eval/compare.py "$WORK/out/hf" "$WORK/out/$engine" || status=1
done
exit $status
