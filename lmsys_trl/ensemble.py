"""Ensembles of scored members: Parquet cache of letter logits, weight and temperature fitting, post-processing."""

import contextlib
import hashlib
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .metrics import log_loss


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


def cache_key(payload: dict) -> str:
    """A stable digest of everything that determines a member's logits."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def save_logits(path: str, key: str, ids: list[str], logits: np.ndarray) -> None:
    """Write (id, logit_a, logit_b, logit_c) atomically, with `key` in the Parquet schema metadata."""
    table = pa.table({"id": list(ids), **{c: logits[:, i] for i, c in enumerate(LOGIT_COLUMNS)}})
    table = table.replace_schema_metadata({CACHE_KEY: key.encode()})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def load_logits(path: str, key: str, ids: list[str]) -> np.ndarray | None:
    """Cached logits when `path` exists with the same key and row ids; otherwise None."""
    if not os.path.isfile(path):
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if (table.schema.metadata or {}).get(CACHE_KEY, b"").decode() != key or table["id"].to_pylist() != list(ids):
        return None
    return np.stack([table[c].to_numpy() for c in LOGIT_COLUMNS], axis=1).astype(np.float64)


def combine(member_probs, weights) -> np.ndarray:
    """Weighted average of (N, 3) probability arrays."""
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights, np.stack(member_probs), axes=1)


def fit_weights(member_probs, labels, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Mixture weights (non-negative, sum 1) minimising the log loss of the weighted average.

    EM for mixture proportions: the objective is convex in the weights and every step keeps them on the simplex.
    """
    labels = np.asarray(labels)
    # p[m, i]: member m's probability of row i's true class
    p = np.stack([np.asarray(m)[np.arange(len(labels)), labels] for m in member_probs]).clip(1e-15)
    weights = np.full(len(p), 1.0 / len(p))
    for _ in range(max_iter):
        responsibility = weights[:, None] * p
        updated = (responsibility / responsibility.sum(axis=0, keepdims=True)).mean(axis=1)
        if np.abs(updated - weights).max() < tol:
            return updated
        weights = updated
    return weights


def minimise_scalar(f, low: float, high: float, tol: float = 1e-5) -> float:
    """Golden-section search for the minimum of a unimodal `f` on [low, high]."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(probs_at, labels, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T minimising log loss of `probs_at(T)` (searched on log T over [low, high])."""
    log_t = minimise_scalar(lambda x: log_loss(probs_at(math.exp(x)), labels), math.log(low), math.log(high))
    return math.exp(log_t)


def is_empty_response(turns) -> bool:
    """Every turn of a response is null/empty (the loader writes those as the text 'None') or whitespace."""
    return all(t.strip() in ("", "None") for t in turns)


def post_process(probs, response_a, response_b, empty_shift: float = 0.5, identical_shift: float = 0.5):
    """Move probability for rows with an empty or duplicated response; returns (new probs, per-row rule).

    A side whose response is empty gives `empty_shift` of its probability to the other side; identical responses
    (both empty included) give `identical_shift` of P(A) + P(B) to the tie. Rules: "", "empty_a", "empty_b",
    "identical".
    """
    probs = np.array(probs, dtype=np.float64)
    rules = []
    for i, (a, b) in enumerate(zip(response_a, response_b)):
        empty_a, empty_b = is_empty_response(a), is_empty_response(b)
        if list(a) == list(b) or (empty_a and empty_b):
            moved = identical_shift * probs[i, :2]
            probs[i, :2] -= moved
            probs[i, 2] += moved.sum()
            rules.append("identical")
        elif empty_a or empty_b:
            src, dst = (0, 1) if empty_a else (1, 0)
            moved = empty_shift * probs[i, src]
            probs[i, src] -= moved
            probs[i, dst] += moved
            rules.append("empty_a" if empty_a else "empty_b")
        else:
            rules.append("")
    return probs, rules
