#!/usr/bin/env bash
# The GPU runs of issue 17 (speed round 2), as they ran on the lent H200; each mode is one device call, results under
# $OUT (JSON lines + logs). Run from the repo root after `source .device/setup.sh`.
#   precision <data dir>            SmolLM2-135M-Instruct (real weights, /tmp/smollm2): QLoRA adapter through
#                                   scripts/sft.py (recipes/smollm2_precision_gpu.yaml), then the held-out rows scored
#                                   at fp32 (plain) and under eval's GPU path at bf16 and several FP8 variants
#   infer <tokenizers> <data>       gemma-2-9b shapes (random weights): scoring speed of the same variants
#   train <tokenizers> <data>       gemma-2-9b shapes: training speed of the flex tile variants, then the compile
#                                   warm-up paid by a second process with a warm inductor cache
set -uo pipefail
mode=${1:?mode}; shift
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/$mode.log"
quiet() { tee -a "$log" | grep --line-buffered -v -i "warn\|it/s\|row/s\|examples/s"; }  # whole log under $OUT
case "$mode" in
  precision)
    data=${1:?data dir}
    mkdir -p /tmp/precision
    python3 - "$data" <<'PY'
import sys

import pandas as pd

data = sys.argv[1]
pandalm = pd.read_csv(f"{data}/pandalm_test.csv")
arena = pd.read_csv(f"{data}/lmsys_arena_sample100.csv")
pd.concat([pandalm.iloc[:500], arena]).to_csv("/tmp/precision/train.csv", index=False)
pandalm.iloc[500:].to_csv("/tmp/precision/heldout.csv", index=False)
print("train", 500 + len(arena), "held out", len(pandalm) - 500)
PY
    start=$(date +%s)
    python3 scripts/sft.py recipes/smollm2_precision_gpu.yaml 2>&1 | quiet | tail -5
    echo "adapter trained in $(( $(date +%s) - start )) s"
    python3 benchmarks/benchmark.py precision --base_model /tmp/smollm2 --adapters /tmp/precision/adapter \
        --data /tmp/precision/heldout.csv --max_length 1024 --swap_tta --precisions fp32 --baseline fp32 \
        --results "$out/precision.jsonl" \
        --variant bf16 precision=bf16 \
        --variant fp8 precision=fp8 \
        --variant fp8-exact-accum precision=fp8 fp8_fast_accum=false \
        --variant fp8-keep-down precision=fp8 'fp8_keep=[down_proj]' \
        --variant fp8-cal10 precision=fp8 fp8_keep_fraction=0.1 \
        --variant fp8-cal25 precision=fp8 fp8_keep_fraction=0.25 \
        --variant fp8-cal50 precision=fp8 fp8_keep_fraction=0.5 2>&1 | quiet
    ;;
  infer)
    tokenizers=${1:?tokenizers dir}; data=${2:?data dir}
    python3 benchmarks/benchmark.py infer --shape gemma-2-9b --max_length 1900 --tokenizer "$tokenizers/gemma-2" \
        --data "$data/lmsys_arena_sample100.csv" --passes 2 --results "$out/infer.jsonl" \
        --variant fp8 precision=fp8 \
        --variant fp8-keep-down precision=fp8 'fp8_keep=[down_proj]' \
        --variant fp8-cal25 precision=fp8 fp8_keep_fraction=0.25 \
        --variant flex-default-tiles 'flex_kernel_options={}' \
        --only reference default flex-default-tiles fp8 fp8-keep-down fp8-cal25 "${@:3}" 2>&1 | quiet
    ;;
  train)
    tokenizers=${1:?tokenizers dir}; data=${2:?data dir}
    common=(--shape gemma-2-9b --recipe recipes/gemma2_9b.yaml --tokenizer "$tokenizers/gemma-2"
            --data "$data/lmsys_arena_sample100.csv" --results "$out/train.jsonl")
    python3 benchmarks/benchmark.py train "${common[@]}" --warmup 2 --steps 3 --profile --profile_out "$out/profile.txt" \
        --variant flex-default-tiles 'flex_kernel_options={}' \
        --variant flex-bwd-default 'flex_kernel_options={"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32, "fwd_num_stages": 1}' \
        --only reference default flex-default-tiles flex-bwd-default "${@:3}" 2>&1 | quiet
    # the same default variant in a new process: the inductor / AOTAutograd caches in /tmp are now warm
    python3 benchmarks/benchmark.py train "${common[@]}" --warmup 1 --steps 2 --only default 2>&1 | quiet
    ;;
  *) echo "modes: precision, infer, train" >&2; exit 2 ;;
esac
