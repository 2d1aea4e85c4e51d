"""k-fold workflow: out-of-fold predictions of the fold adapters for every row, then the folds combined.

Train fold k of n first (n = round(1 / val_fraction); the same seed and data for every fold):
    for k in 0 1 2 3 4; do
        accelerate launch scripts/sft.py recipes/gemma2_9b.yaml --fold $k --output_dir out/gemma2-9b-fold$k
    done
Then:
    python scripts/kfold.py --data data/train.csv --base_model google/gemma-2-9b-it --max_length 1900 \
        --adapters out/gemma2-9b-fold0 out/gemma2-9b-fold1 out/gemma2-9b-fold2 out/gemma2-9b-fold3 \
        out/gemma2-9b-fold4 \
        --val_fraction 0.2 --combine average --test_data data/test.csv --out kfold/gemma2-9b

Writes <out>/fold-k/ (scripts/eval.py outputs of fold k on its validation rows), <out>/oof_predictions.parquet,
<out>/oof_metrics.json, <out>/averaged-adapter/ (combine average) and <out>/test/ (submission.csv for --test_data).
Every scripts/eval.py option (--swap_tta, --temperature, --precision, ...) applies.
"""


import importlib.util
import os


def eval_run():
    """`scripts/eval.py`'s `run` (the scoring run each fold and the test data go through)."""
    spec = importlib.util.spec_from_file_location("eval_script", os.path.join(os.path.dirname(__file__), "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run


def main(argv=None):
    from lmsys_trl.configs import parse
    from lmsys_trl.evaluation import EvalArguments
    from lmsys_trl.kfold import KFoldArguments, run_kfold

    kfold_args, eval_args = parse((KFoldArguments, EvalArguments), argv)
    return run_kfold(kfold_args, eval_args, eval_run())


if __name__ == "__main__":
    from lmsys_trl.configs import run_main

    run_main(main)  # checked errors (bad data, adapters, options, output dir) as one line, exit status 2
