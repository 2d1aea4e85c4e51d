"""Load arena rows (Kaggle `train.csv`/`test.csv` or the extra arena-conversations set), validate, split, augment."""

import hashlib
import json
import math
import numbers
import os
import random
from collections.abc import Sequence

import pandas as pd
from datasets import Dataset, concatenate_datasets


LETTERS = ("A", "B", "C")
KAGGLE_COLUMNS = ("id", "prompt", "response_a", "response_b")
WINNER_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
EXTRA_COLUMNS = ("question_id", "winner", "conversation_a", "conversation_b")
EXTRA_WINNERS = {"model_a": 0, "model_b": 1, "tie": 2, "tie (bothbad)": 2}
COLUMNS = ("id", "prompt", "response_a", "response_b", "label")
# Optional soft labels (teacher probabilities of A wins / B wins / tie), kept by `load_arena` when a file has them.
TEACHER_COLUMNS = ("teacher_a", "teacher_b", "teacher_tie")


class DataError(ValueError):
    """Bad input data; the message names the file and the row id."""


def _read_table(path: str) -> pd.DataFrame:
    """Read CSV / JSON / JSONL / Parquet into a DataFrame, keeping every cell as written.

    JSON, JSONL and Parquet cells keep their Python values (an object column each), so a null in an integer column
    never turns the other cells into floats (`136060` -> `136060.0`); CSV cells are all text.
    """
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give a data file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    ext = path.lower().rsplit(".", 1)[-1]
    try:
        if ext == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
        if ext in ("jsonl", "ndjson"):
            return _records_frame(_jsonl_records(path), path)
        if ext == "json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
                return pd.DataFrame(data, dtype=object)  # pandas' default `to_json` layout: {column: {index: v}}
            return _records_frame(data, path)
        if ext == "parquet":
            import pyarrow.parquet as pq

            return _records_frame(pq.read_table(path).to_pylist(), path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: {_first_bad_utf8(path)}; re-save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; give a file with a header and at least one row") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno} ({err.msg})") from None
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot be parsed as {ext}: {' '.join(str(err).split())}") from None
    raise DataError(f"{path}: unsupported file type '.{ext}' (use .csv, .json, .jsonl or .parquet)")


def _jsonl_records(path: str) -> list:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    if not records:
        raise DataError(f"{path}: the file is empty; give a file with at least one row")
    return records


def _records_frame(records, path: str) -> pd.DataFrame:
    """A list of JSON objects as a DataFrame of object columns (values as parsed; a key a row lacks is None)."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected one JSON object per row (a list of objects, or one per line)")
    columns = list(dict.fromkeys(k for r in records for k in r))
    return pd.DataFrame({c: [r.get(c) for r in records] for c in columns}, columns=columns, dtype=object)


def _first_bad_utf8(path: str) -> str:
    """Where the first non-UTF-8 byte is, as 'line N (byte offset B)'."""
    data = open(path, "rb").read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"not UTF-8 text at line {line} (byte offset {err.start})"
    return "not UTF-8 text"


def _turns(cell, path: str, row_id: str, column: str) -> list:
    """A JSON list cell (string or already-parsed list) as a Python list."""
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: row id {row_id}: column '{column}' is not valid JSON ({err.msg})") from None
    elif hasattr(cell, "tolist"):  # numpy arrays from Parquet
        cell = cell.tolist()
    if not isinstance(cell, list) or not cell:
        raise DataError(f"{path}: row id {row_id}: column '{column}' must be a non-empty JSON list of turns")
    return cell


def _text(value) -> str:
    """A turn as text: null / empty becomes the literal 'None' (as the reference does)."""
    if value is None or value == "":
        return "None"
    if isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _check_columns(df: pd.DataFrame, required: Sequence[str], path: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}; found {list(df.columns)}")


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value)
    )


def _row_id(record: dict, column: str, path: str, number: int) -> str:
    """A row's id as text, exactly as written (an integer stays an integer: never `136060.0`); empty is an error."""
    value = record.get(column)
    if _missing(value):
        raise DataError(f"{path}: row {number}: the id is empty or missing (column '{column}'); every row needs an id")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an integer column that pandas stored as doubles (it had a null): the id as written
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise DataError(f"{path}: row {number}: the id {value!r} must be text or an integer")
    return str(value)


def _as_written(value) -> str:
    return "an empty cell" if _missing(value) else repr(value.item() if hasattr(value, "item") else value)


