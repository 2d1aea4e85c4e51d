"""k-fold workflow: out-of-fold predictions of the fold adapters, and combining them (ensemble or LoRA averaging).

Fold k's adapter is trained by `scripts/sft.py ... --fold k --val_fraction 1/n` (grouped folds of
`data.split_train_val`); it scores exactly the rows it did not see, through `scripts/eval.py`'s `run`, so the
out-of-fold predictions cover every row once. The folds are then combined either as an ensemble of their
probabilities (`run_eval` with one member per fold) or as one adapter whose LoRA weights are the elementwise mean of
the fold adapters' `lora_A` and `lora_B` (`average_adapters`). Averaging A and B separately is what the 1st-place
solution did; it is not the mean of the folds' updates B @ A (the product of means differs from the mean of products),
but it keeps one adapter of the same rank, and folds trained from the same start stay close enough for it to work.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import pandas as pd

from .data import KAGGLE_COLUMNS, WINNER_COLUMNS, DataError, load_arena, split_train_val
from .io import atomic_output
from .metrics import log_loss


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# adapter_config.json keys that must agree for an average to mean anything
SAME_CONFIG_KEYS = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "use_rslora",
                    "use_dora", "modules_to_save")


def num_folds(val_fraction: float) -> int:
    """The fold count of `data.split_train_val` for `val_fraction`."""
    return max(2, round(1 / val_fraction))


def average_adapters(adapters: list[str], out_dir: str, overwrite: bool = False) -> str:
    """Write one LoRA adapter whose every tensor (lora_A, lora_B, ...) is the elementwise mean over `adapters`.

    The adapters must share their configuration (rank, alpha, target modules, base model) and tensor names/shapes.
    The result (weights + the first adapter's config) replaces `out_dir` atomically.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if len(adapters) < 2:
        raise ValueError(f"averaging needs at least two adapters, got {adapters}")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite true or choose another output")
    configs = []
    for adapter in adapters:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            if not os.path.isfile(os.path.join(adapter, name)):
                raise FileNotFoundError(f"{adapter}: no {name}; give LoRA adapter directories (scripts/sft.py output)")
        with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
            configs.append(json.load(f))
    for adapter, config in zip(adapters[1:], configs[1:]):
        differ = [k for k in SAME_CONFIG_KEYS if _normalised(config.get(k)) != _normalised(configs[0].get(k))]
        if differ:
            raise ValueError(f"{adapter}: adapter config differs from {adapters[0]} in {differ}; cannot average")
    weights = [load_file(os.path.join(a, ADAPTER_WEIGHTS)) for a in adapters]
    for adapter, tensors in zip(adapters[1:], weights[1:]):
        shapes, first = {k: v.shape for k, v in tensors.items()}, {k: v.shape for k, v in weights[0].items()}
        if shapes != first:
            raise ValueError(f"{adapter}: tensor names/shapes differ from {adapters[0]}; cannot average")
    mean = {
        name: torch.stack([w[name].float() for w in weights]).mean(0).to(tensor.dtype).contiguous()
        for name, tensor in weights[0].items()
    }
    with safe_open(os.path.join(adapters[0], ADAPTER_WEIGHTS), "pt") as f:
        metadata = f.metadata()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".average-")
    try:
        save_file(mean, os.path.join(tmp, ADAPTER_WEIGHTS), metadata=metadata)
        shutil.copy(os.path.join(adapters[0], ADAPTER_CONFIG), os.path.join(tmp, ADAPTER_CONFIG))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write("# Averaged LoRA adapter\n\nElementwise mean of lora_A and lora_B (each separately) of:\n\n"
                    + "".join(f"- {os.path.abspath(a)}\n" for a in adapters))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _normalised(value):
    return sorted(value) if isinstance(value, list) else value


