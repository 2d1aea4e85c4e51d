"""Files of a scoring run: atomic writes, the output-dir check, the member-logit cache, the submission."""

import contextlib
import hashlib
import json
import os

import numpy as np


RESULT_FILES = ("metrics.json", "predictions.parquet", "submission.csv", "report.html")
CACHE_KEY = b"lmsys_trl.cache_key"
LOGIT_COLUMNS = ("logit_a", "logit_b", "logit_c")


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path next to `path`; it replaces `path` only when the block finishes without error."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, payload: dict) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)


def check_output_dir(out: str, overwrite: bool) -> None:
    """Refuse an output dir that already holds results (unless `overwrite`) or cannot be written."""
    existing = [f for f in RESULT_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds results ({', '.join(existing)}); pass --overwrite true to replace them or choose "
            "another --out"
        )
    try:
        os.makedirs(os.path.join(out, "members"), exist_ok=True)
    except OSError as err:
        raise PermissionError(f"{out}: cannot create the output dir ({err.strerror}); use another --out") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: the output directory is not writable; choose another --out")


def remove_results(out: str, names=("metrics.json", "report.html")) -> None:
    """Drop results of an earlier run that this one does not write (an unlabelled run replacing a labelled one)."""
    for name in names:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def cache_key(payload: dict) -> str:
    """A stable digest of everything that determines a member's logits."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def save_logits(path: str, key: str, ids: list[str], logits: np.ndarray) -> None:
    """Write (id, logit_a, logit_b, logit_c) atomically, with `key` in the Parquet schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(ids), **{c: logits[:, i] for i, c in enumerate(LOGIT_COLUMNS)}})
    table = table.replace_schema_metadata({CACHE_KEY: key.encode()})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def load_logits(path: str, key: str, ids: list[str]) -> np.ndarray | None:
    """Cached logits when `path` exists with the same key and row ids; otherwise None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if (table.schema.metadata or {}).get(CACHE_KEY, b"").decode() != key or table["id"].to_pylist() != list(ids):
        return None
    return np.stack([table[c].to_numpy() for c in LOGIT_COLUMNS], axis=1).astype(np.float64)


def write_predictions(path: str, ids, labels, member_probs: dict, probs, rules) -> None:
    """predictions.parquet: id, label, each member's A/B/C probabilities (<name>_a/b/c), the final probabilities
    (Kaggle's winner columns) and the post-processing rule of each row."""
    import pandas as pd

    from .data import WINNER_COLUMNS

    frame = pd.DataFrame({"id": list(ids), "label": labels})
    for name, p in member_probs.items():
        for i, letter in enumerate("abc"):
            frame[f"{name}_{letter}"] = p[:, i]
    for i, column in enumerate(WINNER_COLUMNS):
        frame[column] = probs[:, i]
    frame["post_process_rule"] = rules
    with atomic_output(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_submission(path: str, ids, probs) -> None:
    """Kaggle submission: id, winner_model_a, winner_model_b, winner_tie (rows in input order, each summing to 1)."""
    import pandas as pd

    from .data import WINNER_COLUMNS

    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"id": list(ids), **{c: probs[:, i] for i, c in enumerate(WINNER_COLUMNS)}})
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)
