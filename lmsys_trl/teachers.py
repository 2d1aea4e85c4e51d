"""Soft labels, data side: teacher probabilities joined onto arena rows, per-row targets, A/B swap pairs.

Rows may carry teacher probabilities (`teacher_a`, `teacher_b`, `teacher_tie` in the arena file, or `--teacher_files`
= `predictions.parquet` of `scripts/eval.py`). `with_teacher_probs` turns them into the `teacher_probs` column (the
one-hot label on rows without a teacher) that `lmsys_trl.trainer.ArenaSFTTrainer` turns into its soft-label loss.
`pair_with_swaps` follows every row by its A/B swap for swap-consistent training (`swap_pairs`); `PairedSampler`
keeps the pairs together when the trainer shuffles, and `SoftLabelCollator` carries each row's targets into its batch.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from datasets import Dataset, concatenate_datasets

from .data import TEACHER_COLUMNS, WINNER_COLUMNS, DataError, swap_row, teacher_probs


logger = logging.getLogger(__name__)
TEACHER_PROBS = "teacher_probs"


def read_teachers(path: str) -> dict[str, list[float]]:
    """{id: [p_a, p_b, p_tie]} from `scripts/eval.py`'s predictions.parquet (`winner_model_*` columns) or any
    CSV/Parquet with `id` and the teacher columns; every row is checked (finite, non-negative, sums to 1)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such teacher file")
    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, dtype={"id": str})
    for columns in (TEACHER_COLUMNS, WINNER_COLUMNS):
        if "id" in frame.columns and all(c in frame.columns for c in columns):
            break
    else:
        raise DataError(
            f"{path}: a teacher file needs `id` and {list(TEACHER_COLUMNS)} or {list(WINNER_COLUMNS)} "
            f"(scripts/eval.py's predictions.parquet); found {list(frame.columns)}"
        )
    teachers = {}
    for row_id, *values in frame[["id", *columns]].itertuples(index=False):
        probs = teacher_probs(values, f"{path}: row id {row_id}")
        if probs is None:
            raise DataError(f"{path}: row id {row_id}: teacher probabilities are missing")
        if str(row_id) in teachers:
            raise DataError(f"{path}: row id {row_id} appears twice")
        teachers[str(row_id)] = probs
    return teachers


def attach_teachers(dataset: Dataset, paths: list[str]) -> Dataset:
    """Set the teacher columns of `dataset` from teacher files joined on `id` (later files win).

    Rows without an entry keep the teacher of their own file, if any (else None: they train on their hard label).
    """
    teachers = {}
    for path in paths:
        teachers.update(read_teachers(path))
    matched = sum(row_id in teachers for row_id in dataset["id"])
    if not matched:
        raise DataError(f"{', '.join(paths)}: no teacher row matches an id of the training data")
    logger.info("Teacher probabilities for %d of %d rows from %s", matched, len(dataset), ", ".join(paths))
    own = [dataset[c] if c in dataset.column_names else [None] * len(dataset) for c in TEACHER_COLUMNS]
    columns = {c: [] for c in TEACHER_COLUMNS}
    for row_id, *values in zip(dataset["id"], *own):
        for column, value in zip(TEACHER_COLUMNS, teachers.get(row_id, values)):
            columns[column].append(value)
    kept = dataset.remove_columns([c for c in TEACHER_COLUMNS if c in dataset.column_names])
    for column, values in columns.items():
        kept = kept.add_column(column, values)
    return kept


def _target(example: dict) -> dict:
    if example["teacher_a"] is not None:
        return {TEACHER_PROBS: [example[c] for c in TEACHER_COLUMNS]}
    return {TEACHER_PROBS: [float(example["label"] == k) for k in range(3)]}


def with_teacher_probs(dataset: Dataset | None) -> Dataset | None:
    """Add the `teacher_probs` column (the teacher's three probabilities, or the one-hot label on rows without a
    teacher) when the rows carry teacher columns; otherwise return the dataset unchanged."""
    if dataset is None or "teacher_a" not in dataset.column_names:
        return dataset
    return dataset.map(_target, desc="Soft-label targets")


def pair_with_swaps(dataset: Dataset) -> Dataset:
    """Every row followed by its A/B swap (labels and teacher probabilities swapped too): rows 2k and 2k+1 pair."""
    swapped = dataset.map(swap_row, desc="A/B swap pairs")
    both = concatenate_datasets([dataset, swapped])
    n = len(dataset)
    return both.select([i + half * n for i in range(n) for half in (0, 1)])


@dataclass
class SoftLabelCollator:
    """Wraps TRL's collator: adds `teacher_probs` (batch, seq, 3), each row's probabilities on all its tokens."""

    collator: object

    def __call__(self, examples: list[dict]) -> dict:
        if TEACHER_PROBS not in examples[0]:
            return self.collator(examples)
        probs = [e[TEACHER_PROBS] for e in examples]
        batch = self.collator([{k: v for k, v in e.items() if k != TEACHER_PROBS} for e in examples])
        rows, width = batch["input_ids"].shape
        if rows == len(examples):  # padded: one row each
            batch[TEACHER_PROBS] = torch.tensor(probs, dtype=torch.float32)[:, None, :].expand(rows, width, 3)
            return batch
        per_token = [p for e, p in zip(examples, probs) for _ in e["input_ids"]]  # padding-free: rows in order
        per_token += [[0.0] * 3] * (width - len(per_token))
        batch[TEACHER_PROBS] = torch.tensor(per_token, dtype=torch.float32)[None]
        return batch


class PairedSampler(torch.utils.data.Sampler):
    """Shuffles pairs (2k, 2k+1) of a `pair_with_swaps` dataset, never splitting one (reshuffled each epoch)."""

    def __init__(self, num_rows: int, seed: int = 42):
        if num_rows % 2:
            raise ValueError(f"swap pairs need an even number of rows, got {num_rows}")
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_rows

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows // 2)
        for pair in order.tolist():
            yield 2 * pair
            yield 2 * pair + 1
