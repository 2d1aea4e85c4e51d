"""Pseudo-labels: `scripts/eval.py`'s predictions on unlabelled rows + the scored file -> a training file whose
teacher columns are the predicted probabilities (for `--train_files` with `soft_label_weight`)."""

import json
import os

import numpy as np
import pandas as pd
from datasets import Dataset

from .data import KAGGLE_COLUMNS, TEACHER_COLUMNS, WINNER_COLUMNS, DataError, load_arena, teacher_probs
from .io import atomic_output


def pseudo_label_rows(data: Dataset, predictions: pd.DataFrame, include_labelled: bool = False,
                      min_confidence: float = 0.0) -> pd.DataFrame:
    """Kaggle-schema rows with teacher columns from `scripts/eval.py` predictions (the ensemble's `winner_model_*`).

    Unlabelled rows (all rows with `include_labelled`) whose top probability reaches `min_confidence`; the hard label
    (winner columns) is the teacher's most likely class; labelled rows keep their own label.
    """
    missing = [c for c in ("id", *WINNER_COLUMNS) if c not in predictions.columns]
    if missing:
        raise DataError(f"predictions lack column(s) {missing}; give scripts/eval.py's predictions.parquet")
    by_id = {str(r[0]): r[1:] for r in predictions[["id", *WINNER_COLUMNS]].itertuples(index=False)}
    absent = [i for i in data["id"] if i not in by_id]
    if absent:
        raise DataError(f"predictions have no row for id(s) {absent[:5]} of the data ({len(absent)} in all); "
                        "give the predictions of this very data file")
    out = []
    for row in data:
        if row["label"] >= 0 and not include_labelled:
            continue
        probs = teacher_probs(by_id[row["id"]], f"predictions: row id {row['id']}")
        if max(probs) < min_confidence:
            continue
        label = row["label"] if row["label"] >= 0 else int(np.argmax(probs))
        out.append({
            "id": row["id"],
            **{c: json.dumps(row[c], ensure_ascii=False) for c in KAGGLE_COLUMNS[1:]},
            **{c: int(label == k) for k, c in enumerate(WINNER_COLUMNS)},
            **dict(zip(TEACHER_COLUMNS, probs)),
        })
    if not out:
        raise DataError("no rows left for pseudo-labels (all labelled, or below --min_confidence)")
    return pd.DataFrame(out, columns=["id", *KAGGLE_COLUMNS[1:], *WINNER_COLUMNS, *TEACHER_COLUMNS])


def check_out_path(out_path: str, inputs: dict[str, list[str]], overwrite: bool) -> None:
    """The pseudo-label file may replace an earlier file only with `overwrite`, and never one of the inputs
    (`inputs`: option -> paths), whatever `overwrite` says."""
    if not out_path.endswith((".csv", ".parquet")):
        raise ValueError(f"{out_path}: the pseudo-label file must end in .csv or .parquet")
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"{out_path}: --out is a directory; give the pseudo-label file's path")
    if not os.path.lexists(out_path):
        return
    for option, paths in inputs.items():
        for path in paths:
            same = os.path.realpath(path) == os.path.realpath(out_path)
            if same or (os.path.exists(path) and os.path.exists(out_path) and os.path.samefile(path, out_path)):
                raise ValueError(f"--out {out_path} is an input ({option} {path}); the pseudo-labels never replace "
                                 "their input: give another --out")
    if not overwrite:
        raise FileExistsError(f"{out_path}: already exists; give another --out, or --overwrite true to replace it")


def write_pseudo_labels(predictions_path: str, data_paths: list[str], out_path: str, include_labelled: bool = False,
                        min_confidence: float = 0.0, overwrite: bool = False) -> pd.DataFrame:
    """Read predictions + the scored data, write the pseudo-labelled training file (.csv or .parquet) atomically.
    An existing `out_path` is replaced only with `overwrite`, an input file never."""
    if not 0 <= min_confidence <= 1:  # NaN too
        raise ValueError(f"--min_confidence must be a probability in [0, 1], got {min_confidence}")
    check_out_path(out_path, {"--predictions": [predictions_path], "--data": list(data_paths)}, overwrite)
    if not os.path.isfile(predictions_path):
        raise DataError(f"{predictions_path}: no such predictions file (scripts/eval.py writes predictions.parquet)")
    predictions = pd.read_parquet(predictions_path)
    predictions["id"] = predictions["id"].astype(str)
    rows = pseudo_label_rows(load_arena(data_paths), predictions, include_labelled, min_confidence)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_output(out_path) as tmp:
        if out_path.endswith(".csv"):
            rows.to_csv(tmp, index=False)
        else:
            rows.to_parquet(tmp, index=False)
    return rows
