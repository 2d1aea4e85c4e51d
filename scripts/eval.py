"""Score arena rows with trained LoRA adapters: A/B/C probabilities, swap TTA, temperature, ensembles, metrics.

Usage:
    python scripts/eval.py --base_model google/gemma-2-9b-it --adapters out/gemma2-9b --data val.csv --out eval/
    python scripts/eval.py recipes/eval_gemma2_9b.yaml --data val.csv --out eval/gemma2-9b
    python scripts/eval.py recipes/eval_ensemble.yaml --data test.csv --out sub/     # unlabelled -> sub/submission.csv

Writes metrics.json, predictions.parquet, submission.csv and report.html (+ PNG plots) into --out; per-member logits
are cached in <out>/members/*.parquet, so re-weighting or re-calibrating never re-runs a model.
"""


def main(argv=None):
    from lmsys_trl.configs import parse
    from lmsys_trl.evaluation import EvalArguments, run_eval

    (args,) = parse((EvalArguments,), argv)
    return run_eval(args)


if __name__ == "__main__":
    from lmsys_trl.configs import run_main

    run_main(main)  # checked errors (bad data, template, options, output dir) as one line, exit status 2
