"""Score arena rows with trained LoRA adapters: A/B/C probabilities, swap TTA, temperature, ensembles, metrics.

Usage:
    python scripts/eval.py --base_model google/gemma-2-9b-it --adapters out/gemma2-9b --data val.csv --out eval/
    python scripts/eval.py recipes/eval_gemma2_9b.yaml --data val.csv --out eval/gemma2-9b
    python scripts/eval.py recipes/eval_ensemble.yaml --data test.csv --out sub/     # unlabelled -> sub/submission.csv

Writes metrics.json, predictions.parquet, submission.csv and report.html (+ PNG plots) into --out; per-member logits
are cached in <out>/members/*.parquet, so re-weighting or re-calibrating never re-runs a model.
"""

import json
import logging
import os


def run(args) -> dict:
    """The scoring run for parsed `EvalArguments`; returns the metrics ({} for unlabelled data or a non-main process).
    The main process holds `--out` for the whole run (a second run into it is refused). Imports stay inside, so
    `--help` needs no torch."""
    from lmsys_trl.io import check_output_dir, clean_orphans, output_lock
    from lmsys_trl.model import process_state

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir(args.out, args.overwrite or args.resume, members=False)
    if not process_state().is_main_process:  # under `accelerate launch` the other processes only score shards
        return _run(args)
    with output_lock(args.out):
        check_output_dir(args.out, args.overwrite or args.resume)  # again: a run may have finished before the lock
        for path in clean_orphans(args.out):  # temp files of a killed run
            logging.getLogger(__name__).info("Removed %s (left by a killed run)", path)
        return _run(args)


def _run(args) -> dict:
    import numpy as np

    from lmsys_trl.ensemble import calibrate, ensemble_probs, post_process
    from lmsys_trl.evaluation import labelled_metrics, load_data
    from lmsys_trl.io import (
        check_json,
        check_probabilities,
        clear_results,
        write_json,
        write_predictions,
        write_submission,
    )
    from lmsys_trl.members import score_members
    from lmsys_trl.model import process_state
    from lmsys_trl.report import write_report

    # 1. data: the rows to score (and labelled rows to fit temperature / weights on)
    members = args.members()
    datasets = load_data(args)
    data = datasets["data"]

    # 2. members: letter logits of each member (and of the A/B-swapped rows), cached, sharded across processes
    logits = score_members(args, members, datasets)
    if not process_state().is_main_process:  # other processes only scored their shards
        return {}

    # 3. calibration: temperature and ensemble weights, given or fitted on labelled rows
    fit_on = "fit" if "fit" in datasets else "data"
    weights = np.array([m["weight"] for m in members])
    temperature, weights = calibrate(args, logits[fit_on], datasets[fit_on]["label"], weights)
    calibration = {"temperature": temperature, "weights": weights,
                   "fitted_on": "fit_data" if fit_on == "fit" else "data (in-sample)"}

    # 4. combine: probabilities per member, their weighted ensemble, then post-processing of empty / identical rows
    member_probs, probs = ensemble_probs(logits["data"], weights, temperature, args.swap_weight, args.swap_tta)
    before, rules = probs, [""] * len(data)
    if args.post_process:
        probs, rules = post_process(probs, data["response_a"], data["response_b"], args.empty_shift,
                                    args.identical_shift)
    check_probabilities(probs)  # finite, in [0, 1], summing to 1: checked before anything is written

    # 5. metrics of the labelled rows
    labels = np.asarray(data["label"])
    labelled = labels >= 0
    metrics = {}
    if labelled.any():
        metrics = labelled_metrics(args, members, data, logits["data"], member_probs, probs, before, rules,
                                   calibration)
        check_json(metrics, "metrics.json")

    # 6. outputs, each written atomically: the earlier run's results go first (so no file of it stays beside this
    # run's), then predictions, submission, metrics, report
    clear_results(args.out)
    write_predictions(os.path.join(args.out, "predictions.parquet"), data["id"], labels, member_probs, probs, rules)
    write_submission(os.path.join(args.out, "submission.csv"), data["id"], probs)
    print(f"Wrote {os.path.join(args.out, 'submission.csv')} ({len(data)} rows)")
    if not metrics:  # unlabelled: submission only
        return metrics
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    if args.report:
        lengths = [sum(map(len, p + a + b)) for p, a, b in zip(data["prompt"], data["response_a"], data["response_b"])]
        write_report(args.out, metrics, probs[labelled], labels[labelled], np.asarray(lengths)[labelled])
    print(json.dumps({k: metrics[k] for k in ("rows", "log_loss", "accuracy", "ece")}, indent=2))
    return metrics


def main(argv=None):
    from lmsys_trl.configs import parse
    from lmsys_trl.evaluation import EvalArguments

    (args,) = parse((EvalArguments,), argv)
    return run(args)


if __name__ == "__main__":
    from lmsys_trl.configs import run_main

    run_main(main)  # checked errors (bad data, template, options, output dir) as one line, exit status 2
