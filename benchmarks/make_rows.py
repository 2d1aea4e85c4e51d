"""A big arena CSV for timing: the rows of shared arena files repeated, each copy under a new unique string id.

    python benchmarks/make_rows.py --rows 25000 --out /tmp/rows25k.csv
    python benchmarks/make_rows.py --rows 50000 --out /tmp/rows50k.csv --source ../shared/data/pandalm_test.csv

Copies keep every column as written (Kaggle schema); only `id` changes (`<copy>-<original id>`), so the file passes
`lmsys_trl.data.load_arena` (ids unique). Written atomically (`io.atomic_output`); never into the repository.
"""

import argparse
import os

import pandas as pd

from lmsys_trl.io import atomic_output


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(os.path.dirname(REPO), "shared", "data", "lmsys_arena_sample100.csv")


def repeated_rows(sources: list[str], rows: int) -> pd.DataFrame:
    """The first `rows` rows of the sources concatenated and repeated, ids made unique per copy."""
    table = pd.concat([pd.read_csv(path, dtype=str, keep_default_na=False) for path in sources], ignore_index=True)
    if not len(table):
        raise ValueError(f"{', '.join(sources)}: no rows")
    copies = -(-rows // len(table))
    out = pd.concat([table.assign(id=[f"{c}-{i}" for i in table["id"]]) for c in range(copies)], ignore_index=True)
    return out.iloc[:rows]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25000, help="Rows to write (>= 1).")
    parser.add_argument("--out", required=True, help="Output CSV path (outside the repository).")
    parser.add_argument("--source", nargs="+", default=[DEFAULT_SOURCE], help="Arena CSVs (Kaggle schema) to repeat.")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    out = os.path.abspath(args.out)
    if out == REPO or out.startswith(REPO + os.sep):
        parser.error(f"--out {args.out} is inside the repository; write it elsewhere (e.g. /tmp)")
    table = repeated_rows(args.source, args.rows)
    with atomic_output(out) as tmp:
        table.to_csv(tmp, index=False)
    print(f"Wrote {out} ({len(table)} rows from {', '.join(args.source)})")
    return out


if __name__ == "__main__":
    main()
