"""Tokenising eval rows in worker processes (`scoring.RowEncoding`, issue 17): the same token ids as the plain loop,
in input order, swap TTA's two passes from one pool, row errors as one line naming the row, and when a pool is used.

The pool threshold (`MIN_POOL_ROWS`) and chunk size are lowered here, so a few dozen real rows take the pool path in
several chunks on the CPU test machine."""

import importlib.util

import numpy as np
import pandas as pd
import pytest

import lmsys_trl.scoring as scoring
from lmsys_trl.data import load_arena
from lmsys_trl.formatting import BudgetError
from lmsys_trl.model import load_tokenizer
from lmsys_trl.scoring import RowEncoding, encode_row, encode_rows, encoding_workers

from conftest import ARENA_SAMPLE, PANDALM, REPO, TOKENIZERS


MAX_LENGTH = 512  # long arena rows are cut (the budget loop runs), short PANDALM rows fit whole


@pytest.fixture(scope="module")
def gemma():
    return load_tokenizer(str(TOKENIZERS / "gemma-2"))


@pytest.fixture(scope="module")
def real_rows():
    """Real rows of both shared files, long and short interleaved: 15 arena rows + 15 PANDALM rows."""
    from datasets import concatenate_datasets

    arena = load_arena(str(ARENA_SAMPLE)).select(range(15))
    pandalm = load_arena(str(PANDALM)).select(range(0, 150, 10))
    both = concatenate_datasets([arena, pandalm])
    return both.select([i for pair in zip(range(15), range(15, 30)) for i in pair])


@pytest.fixture
def small_pool(monkeypatch):
    """Pool for any input size, 4 rows per task (30 rows: 8 chunks per pass over 2 processes)."""
    monkeypatch.setattr(scoring, "MIN_POOL_ROWS", 0)
    monkeypatch.setattr(scoring, "CHUNK_ROWS", 4)


def plain_loop(dataset, tokenizer, swapped):
    """Today's single-process output, written out: format_example + chat_token_ids row by row."""
    from lmsys_trl.data import swap_row
    from lmsys_trl.formatting import chat_token_ids, format_example

    return [chat_token_ids(tokenizer, format_example(swap_row(r) if swapped else r, tokenizer, MAX_LENGTH, "infer"))
            for r in dataset]


@pytest.mark.parametrize("swapped", [False, True])
def test_pool_gives_the_plain_loops_token_ids_in_input_order(gemma, real_rows, small_pool, swapped):
    expected = plain_loop(real_rows, gemma, swapped)
    assert max(map(len, expected)) > 400 > min(map(len, expected))  # cut rows and whole rows
    with RowEncoding(real_rows, gemma, MAX_LENGTH, (swapped,), workers=2) as encoding:
        assert encoding.workers == 2 and encoding._pool is not None  # the pool path ran
        pooled = encoding.rows(swapped)
    assert pooled == expected
    assert encode_rows(real_rows, gemma, MAX_LENGTH, swapped, workers=1) == expected
    reversed_rows = real_rows.select(range(len(real_rows) - 1, -1, -1))
    assert encode_rows(reversed_rows, gemma, MAX_LENGTH, swapped, workers=2) == expected[::-1]


def test_swap_tta_passes_come_from_one_pool(gemma, real_rows, small_pool):
    """The swapped pass first (as `members.score_members` asks), the plain pass from the same pool after it."""
    with RowEncoding(real_rows, gemma, MAX_LENGTH, (True, False), workers=2) as encoding:
        pool = encoding._pool
        swapped = encoding.rows(True)
        assert encoding._pool is pool and False in encoding._futures  # the second pass is still the pool's
        plain = encoding.rows(False)
        assert encoding._pool is None  # every pass collected: shut down
    assert swapped == plain_loop(real_rows, gemma, True) and plain == plain_loop(real_rows, gemma, False)


