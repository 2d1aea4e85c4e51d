"""Files of a scoring run: atomic writes, the output-dir check and lock, the member-logit cache, the submission."""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re

import numpy as np


RESULT_FILES = ("metrics.json", "predictions.parquet", "submission.csv", "report.html")
PLOT_FILES = ("reliability.png", "confusion.png", "loss_by_length.png")  # report.html's plots (report.PLOTS)
CACHE_KEY = b"lmsys_trl.cache_key"
LOGIT_COLUMNS = ("logit_a", "logit_b", "logit_c")
LOCK_FILE = ".lock"
TMP_SUFFIX = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>[0-9]+)$")


def _umask() -> int:
    """The process umask, read without changing it where the kernel says it (/proc/self/status, Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path next to `path`; it replaces `path` only when the block finishes without error.

    The result gets the permissions a plain `open(path, "w")` would give it (0666 less the umask), whatever mode the
    writer gave the temporary file (safetensors writes 0600)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, payload: dict) -> None:
    """JSON written atomically; NaN / infinity (not JSON) are refused with a ValueError, leaving nothing."""
    text = json.dumps(payload, indent=2, allow_nan=False)
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def check_output_dir(out: str, overwrite: bool, members: bool = True) -> None:
    """Refuse an output dir that already holds results (unless `overwrite`) or cannot be written; create it (and,
    with `members`, its members/ cache folder)."""
    existing = [f for f in RESULT_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds results ({', '.join(existing)}); pass --overwrite true to replace them or choose "
            "another --out"
        )
    try:
        os.makedirs(os.path.join(out, "members") if members else out, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"{out}: cannot create the output dir ({err.strerror}); use another --out") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: the output directory is not writable; choose another --out")


def clear_results(out: str) -> list[str]:
    """Remove the result files of an earlier run from `out` (only those this project writes: RESULT_FILES and the
    report's plots), so a run's results are never mixed with another's; the member cache stays. Returns the paths."""
    removed = []
    for name in (*RESULT_FILES, *PLOT_FILES):
        path = os.path.join(out, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def clean_orphans(out: str) -> list[str]:
    """Remove `<file>.tmp-<pid>` files that a killed run of this project left in `out` and `out/members`: only names
    this project writes there (results, plots, member caches) and only when process <pid> is gone. Returns them."""
    removed = []
    for folder, ours in ((out, lambda n: n in RESULT_FILES or n in PLOT_FILES),
                         (os.path.join(out, "members"), lambda n: n.endswith(".parquet"))):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = TMP_SUFFIX.match(name)
            path = os.path.join(folder, name)
            if match and ours(match["name"]) and not _pid_alive(int(match["pid"])) and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


_HELD_LOCKS = set()  # descriptors of the output locks this process holds (see `release_inherited_locks`)


def release_inherited_locks() -> None:
    """In a forked child (e.g. a tokenisation worker): close the inherited descriptors of the parent's output locks. A
    `flock` lasts while any descriptor of it is open, so a worker outliving a killed parent would otherwise keep
    `out` locked against the `--resume` run; the parent's own descriptors stay open and locked."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


@contextlib.contextmanager
def output_lock(out: str):
    """Hold `out` for one run: an exclusive `flock` on `<out>/.lock`, released when the block ends (or the process
    dies). A second run into the same `out` is refused with a RuntimeError rather than mixing its files in."""
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise PermissionError(f"{out}: cannot create the lock file {LOCK_FILE} ({err.strerror}); use another --out")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(
                f"{out} is in use by another run (pid {holder}); wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD_LOCKS.add(fd)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock


def check_json(payload: dict, name: str) -> None:
    """`payload` must be valid JSON (no NaN / infinity) before any result is written."""
    try:
        json.dumps(payload, allow_nan=False)
    except ValueError:
        raise RuntimeError(f"{name} would hold a non-finite number (NaN or infinity); nothing was written") from None


def check_probabilities(probs) -> None:
    """The final probabilities must be finite, in [0, 1] and sum to 1 per row before anything is written."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 3:
        raise RuntimeError(f"the final probabilities have shape {probs.shape}, not (rows, 3)")
    rows = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if len(rows):
        raise RuntimeError(f"the final probabilities of {len(rows)} row(s) are not finite (first: row {rows[0]}); "
                           "a member's logits overflowed (try --precision fp32) or an option is out of range")
    rows = np.flatnonzero(((probs < 0) | (probs > 1)).any(axis=1))
    if len(rows):
        raise RuntimeError(f"the final probabilities of {len(rows)} row(s) are outside [0, 1] (first: row {rows[0]}: "
                           f"{probs[rows[0]].tolist()})")
    rows = np.flatnonzero(np.abs(probs.sum(axis=1) - 1) > 1e-6)
    if len(rows):
        raise RuntimeError(f"the final probabilities of {len(rows)} row(s) do not sum to 1 (first: row {rows[0]}: "
                           f"{probs[rows[0]].tolist()})")


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
