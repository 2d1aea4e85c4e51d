"""Soft labels (teacher probabilities), swap-consistent training and pseudo-labels, inside TRL's `SFTTrainer`.

- Soft labels: rows may carry teacher probabilities (`teacher_a`, `teacher_b`, `teacher_tie` in the arena file, or
  `--teacher_files` = `predictions.parquet` of `scripts/eval.py`). They reach the collator as a per-token tensor
  `teacher_probs` (the row's three probabilities on each of its tokens, so it survives padding, packing and the fast
  path's micro-batch split). `DistillTrainerMixin.compute_loss` reads the hidden state of each answer position from the
  same forward that TRL's fused LM head runs (a forward hook on the backbone), projects it onto the A/B/C rows of the
  LM head and adds the cross-entropy to the teacher distribution:
  `loss = (1 - soft_label_weight) * hard + soft_label_weight * soft`, every row weighted by its answer tokens as in the
  hard loss (so gradient accumulation and micro-batches keep the same scale).
- Swap-consistent training (`swap_pairs`): each row is followed by its A/B swap and a sampler shuffles the pairs, so
  both orders always share an optimisation step; `symmetry_weight` adds a symmetric KL between p(x) and the swapped
  row's probabilities mapped back to A/B (needs both rows in one micro-batch).
- Pseudo-labels: `scripts/eval.py`'s predictions + the scored file -> a training file with teacher columns.
"""

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets

from .data import (
    KAGGLE_COLUMNS,
    TEACHER_COLUMNS,
    WINNER_COLUMNS,
    DataError,
    load_arena,
    swap_row,
    teacher_probs,
)


logger = logging.getLogger(__name__)
TEACHER_PROBS = "teacher_probs"
SWAP_BACK = [1, 0, 2]  # A/B/C probabilities of a swapped row, reordered to the original A/B


# ----------------------------------------------------------------------------------------------- teacher data


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


# ----------------------------------------------------------------------------------------------- trainer side


@dataclass
class DistillConfig:
    """Recipe keys of soft-label and swap-consistent training (mixed into `FastSFTConfig`)."""

    soft_label_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the cross-entropy to the teacher's A/B/C probabilities (1 - it: the hard label "
                          "loss). Needs teacher columns in the data or --teacher_files."},
    )
    swap_pairs: bool = field(
        default=False,
        metadata={"help": "Train every row together with its A/B swap, in the same optimisation step (replaces "
                          "swap_augment; rows per step must be even)."},
    )
    symmetry_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of a symmetric KL between p(A,B,C|x) and p(B,A,C|swap(x)); needs swap_pairs, an "
                          "even per_device_train_batch_size and no pack_token_budget (a pair shares a micro-batch)."},
    )

    def __post_init__(self):
        if not 0.0 <= self.soft_label_weight <= 1.0:
            raise ValueError(f"soft_label_weight must be in [0, 1], got {self.soft_label_weight}")
        if self.symmetry_weight < 0:
            raise ValueError(f"symmetry_weight must be >= 0, got {self.symmetry_weight}")
        batch, steps = self.per_device_train_batch_size, self.gradient_accumulation_steps
        if self.swap_pairs and batch * steps % 2:
            raise ValueError(
                "swap_pairs needs an even number of rows per optimisation step (per_device_train_batch_size x "
                f"gradient_accumulation_steps = {batch} x {steps})"
            )
        if self.symmetry_weight > 0:
            if not self.swap_pairs or batch % 2:
                raise ValueError("symmetry_weight needs swap_pairs: true and an even per_device_train_batch_size")
            if getattr(self, "pack_token_budget", None) is not None:
                raise ValueError("symmetry_weight needs padded batches: packing can split a pair over micro-batches")
        if (self.swap_pairs or self.soft_label_weight) and getattr(self, "packing", False):
            raise ValueError("soft labels / swap pairs need whole rows: use pack_token_budget, not TRL's packing")
        super().__post_init__()


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


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of each answer: the last prompt token, whose next token starts a completion."""
    starts = (labels[:, 1:] != -100) & (labels[:, :-1] == -100)
    return starts.nonzero(as_tuple=True)


def soft_label_loss(letter_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy between target distributions (rows, 3) and softmax(letter logits) (rows, 3)."""
    return -(targets * F.log_softmax(letter_logits.float(), dim=-1)).sum(-1)


