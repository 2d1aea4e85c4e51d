"""Turn scripts/eval.py output into a soft-labelled training file (pseudo-labels for unlabelled rows).

Usage:
    python scripts/eval.py recipes/eval_gemma2_9b.yaml --data unlabelled.csv --out eval/unlabelled
    python scripts/pseudo_label.py --predictions eval/unlabelled/predictions.parquet --data unlabelled.csv \
        --out data/pseudo.csv
    accelerate launch scripts/sft.py recipes/gemma2_9b.yaml --train_files data/train.csv data/pseudo.csv \
        --soft_label_weight 0.5

The output has the Kaggle columns, winner columns (the teacher's most likely class) and teacher_a / teacher_b /
teacher_tie (the ensemble's probabilities, `winner_model_*` of predictions.parquet).
"""

from dataclasses import dataclass, field


@dataclass
class PseudoLabelArguments:
    predictions: str = field(metadata={"help": "predictions.parquet written by scripts/eval.py for --data."})
    data: list[str] = field(metadata={"help": "The arena file(s) that scripts/eval.py scored."})
    out: str = field(metadata={"help": "Training file to write (.csv or .parquet)."})
    include_labelled: bool = field(
        default=False, metadata={"help": "Also keep labelled rows (their own hard label, the teacher's soft label)."}
    )
    min_confidence: float = field(
        default=0.0, metadata={"help": "Keep only rows whose most likely class has at least this probability."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing --out file (never one of the inputs: --data, --predictions)."},
    )


def main(argv=None):
    from lmsys_trl.configs import parse
    from lmsys_trl.pseudo_labels import write_pseudo_labels

    (args,) = parse((PseudoLabelArguments,), argv)
    rows = write_pseudo_labels(args.predictions, args.data, args.out, args.include_labelled, args.min_confidence,
                               overwrite=args.overwrite)
    print(f"Wrote {args.out} ({len(rows)} pseudo-labelled rows)")
    return rows


if __name__ == "__main__":
    from lmsys_trl.configs import run_main

    run_main(main)  # checked errors (bad data, predictions, output path) as one line, exit status 2
