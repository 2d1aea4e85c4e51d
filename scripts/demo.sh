#!/usr/bin/env bash
# CPU demo: export SmolLM2-135M-Instruct, LoRA-train it on the shared arena rows, then score the PandaLM test set.
# Run after scripts/setup.sh; takes about 10 minutes on 2 cores. Outputs: out/demo (adapter), eval_out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/prepare_demo_model.py --out models/smollm2-135m-instruct
accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    scripts/sft.py recipes/demo_cpu.yaml --overwrite_output_dir true
python3 scripts/eval.py recipes/eval_demo_cpu.yaml --data ../shared/data/pandalm_test.csv --max_rows ${DEMO_EVAL_ROWS:-100} \
    --overwrite true
echo "Adapter: $(pwd)/out/demo   Evaluation: $(pwd)/eval_out/demo (metrics.json, submission.csv, report.html)"
python3 - <<'PY'
import json
val, ev = (json.load(open(p)) for p in ("out/demo/metrics.json", "eval_out/demo/metrics.json"))
print(f"Validation rows of the arena sample: log loss {val['eval_log_loss']:.4f}, accuracy {val['eval_accuracy']:.3f}")
print(f"PandaLM test ({ev['rows']} rows): log loss {ev['log_loss']:.4f}, accuracy {ev['accuracy']:.3f}, "
      f"ECE {ev['ece']:.3f} (uniform guess: log loss 1.0986)")
PY