def symmetry_penalty(letter_logits: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric KL / 2 between p(row 2k) and p(row 2k+1) with its A and B exchanged back."""
    if len(letter_logits) % 2:
        raise ValueError(f"symmetry penalty needs whole swap pairs in a micro-batch, got {len(letter_logits)} rows")
    log_p = F.log_softmax(letter_logits.float(), dim=-1)
    original, swapped = log_p[0::2], log_p[1::2][:, SWAP_BACK]
    return 0.5 * ((original.exp() - swapped.exp()) * (original - swapped)).sum(-1)


def causal_lm_of(model):
    """The transformers causal LM inside DDP / PEFT wrappers (the module whose `base_model` is the backbone)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def letter_logits_from_hidden(causal_lm, hidden: torch.Tensor, letter_ids: list[int],
                              fp32_head: bool = False) -> torch.Tensor:
    """(rows, 3) A/B/C logits from final hidden states (rows, hidden), final softcap included.

    Training calls the head module (its weight may be sharded outside forward: ZeRO-3). Scoring asks `fp32_head`: the
    head's three letter rows in fp32, exact and cheaper than the vocabulary, where the head itself rounds each logit
    to the model dtype (bf16: steps of 0.125 where |logit| is 16 to 32, up to ~3e-2 of probability)."""
    head = causal_lm.get_output_embeddings()
    if fp32_head and type(head) is torch.nn.Linear:  # an adapted or quantised head runs its own forward
        logits = hidden.float() @ head.weight[letter_ids].float().T
        if head.bias is not None:
            logits = logits + head.bias[letter_ids].float()
    else:
        logits = head(hidden)[:, letter_ids].float()
    cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


class DistillTrainerMixin:
    """`SFTTrainer` mixin: soft-label loss, symmetry penalty and the swap-pair sampler (all TRL extension points:
    `compute_loss`, `_set_signature_columns_if_needed`, `_get_train_sampler`, the data collator)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .model import letter_token_ids

        self.letter_ids = letter_token_ids(self.processing_class)
        soft = self.train_dataset is not None and TEACHER_PROBS in self.train_dataset.column_names
        if getattr(self.args, "soft_label_weight", 0.0) > 0 and not soft:
            raise ValueError(
                "soft_label_weight > 0 needs teacher probabilities: teacher_a/teacher_b/teacher_tie columns in the "
                "train files or --teacher_files (e.g. a predictions.parquet of scripts/eval.py)"
            )
        if soft:
            self.data_collator = SoftLabelCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TEACHER_PROBS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TEACHER_PROBS]

    def _get_train_sampler(self, train_dataset=None):
        if not getattr(self.args, "swap_pairs", False):
            return super()._get_train_sampler(train_dataset)
        ids = self.train_dataset["id"]
        if len(ids) % 2 or ids[0::2] != ids[1::2]:
            raise ValueError("swap_pairs: the training rows are not (row, swapped row) pairs; build them with "
                             "lmsys_trl.distill.pair_with_swaps (run_sft does when swap_pairs is true)")
        return PairedSampler(len(ids), self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.pop(TEACHER_PROBS, None)
        symmetric = self.model.training and getattr(self.args, "symmetry_weight", 0.0) > 0
        if targets is None and not symmetric:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        causal_lm = causal_lm_of(self.accelerator.unwrap_model(model))
        hidden = []

        def keep_first(module, args, output):
            if not hidden:
                hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = causal_lm.base_model.register_forward_hook(keep_first)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        labels = inputs["labels"]
        rows, positions = answer_positions(labels)
        answers = labels[rows, positions + 1]
        if not torch.isin(answers, torch.tensor(self.letter_ids, device=answers.device)).all():
            raise RuntimeError(f"answer tokens {answers.tolist()} are not the letters A/B/C {self.letter_ids}")
        logits = letter_logits_from_hidden(causal_lm, hidden[0][rows, positions], self.letter_ids)
        # Each row counts like its answer tokens in the hard loss: sum over rows x tokens per row / all answer tokens.
        answer_tokens = (labels[:, 1:] != -100).sum()
        total = answer_tokens if num_items_in_batch is None else num_items_in_batch
        scale = answer_tokens / max(len(rows), 1) / torch.as_tensor(total).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = scale * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if self.model.training else "eval"
        if targets is not None:
            weight = getattr(self.args, "soft_label_weight", 0.0)
            soft = soft_label_loss(logits, targets[rows, positions].to(logits.device))
            loss = (1 - weight) * loss + weight * soft.sum() * scale
            self._metrics[mode]["soft_label_loss"].append(soft.mean().item())
        if symmetric:
            penalty = symmetry_penalty(logits)
            loss = loss + self.args.symmetry_weight * 2 * penalty.sum() * scale
            self._metrics[mode]["symmetry_penalty"].append(penalty.mean().item())
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------- pseudo-labels


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


def write_pseudo_labels(predictions_path: str, data_paths: list[str], out_path: str, include_labelled: bool = False,
                        min_confidence: float = 0.0) -> pd.DataFrame:
    """Read predictions + the scored data, write the pseudo-labelled training file (.csv or .parquet) atomically."""
    from .ensemble import atomic_output

    if not os.path.isfile(predictions_path):
        raise DataError(f"{predictions_path}: no such predictions file (scripts/eval.py writes predictions.parquet)")
    if not out_path.endswith((".csv", ".parquet")):
        raise ValueError(f"{out_path}: the pseudo-label file must end in .csv or .parquet")
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