def test_workers_and_the_small_input_threshold(monkeypatch):
    monkeypatch.setattr(scoring, "default_workers", lambda: 16)
    assert encoding_workers(scoring.MIN_POOL_ROWS - 1, 8) == 1  # small inputs: the plain loop
    assert encoding_workers(scoring.MIN_POOL_ROWS, 1) == 1
    assert encoding_workers(25_000, 8) == 8
    assert encoding_workers(25_000, None) == 16
    assert encoding_workers(scoring.MIN_POOL_ROWS, 64) == -(-scoring.MIN_POOL_ROWS // scoring.CHUNK_ROWS)
    with pytest.raises(ValueError, match="tokenize_workers must be >= 1, got 0"):
        encoding_workers(25_000, 0)
    monkeypatch.undo()
    assert 1 <= scoring.default_workers() <= scoring.MAX_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # processes of one `accelerate launch` share the host's CPUs
    assert scoring.default_workers() == 1


def one_line_error(capsys, fn) -> str:
    from lmsys_trl.configs import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(lambda argv: fn())
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr and len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_row_errors_are_one_line_naming_the_row(gemma, real_rows, small_pool, capsys, monkeypatch, workers):
    """A checked error of one row (here a BudgetError of row 7, a TemplateError of row 12) stops the run as a
    single `error:` line naming the row's id, from the plain loop and from a worker alike."""
    bad = real_rows[7]["id"]
    real = scoring.format_example

    def refusing(row, *args):
        if row["id"] == bad:
            raise BudgetError("max_length=512 cannot hold one turn of this row")
        return real(row, *args)

    monkeypatch.setattr(scoring, "format_example", refusing)  # forked workers inherit it
    line = one_line_error(capsys, lambda: encode_rows(real_rows, gemma, MAX_LENGTH, workers=workers))
    assert line == f"error: row {bad!r}: max_length=512 cannot hold one turn of this row"
    line = one_line_error(capsys, lambda: encode_rows(real_rows, gemma, MAX_LENGTH, True, workers=workers))
    assert line.startswith(f"error: row {bad!r} (A/B swapped): max_length=512")
    monkeypatch.setattr(scoring, "format_example", real)

    template = gemma.chat_template
    forbidden = real_rows[12]["id"]
    rows = real_rows.map(lambda r: {"response_a": ["FORBIDDEN"] * len(r["response_a"])} if r["id"] == forbidden
                         else {})
    gemma.chat_template = ("{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
                           "{{ raise_exception('no FORBIDDEN here') }}{% endif %}{% endfor %}" + template)
    try:
        line = one_line_error(capsys, lambda: encode_rows(rows, gemma, MAX_LENGTH, workers=workers))
    finally:
        gemma.chat_template = template
    assert line.startswith(f"error: row {forbidden!r}: ") and "no FORBIDDEN here" in line


def test_a_max_length_too_small_for_any_row_is_refused_once(gemma, real_rows, small_pool, capsys):
    """Not a row's fault: the one BudgetError of today, before any worker starts, naming no row."""
    line = one_line_error(capsys, lambda: encode_rows(real_rows, gemma, 20, workers=2))
    assert "max_length=20 cannot hold one turn" in line and "row" not in line.split("cannot hold one turn")[0]
    with pytest.raises(BudgetError):
        encode_row(real_rows[0], gemma, 20)


@pytest.mark.slow
def test_eval_swap_tta_tokenises_both_passes_in_one_pool(tiny_llama, tmp_path, small_pool, monkeypatch):
    """scripts/eval.py with --swap_tta: one RowEncoding of both passes (swapped first) per member and dataset, and
    the same predictions as --tokenize_workers 1; the cached logits are reused by the next run, no pool started."""
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "scripts" / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    started = []
    init = RowEncoding.__init__

    def spy(self, dataset, tokenizer, max_length, passes=(False,), workers=1):
        init(self, dataset, tokenizer, max_length, passes, workers)
        started.append((list(passes), self.workers))

    monkeypatch.setattr(RowEncoding, "__init__", spy)
    predictions = {}
    for workers in (2, 1):
        out = tmp_path / f"eval{workers}"
        script.main([str(a) for a in ["--base_model", tiny_llama, "--data", PANDALM, "--max_rows", 12,
                                      "--max_length", 256, "--out", out, "--swap_tta", "true", "--report", "false",
                                      "--tokenize_workers", workers]])
        predictions[workers] = pd.read_parquet(out / "predictions.parquet")
    assert started == [([True, False], 2), ([True, False], 1)]
    pd.testing.assert_frame_equal(predictions[2], predictions[1])
    assert np.isfinite(predictions[2].select_dtypes("number").to_numpy()).all()
    script.main([str(a) for a in ["--base_model", tiny_llama, "--data", PANDALM, "--max_rows", 12, "--max_length",
                                  256, "--out", tmp_path / "eval2", "--swap_tta", "true", "--report", "false",
                                  "--overwrite", "true", "--tokenize_workers", 2]])
    assert len(started) == 2  # both passes cached: nothing tokenised


def test_make_rows_writes_a_loadable_file_outside_the_repo(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import make_rows
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "rows.csv"
    make_rows.main(["--rows", "250", "--out", str(out), "--source", str(ARENA_SAMPLE)])
    data = load_arena(str(out))
    source = load_arena(str(ARENA_SAMPLE))
    assert len(data) == 250 and len(set(data["id"])) == 250
    assert data[0]["id"] == f"0-{source[0]['id']}" and data[100]["id"] == f"1-{source[0]['id']}"
    assert data[130]["prompt"] == source[30]["prompt"] and data[130]["label"] == source[30]["label"]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]  # no temp file left
    with pytest.raises(SystemExit):
        make_rows.main(["--rows", "10", "--out", str(REPO / "rows.csv")])
    assert not (REPO / "rows.csv").exists()