def _winner_flag(value, path: str, row_id: str, column: str) -> int:
    """A winner cell as 0 or 1: accepts 0/1, booleans, 0.0/1.0 and their text spellings ("1", "1.0", "true")."""
    if isinstance(value, str):
        text = value.strip().lower()
        flag = {"true": 1, "false": 0}.get(text)
        if flag is None:
            try:
                number = float(text)
            except ValueError:
                number = None
            flag = int(number) if number in (0.0, 1.0) else None
    elif isinstance(value, (bool, numbers.Real)) and not _missing(value):
        flag = int(value) if value in (0, 1) else None
    else:
        flag = None
    if flag is None:
        raise DataError(f"{path}: row id {row_id}: {column} is {_as_written(value)}; winner columns must be 0 or 1")
    return flag


def teacher_probs(values, where: str) -> list[float] | None:
    """Three teacher probabilities (A, B, tie) checked: finite, non-negative, summing to 1 (+-1e-3); all three
    missing -> None (the row has no teacher). `where` ("file: row id X") prefixes the `DataError`."""
    if all(_missing(v) for v in values):
        return None
    try:
        probs = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"{where}: {list(TEACHER_COLUMNS)} must be numbers, got {list(values)}") from None
    if not all(math.isfinite(p) for p in probs):
        raise DataError(f"{where}: {list(TEACHER_COLUMNS)} must be finite (all three given), got {probs}")
    if min(probs) < 0 or abs(sum(probs) - 1) > 1e-3:
        raise DataError(f"{where}: {list(TEACHER_COLUMNS)} must be non-negative and sum to 1, got {probs}")
    return probs


def _teacher_columns(rows: list[dict], records: list[dict], path: str, has_teacher: bool) -> None:
    """Add the teacher columns (None when the file or the row has none) to parsed rows, in place."""
    for row, record in zip(rows, records):
        probs = None
        if has_teacher:
            probs = teacher_probs([record[c] for c in TEACHER_COLUMNS], f"{path}: row id {row['id']}")
        row.update(zip(TEACHER_COLUMNS, probs or (None,) * 3))


