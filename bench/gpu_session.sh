#!/usr/bin/env bash
# One GPU session, prepared on the CPU (issue 12): everything the device time is for, in one script,
# every output under $OUT. Prepare with bench/gpu_wheels.sh, then call the device tool with
#   command: bash bench/gpu_session.sh      carry: [".whl", ".gpu-carry"]      timeout_s: 600
# Steps, each under its own timeout so one that hangs cannot eat the rest:
#   1. the card's name; install the carried wheels (TRL, datasets, msgspec, ...) into /tmp/site;
#   2. a random-init Llama-3-8B-shaped model with SmolLM2's tokenizer (bench/random_model.py);
#   3. bench/gpu.py (SFT, DPO, GRPO, PPO on SmolLM2-135M-, Llama-3-8B- and Qwen2.5-7B-shaped models);
#   4. the -m gpu tests without the service's conftest (bf16 vs fp32 log-probs, flex layouts, the
#      chunked head's peak, the estimate against the measured peak);
#   5. the side by sides with TRL on the Llama-3-8B-shaped model, in bf16 (short: --rounds 1).
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ALIGND_MODEL_CACHE=/tmp/alignd-models
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch, transformers, peft; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } \
  > "$OUT/card.txt" 2>&1
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/card.txt" 2>&1 && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
step() {  # NAME SECONDS COMMAND...: one step, its output in $OUT/NAME.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local began=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "   rc=$? in $((SECONDS - began)) s; last line: $(tail -n 1 "$OUT/$name.txt")" | tee -a "$OUT/summary.txt"
}
step random_model 90 "$PY" bench/random_model.py --model llama3-8b --tokenizer .gpu-carry/tokenizer \
  --out "$ALIGND_MODEL_CACHE/llama3-8b-random"
export ALIGND_MODELS="llama3-8b-random=$ALIGND_MODEL_CACHE/llama3-8b-random"
step gpu_bench 180 "$PY" bench/gpu.py --steps 3
step gpu_tests 90 "$PY" -m pytest --noconftest -p no:cacheprovider -o addopts= -m gpu -q \
  tests/test_gpu_numerics.py tests/test_gpu_bench.py
step dpo_vs_trl 100 "$PY" bench/dpo_vs_trl.py --device cuda --model llama3-8b-random --rounds 1 --steps 4
step grpo_vs_trl 100 "$PY" bench/grpo_vs_trl.py --device cuda --model llama3-8b-random --rounds 1 --steps 3
grep -h "^gpu_bench \|^dpo_vs_trl: \|^grpo_vs_trl \|passed\|failed" "$OUT"/*.txt >> "$OUT/summary.txt"
