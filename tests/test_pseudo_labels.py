"""scripts/pseudo_label.py's output file (issue 15, item 4): an existing --out is refused unless --overwrite true, and
the input files never are written over, whatever the flags. Every refusal is one line `error: ...`, exit status 2,
and leaves every file as it was. (The pseudo-labels themselves: tests/test_trainer.py.)"""

import importlib.util
import shutil

import numpy as np
import pandas as pd
import pytest

from lmsys_trl.configs import run_main
from lmsys_trl.data import WINNER_COLUMNS, load_arena
from lmsys_trl.pseudo_labels import write_pseudo_labels

from conftest import KAGGLE_TEST, REPO


def pseudo_label_script():
    spec = importlib.util.spec_from_file_location("pseudo_label_script", REPO / "scripts" / "pseudo_label.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def inputs(tmp_path):
    """An unlabelled data file (a copy of the Kaggle test sample) and predictions for it."""
    data = tmp_path / "unlabelled.csv"
    shutil.copy(KAGGLE_TEST, data)
    ids = load_arena(str(data))["id"]
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], size=len(ids))
    predictions = tmp_path / "predictions.parquet"
    pd.DataFrame({"id": ids, **{c: probs[:, k] for k, c in enumerate(WINNER_COLUMNS)}}).to_parquet(predictions)
    return data, predictions


def run(capsys, argv) -> str:
    """Run the script as its __main__ does; expect exit 2 and a single `error:` line; return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(pseudo_label_script(), [str(a) for a in argv])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr[-2000:]
    return stderr.strip()


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_existing_out_is_refused_unless_overwrite(inputs, tmp_path, capsys):
    data, predictions = inputs
    out = tmp_path / "pseudo.csv"
    out.write_text("someone's file\n")
    before = snapshot(tmp_path)
    line = run(capsys, ["--predictions", predictions, "--data", data, "--out", out])
    assert str(out) in line and "already exists" in line and "--overwrite true" in line
    assert snapshot(tmp_path) == before
    pseudo_label_script()(["--predictions", str(predictions), "--data", str(data), "--out", str(out),
                           "--overwrite", "true"])
    assert load_arena(str(out))["id"] == load_arena(str(data))["id"]


@pytest.mark.parametrize("which", ["data", "predictions", "data via another path"])
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_the_input_is_never_the_output(inputs, tmp_path, capsys, which, overwrite):
    data, predictions = inputs
    out = {"data": data, "predictions": predictions, "data via another path": tmp_path / "." / "x" / ".." / data.name}
    (tmp_path / "x").mkdir()
    target = out[which]
    if which == "predictions":
        target = target.with_suffix(".parquet")
    before = snapshot(tmp_path)
    line = run(capsys, ["--predictions", predictions, "--data", data, "--out", target, "--overwrite", overwrite])
    assert "--out" in line and "input" in line and str(target) in line
    assert snapshot(tmp_path) == before


def test_out_that_is_a_folder_is_refused(inputs, tmp_path, capsys):
    data, predictions = inputs
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    line = run(capsys, ["--predictions", predictions, "--data", data, "--out", folder, "--overwrite", "true"])
    assert str(folder) in line and "is a directory" in line
    assert folder.is_dir() and not any(folder.iterdir())


def test_library_call_refuses_an_existing_file_too(inputs, tmp_path):
    data, predictions = inputs
    out = tmp_path / "p.parquet"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"):
        write_pseudo_labels(str(predictions), [str(data)], str(out))
    assert out.read_bytes() == b"old"
    write_pseudo_labels(str(predictions), [str(data)], str(out), overwrite=True)
    assert len(pd.read_parquet(out)) == 3


@pytest.mark.parametrize("value", ["nan", "-0.1", "1.5"])
def test_min_confidence_outside_0_1_is_refused(inputs, tmp_path, capsys, value):
    data, predictions = inputs
    out = tmp_path / "pseudo.csv"
    line = run(capsys, ["--predictions", predictions, "--data", data, "--out", out, "--min_confidence", value])
    assert "--min_confidence must be a probability in [0, 1]" in line and not out.exists()