def _kaggle_rows(df: pd.DataFrame, path: str) -> list[dict]:
    _check_columns(df, KAGGLE_COLUMNS, path)
    labelled = any(c in df.columns for c in WINNER_COLUMNS)
    if labelled:
        _check_columns(df, WINNER_COLUMNS, path)
    rows = []
    for number, record in enumerate(df.to_dict("records"), start=1):
        row_id = _row_id(record, "id", path, number)
        turns = {c: [_text(t) for t in _turns(record[c], path, row_id, c)] for c in KAGGLE_COLUMNS[1:]}
        lengths = {c: len(v) for c, v in turns.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(
                f"{path}: row id {row_id}: unequal turn counts {lengths}; each turn needs a prompt and two responses"
            )
        label = -1
        if labelled:
            flags = [_winner_flag(record[c], path, row_id, c) for c in WINNER_COLUMNS]
            if sorted(flags) != [0, 0, 1]:
                raise DataError(
                    f"{path}: row id {row_id}: exactly one of {list(WINNER_COLUMNS)} must be 1, got {flags}"
                )
            label = flags.index(1)
        rows.append({"id": row_id, **turns, "label": label})
    return rows


def _extra_rows(df: pd.DataFrame, path: str) -> list[dict]:
    """Rows of the arena-conversations schema: conversations are lists of {role, content} messages."""
    _check_columns(df, EXTRA_COLUMNS, path)
    rows = []
    for number, record in enumerate(df.to_dict("records"), start=1):
        row_id = _row_id(record, "question_id", path, number)
        winner = record["winner"]
        if not isinstance(winner, str) or winner not in EXTRA_WINNERS:
            raise DataError(
                f"{path}: row id {row_id}: winner {_as_written(winner)} is not one of {sorted(EXTRA_WINNERS)}"
            )
        sides = {}
        for side in ("a", "b"):
            column = f"conversation_{side}"
            messages = _turns(record[column], path, row_id, column)
            try:
                sides[side] = {
                    role: [_text(m["content"]) for m in messages if m["role"] == role]
                    for role in ("user", "assistant")
                }
            except (TypeError, KeyError):
                raise DataError(f"{path}: row id {row_id}: '{column}' must hold {{role, content}} messages") from None
        prompt = sides["a"]["user"]
        if not (len(prompt) == len(sides["a"]["assistant"]) == len(sides["b"]["assistant"]) > 0):
            counts = {s: len(v["assistant"]) for s, v in sides.items()}
            raise DataError(
                f"{path}: row id {row_id}: unequal turn counts (prompts {len(prompt)}, responses {counts})"
            )
        rows.append(
            {
                "id": row_id,
                "prompt": prompt,
                "response_a": sides["a"]["assistant"],
                "response_b": sides["b"]["assistant"],
                "label": EXTRA_WINNERS[winner],
            }
        )
    return rows


def group_key(row: dict) -> str:
    """Rows with the same prompt and the same pair of responses (either order) share a key."""
    responses = sorted([json.dumps(row["response_a"]), json.dumps(row["response_b"])])
    payload = json.dumps([row["prompt"], *responses], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def load_arena(paths: str | Sequence[str]) -> Dataset:
    """Load and validate arena rows from one or more files into a `datasets.Dataset`.

    Columns: `id` (str), `prompt`, `response_a`, `response_b` (lists of turn strings; null/empty -> "None") and
    `label` (0 = A, 1 = B, 2 = tie, -1 = unlabelled), plus `teacher_a`, `teacher_b`, `teacher_tie` (soft labels,
    None on rows without) when a file has those columns. Kaggle-schema files come first; rows of the extra
    arena-conversations schema that repeat a Kaggle row (same prompt and responses) are dropped.
    Raises `DataError` naming the file and row id on bad input.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise DataError("no data files given")
    kaggle, extra = [], []
    for path in map(str, paths):
        df = _read_table(path)
        if len(df) == 0:
            raise DataError(f"{path}: the file has no rows")
        is_extra = "conversation_a" in df.columns or "question_id" in df.columns
        parsed = _extra_rows(df, path) if is_extra else _kaggle_rows(df, path)
        present = [c for c in TEACHER_COLUMNS if c in df.columns]
        if present and len(present) < len(TEACHER_COLUMNS):
            missing = [c for c in TEACHER_COLUMNS if c not in present]
            raise DataError(f"{path}: teacher column(s) {present} without {missing}; give all three or none")
        _teacher_columns(parsed, df.to_dict("records"), path, bool(present))
        (extra if is_extra else kaggle).extend(parsed)
    seen = {group_key(r) for r in kaggle}
    rows = kaggle + [r for r in extra if group_key(r) not in seen]
    if not rows:
        raise DataError(f"{', '.join(paths)}: no rows left after removing duplicates of the Kaggle rows")
    ids = [r["id"] for r in rows]
    duplicated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if duplicated:
        raise DataError(f"{', '.join(paths)}: duplicate row id(s) {duplicated[:5]}; ids must be unique")
    columns = COLUMNS + (TEACHER_COLUMNS if any(r["teacher_a"] is not None for r in rows) else ())
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})


def split_train_val(dataset: Dataset, val_fraction: float = 0.2, seed: int = 42, fold: int = 0) -> tuple:
    """Grouped split: the groups of `group_key` are dealt into round(1 / val_fraction) folds; `fold` is validation.

    Identical prompt+responses never straddle train and validation. Returns (train, val).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    num_folds = max(2, round(1 / val_fraction))
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}) for val_fraction={val_fraction}, got {fold}")
    keys = [group_key(row) for row in dataset]
    groups = sorted(set(keys))
    random.Random(seed).shuffle(groups)
    fold_of = {g: i % num_folds for i, g in enumerate(groups)}
    val_idx = [i for i, k in enumerate(keys) if fold_of[k] == fold]
    train_idx = [i for i, k in enumerate(keys) if fold_of[k] != fold]
    return dataset.select(train_idx), dataset.select(val_idx)


def swap_row(row: dict) -> dict:
    """Exchange responses A and B; labels and teacher probabilities A <-> B, tie stays (unlabelled stays -1)."""
    label = {0: 1, 1: 0}.get(row["label"], row["label"])
    swapped = {**row, "response_a": row["response_b"], "response_b": row["response_a"], "label": label}
    if "teacher_a" in row:
        swapped.update(teacher_a=row["teacher_b"], teacher_b=row["teacher_a"])
    return swapped


def swap_augment(dataset: Dataset, amount: float, seed: int = 42) -> Dataset:
    """Append A/B-swapped copies of `amount` rows (an int count, or a fraction when < 1) to a training set."""
    count = int(round(amount * len(dataset))) if 0 < amount < 1 else int(amount)
    if count <= 0:
        return dataset
    count = min(count, len(dataset))
    picked = sorted(random.Random(seed).sample(range(len(dataset)), count))
    swapped = dataset.select(picked).map(swap_row, desc="A/B swap augmentation")
    return concatenate_datasets([dataset, swapped])
