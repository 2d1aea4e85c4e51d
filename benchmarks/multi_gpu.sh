#!/usr/bin/env bash
# Multi-GPU launches of scripts/sft.py (issue 7): QLoRA on gemma-2-9b shapes (random weights, few layers) through
# each accelerate config at world size 1 and N, on the training benchmark's length mix (lmsys_arena_sample100 rows,
# gemma-2 tokenizer, max_length 2200). Every run trains on the same 80 rows for MAX_STEPS optimiser steps (default 20,
# of 16 rows on average with TRL's packing: about 4 epochs): gradient accumulation is divided by the world size
# (keep_rows_per_step). Appends one JSON line per run to benchmarks/results.jsonl and checks that each saved adapter
# loads in scripts/eval.py. The flex kernel and compiled layers are off by default here (SFT_ARGS: eager attention,
# torch_compile false; EVAL_ARGS): their compilation (~30 s a shape) would dominate short runs.
#   bash benchmarks/multi_gpu.sh <tokenizers dir> <data dir> <out dir> [world sizes...]     (default: 1 2)
set -uo pipefail
tokenizers=${1:?tokenizers dir}; data=${2:?data dir}; out=${3:?out dir}; shift 3
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(1 2)
steps=${MAX_STEPS:-20}
# SHAPE / LAYERS / SFT_ARGS / EVAL_ARGS let a CPU dry run use a tiny model (see docs/benchmarks.md).
shape=${SHAPE:-gemma-2-9b}; layers=${LAYERS:-4}; configs=${CONFIGS:-single_gpu multi_gpu deepspeed_zero2 deepspeed_zero3 fsdp_qlora}
model=$out/$shape-${layers}l
[ -f "$model/config.json" ] || python3 benchmarks/random_model.py --shape "$shape" --num_layers "$layers" \
    --tokenizer "$tokenizers/gemma-2" --out "$model" >/dev/null
for n in "${sizes[@]}"; do
  for cfg in $configs; do
    if [ "$n" = 1 ] && [ "$cfg" = multi_gpu ]; then continue; fi
    if [ "$n" != 1 ] && [ "$cfg" = single_gpu ]; then continue; fi
    run=$out/$cfg-w$n
    start=$(date +%s)
    # a single process must see one GPU (else the Trainer wraps the model in nn.DataParallel)
    # GPUS / PORT let two world-size-1 runs share a host (e.g. GPUS=1 PORT=29600)
    CUDA_VISIBLE_DEVICES=${GPUS:-$(seq -s, 0 $((n - 1)))} timeout "${RUN_TIMEOUT:-300}" accelerate launch \
        --config_file accelerate_configs/$cfg.yaml --num_processes "$n" --main_process_port "${PORT:-29500}" scripts/sft.py \
        recipes/gemma2_9b.yaml --model_name_or_path "$model" --train_files "$data/lmsys_arena_sample100.csv" \
        --max_train_rows 80 --swap_augment 0 --max_val_rows 8 --max_steps "$steps" --logging_steps 1 \
        --save_strategy no --overwrite_output_dir true --output_dir "$run" ${SFT_ARGS:---attn_implementation eager --torch_compile false} > "$run.log" 2>&1
    rc=$?
    loads=no
    if [ -n "${SKIP_EVAL:-}" ]; then loads=skipped
    elif [ $rc = 0 ] && CUDA_VISIBLE_DEVICES=${GPUS:-0} python3 scripts/eval.py --base_model "$model" --adapters "$run" --max_length 1900 \
        --data "$data/lmsys_arena_sample100.csv" --max_rows 8 --out "$run-eval" --no_report ${EVAL_ARGS:---precision 4bit --pack_rows false} \
        > "$run-eval.log" 2>&1; then loads=yes; fi
    python3 - "$run" "$cfg" "$n" "$rc" "$loads" "$start" "$steps" <<'PY'
import json, os, re, sys, time, datetime, torch
run, cfg, n, rc, loads, start, steps = sys.argv[1:]
m = json.load(open(os.path.join(run, "metrics.json"))) if rc == "0" else {}
# rows/s: arena rows trained (80 rows x the epochs the trainer reached: the last "epoch" of its log) over metrics.json's
# train_runtime (compilation and warm-up included). Packed steps hold a varying number of rows, so steps x 16 is not it.
epochs = re.findall(r"epoch\W+([0-9.]+)", open(run + ".log").read()) if rc == "0" else []
rows = 80 * float(epochs[-1]) if epochs else None
size = os.path.getsize(os.path.join(run, "adapter_model.safetensors")) if rc == "0" else 0
line = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "model": os.path.basename(os.path.dirname(run + "/")) and os.environ.get("SHAPE", "gemma-2-9b") + f"-{os.environ.get('LAYERS', 4)}layers",
        "mode": "train", "variant": f"{cfg}-world{n}", "world_size": int(n), "rc": int(rc),
        "tokens_per_s": m.get("train_tokens_per_second"),
        "tokens_per_s_per_gpu": round(m["train_tokens_per_second"] / int(n), 1) if m.get("train_tokens_per_second") else None,
        "rows_per_s": round(rows / m["train_runtime"], 2) if rows and m.get("train_runtime") else None,
        "peak_gib": m.get("peak_gpu_memory_gib"), "adapter_bytes": size, "adapter_loads_in_eval": None if loads == "skipped" else loads == "yes",
        "wall_s": int(time.time()) - int(start), "max_steps": int(steps),
        "command": f"accelerate launch --config_file accelerate_configs/{cfg}.yaml --num_processes {n} scripts/sft.py recipes/gemma2_9b.yaml (benchmarks/multi_gpu.sh)"}
print(json.dumps(line), flush=True)
with open(os.environ.get("RESULTS", "benchmarks/results.jsonl"), "a") as f:
    f.write(json.dumps(line) + "\n")
PY
    [ $rc = 0 ] || tail -25 "$run.log"
  done
done