def write_rows(dataset, path: str) -> str:
    """Arena rows as a Kaggle-schema Parquet file that `load_arena` reads back unchanged (labelled rows only)."""
    if min(dataset["label"]) < 0:
        raise DataError("out-of-fold predictions need labelled rows (winner columns) in the training data")
    frame = pd.DataFrame({c: dataset[c] for c in KAGGLE_COLUMNS})
    for k, column in enumerate(WINNER_COLUMNS):
        frame[column] = [int(label == k) for label in dataset["label"]]
    with atomic_output(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def out_of_fold(eval_args, val_fraction: float, seed: int, run_eval) -> pd.DataFrame:
    """Score each fold's validation rows with that fold's adapter (`eval_args.adapters[k]`) through `run_eval`
    (`scripts/eval.py`'s run: `EvalArguments` -> metrics).

    Writes <out>/fold-k/ (run_eval's outputs for fold k), <out>/oof_predictions.parquet (id, fold, label, A/B/tie
    probabilities for every row) and <out>/oof_metrics.json; returns the predictions.
    """
    from .io import check_output_dir, write_json

    folds = num_folds(val_fraction)
    if len(eval_args.adapters) != folds:
        raise ValueError(
            f"val_fraction {val_fraction} means {folds} folds: give {folds} adapters (fold 0 first), got "
            f"{len(eval_args.adapters)}"
        )
    check_output_dir(eval_args.out, eval_args.overwrite)
    rows = load_arena(eval_args.data)
    parts = []
    for fold, adapter in enumerate(eval_args.adapters):
        _, val = split_train_val(rows, val_fraction, seed=seed, fold=fold)
        fold_dir = os.path.join(eval_args.out, f"fold-{fold}")
        os.makedirs(fold_dir, exist_ok=True)
        fold_args = dataclasses.replace(
            eval_args, data=[write_rows(val, os.path.join(fold_dir, "rows.parquet"))], out=fold_dir,
            adapters=[adapter], member_names=None, weights=None, fit_weights=False, max_rows=None,
        )
        run_eval(fold_args)
        predictions = pd.read_parquet(os.path.join(fold_dir, "predictions.parquet"))
        parts.append(predictions[["id", "label", *WINNER_COLUMNS]].assign(fold=fold, adapter=adapter))
    oof = pd.concat(parts, ignore_index=True)
    with atomic_output(os.path.join(eval_args.out, "oof_predictions.parquet")) as tmp:
        oof.to_parquet(tmp, index=False)
    probs, labels = oof[list(WINNER_COLUMNS)].to_numpy(), oof["label"].to_numpy()
    metrics = {
        "rows": len(oof),
        "folds": folds,
        "oof_log_loss": log_loss(probs, labels),
        "per_fold_log_loss": {f: log_loss(probs[oof["fold"] == f], labels[oof["fold"] == f]) for f in range(folds)},
        "oof_accuracy": float(np.mean(probs.argmax(1) == labels)),
    }
    write_json(os.path.join(eval_args.out, "oof_metrics.json"), metrics)
    return oof


@dataclasses.dataclass
class KFoldArguments:
    """Arguments of `scripts/kfold.py` besides `scripts/eval.py`'s (whose `--adapters` are the fold adapters)."""

    val_fraction: float = dataclasses.field(
        default=0.2, metadata={"help": "The val_fraction the folds were trained with (0.2 = 5 folds)."}
    )
    seed: int = dataclasses.field(default=42, metadata={"help": "The training seed (it deals the grouped folds)."})
    combine: str = dataclasses.field(
        default="average",
        metadata={"help": "How the folds score --test_data: 'average' (one adapter, mean LoRA weights) or 'ensemble' "
                          "(one member per fold adapter)."},
    )
    test_data: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Files to score with the combined folds (-> <out>/test/submission.csv)."}
    )

    def __post_init__(self):
        if self.combine not in ("average", "ensemble"):
            raise ValueError(f"combine must be 'average' or 'ensemble', got {self.combine!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def run_kfold(kfold_args: KFoldArguments, eval_args, run_eval) -> dict:
    """Out-of-fold predictions for every row, then the folds combined (averaged adapter or ensemble) and, with
    `test_data`, the test files scored by that combination. Returns the out-of-fold metrics."""
    out_of_fold(eval_args, kfold_args.val_fraction, kfold_args.seed, run_eval)
    adapters = eval_args.adapters
    if kfold_args.combine == "average":
        path = os.path.join(eval_args.out, "averaged-adapter")
        adapters = [average_adapters(adapters, path, overwrite=eval_args.overwrite)]
        print(f"Averaged adapter: {path}")
    if kfold_args.test_data:
        run_eval(dataclasses.replace(
            eval_args, data=list(kfold_args.test_data), out=os.path.join(eval_args.out, "test"), adapters=adapters,
            member_names=None, weights=None, max_rows=None,
        ))
    with open(os.path.join(eval_args.out, "oof_metrics.json")) as f:
        metrics = json.load(f)
    print(json.dumps({k: metrics[k] for k in ("rows", "folds", "oof_log_loss", "oof_accuracy")}, indent=2))
    return metrics
