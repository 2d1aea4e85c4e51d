"""Tokenising throughput of `scripts/eval.py`'s rows: `scoring.encode_rows` (and the rows + their A/B swaps in one
`scoring.RowEncoding`, as swap TTA runs it) at 1 and K worker processes, in rows/s; optionally the same rows through
`datasets.Dataset.map(num_proc=K)` (own fingerprint, in memory), the library route `RowEncoding` was measured against.

    python benchmarks/make_rows.py --rows 25000 --out /tmp/rows25k.csv
    python benchmarks/tokenize_bench.py --data /tmp/rows25k.csv --workers 1 16 --results benchmarks/results.jsonl

Every route's token ids are checked equal to the plain loop's (workers 1). One JSON line per run (date, device, CPU
count, command, rows/s per worker count) is printed and, with --results, appended there (`"mode": "tokenize"`).
"""

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone

from lmsys_trl.data import load_arena
from lmsys_trl.members import rows_digest
from lmsys_trl.scoring import RowEncoding, encode_row, load_scoring_tokenizer


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def _map_row(row, tokenizer, max_length, swapped):
    return {"input_ids": encode_row(row, tokenizer, max_length, swapped)}


def map_encode(dataset, tokenizer, max_length: int, swapped: bool, workers: int) -> list[list[int]]:
    """The library route: `datasets.Dataset.map(num_proc=workers)` with a fingerprint of our own (the rows' digest,
    the tokenizer's name, max_length, the swap), so `datasets` never hashes the tokenizer, and no cache file."""
    key = json.dumps([rows_digest(dataset), tokenizer.name_or_path, max_length, swapped])
    mapped = dataset.map(
        _map_row, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "swapped": swapped},
        remove_columns=dataset.column_names, num_proc=workers if workers > 1 else None,
        new_fingerprint=hashlib.sha1(key.encode()).hexdigest()[:16], load_from_cache_file=False,
        keep_in_memory=True, desc="datasets.map",
    )
    return mapped["input_ids"]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def device_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[os.path.join(SHARED, "data", "lmsys_arena_sample100.csv")])
    parser.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "gemma-2"))
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=None, help="Only the first N rows.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--swap_tta", action="store_true", help="Also time rows + swapped rows in one RowEncoding.")
    parser.add_argument("--compare_map", action="store_true", help="Also time datasets.map(num_proc=K).")
    parser.add_argument("--results", default=None, help="Append the JSON line to this file.")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.workers):
        parser.error(f"--workers must be >= 1, got {args.workers}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = load_arena(args.data)
    if args.rows:
        data = data.select(range(min(args.rows, len(data))))
    reference, rates = None, {}
    for workers in sorted(set(args.workers)):
        # a freshly loaded tokenizer for every timed run: its word cache warms up (and forked workers inherit it)
        tokenizer = load_scoring_tokenizer(args.tokenizer)
        with RowEncoding(data, tokenizer, args.max_length, (False,), workers) as encoding:
            rows, seconds = timed(lambda: encoding.rows(False))
        reference = reference if reference is not None else rows
        assert rows == reference, f"{workers} workers: token ids differ from the first run's"
        rates[f"rows_per_s_{workers}"] = round(len(data) / seconds, 1)
        if args.swap_tta:
            tokenizer = load_scoring_tokenizer(args.tokenizer)

            def both():
                with RowEncoding(data, tokenizer, args.max_length, (True, False), workers) as encoding:
                    return encoding.rows(True), encoding.rows(False)

            (swapped, plain), seconds = timed(both)
            assert plain == reference
            rates[f"swap_tta_rows_per_s_{workers}"] = round(2 * len(data) / seconds, 1)
        if args.compare_map:
            tokenizer = load_scoring_tokenizer(args.tokenizer)
            mapped, seconds = timed(lambda: map_encode(data, tokenizer, args.max_length, False, workers))
            assert mapped == reference, f"datasets.map with {workers} workers: token ids differ"
            rates[f"map_rows_per_s_{workers}"] = round(len(data) / seconds, 1)
        print(json.dumps({"workers": workers, **{k: v for k, v in rates.items() if k.endswith(f"_{workers}")}}),
              file=sys.stderr)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "mode": "tokenize",
        "rows": len(data),
        "mean_tokens": round(sum(map(len, reference)) / len(reference), 1),
        "max_length": args.max_length,
        "tokenizer": os.path.basename(os.path.normpath(args.tokenizer)),
        **rates,
        "command": "python " + shlex.join(["benchmarks/tokenize_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        **({"note": args.note} if args.note else {}),
    }
    line = json.dumps(record)
    print(line)
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")
    return record


if __name__ == "__main__":
    main()
