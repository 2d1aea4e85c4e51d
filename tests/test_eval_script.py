"""scripts/eval.py end to end: a trained tiny adapter on PANDALM rows, the Kaggle submission format, caching,
refusals (existing results, base-model mismatch), ensembles and the shipped eval recipes."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest

from lmsys_trl.configs import parse
from lmsys_trl.evaluation import EvalArguments
from lmsys_trl.io import RESULT_FILES
from lmsys_trl.members import MemberScorer

from conftest import KAGGLE_TEST, PANDALM, REPO


def load_script():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "scripts" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama, tmp_path_factory):
    """A LoRA adapter trained for two steps by scripts/sft.py with the tiny recipe."""
    out = tmp_path_factory.mktemp("adapter")
    command = [
        sys.executable, str(REPO / "scripts" / "sft.py"), str(REPO / "tests" / "recipes" / "tiny.yaml"),
        "--model_name_or_path", str(tiny_llama), "--output_dir", str(out), "--max_steps", "2",
        "--max_train_rows", "4", "--swap_augment", "0", "--max_val_rows", "1",
        "--train_files", str(REPO.parent / "shared" / "data" / "lmsys_arena_sample100.csv"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def run(argv):
    return load_script().main([str(a) for a in argv])


def base_argv(tiny_llama, tiny_adapter, out, rows=24):
    return ["--base_model", tiny_llama, "--adapters", tiny_adapter, "--data", PANDALM, "--max_rows", rows,
            "--max_length", 256, "--out", out, "--token_budget", 2048]


@pytest.mark.slow
def test_eval_of_a_trained_adapter_writes_every_output(tiny_llama, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "eval"
    metrics = run(base_argv(tiny_llama, tiny_adapter, out) + ["--swap_tta", "--post_process", "--temperature", 1.03])
    for name in (*RESULT_FILES, "reliability.png", "confusion.png", "loss_by_length.png"):
        assert (out / name).is_file(), name
    assert '"log_loss"' in capsys.readouterr().out  # the metrics are printed
    expected = pd.read_csv(PANDALM, dtype=str).head(24)
    submission = pd.read_csv(out / "submission.csv", dtype={"id": str})
    assert list(submission.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert submission["id"].tolist() == expected["id"].tolist()
    probs = submission.iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (probs > 0).all()
    saved = json.loads((out / "metrics.json").read_text())
    labels = np.argmax(expected[["winner_model_a", "winner_model_b", "winner_tie"]].astype(int).to_numpy(), axis=1)
    hand = -np.mean(np.log(probs[np.arange(24), labels]))
    assert saved["log_loss"] == pytest.approx(hand, abs=1e-9) == pytest.approx(metrics["log_loss"])
    assert saved["rows"] == 24 and saved["temperature"] == {"value": 1.03, "source": "given"}
    assert saved["swap_tta"]["enabled"] and set(saved["per_turn_count"]) == {"1"}
    assert saved["scoring"]["precision"] == "fp32" and saved["scoring"]["pack_rows"] is False  # CPU defaults
    changed_rows = saved["post_processing"]["rows_changed"]
    assert changed_rows["empty_a"] + changed_rows["empty_b"] > 0
    member = saved["members"][tiny_adapter.name]
    assert member["weight"] == 1.0 and member["log_loss"] != member["log_loss_no_tta"]
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert predictions["id"].tolist() == expected["id"].tolist()
    assert {f"{tiny_adapter.name}_{x}" for x in "abc"} <= set(predictions.columns)
    np.testing.assert_allclose(predictions[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy(), probs)
    # post-processing moved probability only on the rows it names
    changed = predictions["post_process_rule"] != ""
    member_probs = predictions[[f"{tiny_adapter.name}_{x}" for x in "abc"]].to_numpy()
    np.testing.assert_allclose(member_probs[~changed], probs[~changed])
    assert not np.allclose(member_probs[changed], probs[changed])


@pytest.mark.slow
def test_existing_results_are_refused_and_member_logits_reused(tiny_llama, tiny_adapter, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    first = run(base_argv(tiny_llama, tiny_adapter, out, rows=8))
    with pytest.raises(FileExistsError, match="already holds results.*--overwrite"):
        run(base_argv(tiny_llama, tiny_adapter, out, rows=8))
    # re-calibrating with --overwrite reuses the cached logits: the model is never loaded again
    monkeypatch.setattr(MemberScorer, "_load", lambda self: pytest.fail("the model was loaded again"))
    second = run(base_argv(tiny_llama, tiny_adapter, out, rows=8) + ["--overwrite", "--temperature", 2.0])
    assert second["log_loss"] != first["log_loss"] and second["temperature"]["value"] == 2.0


@pytest.mark.slow
def test_unlabelled_kaggle_test_gives_a_submission_only(tiny_llama, tiny_adapter, tmp_path):
    out = tmp_path / "sub"
    metrics = run(["--base_model", tiny_llama, "--adapters", tiny_adapter, "--data", KAGGLE_TEST, "--out", out,
                   "--max_length", 256, "--swap_tta"])
    assert metrics == {}
    assert sorted(p.name for p in out.iterdir()) == [".lock", "members", "predictions.parquet", "submission.csv"]
    submission = pd.read_csv(out / "submission.csv", dtype={"id": str})
    assert list(submission.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    expected_ids = pd.read_csv(KAGGLE_TEST, dtype=str)["id"].tolist()
    assert submission["id"].tolist() == expected_ids == ["136060", "211333", "1233961"]
    np.testing.assert_allclose(submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.slow
def test_ensemble_weights_fitted_and_cached(tiny_llama, tiny_adapter, tmp_path):
    out = tmp_path / "ensemble"
    argv = ["--base_model", tiny_llama, "--adapters", tiny_adapter, "", "--member_names", "lora", "base",
            "--data", PANDALM, "--max_rows", 12, "--max_length", 256, "--out", out]
    metrics = run(argv + ["--fit_weights", "--fit_temperature"])
    weights = [metrics["members"][m]["weight"] for m in ("lora", "base")]
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0)
    assert metrics["weights_source"] == "fitted on data (in-sample)"
    assert metrics["temperature"]["source"] == "fitted on data (in-sample)"
    assert sorted(p.name for p in (out / "members").iterdir()) == ["base-data.parquet", "lora-data.parquet"]
    given = run(argv + ["--weights", 0.55, 0.45, "--overwrite"])
    assert given["members"]["lora"]["weight"] == pytest.approx(0.55)


@pytest.mark.slow
def test_adapter_of_another_base_model_is_refused(tiny_gemma, tiny_adapter, tmp_path):
    argv = ["--base_model", tiny_gemma, "--adapters", tiny_adapter, "--data", PANDALM, "--out", tmp_path / "x"]
    with pytest.raises(ValueError, match="trained on base model .*--allow_base_mismatch"):
        run(argv)


def test_help_lists_every_option_and_import_is_light():
    script = str(REPO / "scripts" / "eval.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for f in fields(EvalArguments):
        assert f"--{f.name}" in done.stdout
    probe = (
        f"import importlib.util, sys; s = importlib.util.spec_from_file_location('e', {script!r}); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("eval_*.yaml")), ids=lambda p: p.name)
def test_shipped_eval_recipes_parse(recipe):
    (args,) = parse((EvalArguments,), [str(recipe), "--data", "test.csv"])
    members = args.members()
    assert all(m["adapters"] for m in members) and sum(m["weight"] for m in members) == pytest.approx(1.0)
    assert args.temperature == 1.03 and (args.swap_tta or recipe.name == "eval_demo_cpu.yaml")
    if recipe.name == "eval_ensemble.yaml":
        assert [m["weight"] for m in members] == pytest.approx([0.55, 0.45])


def test_member_lists_must_line_up():
    with pytest.raises(ValueError, match="max_length has 2 entries for 3 members"):
        EvalArguments(data=["x.csv"], base_model=["m"], adapters=["a", "b", "c"], max_length=[1, 2])
    with pytest.raises(ValueError, match="base_model is required"):
        EvalArguments(data=["x.csv"])


@pytest.mark.slow
def test_two_processes_shard_scoring_and_gather_in_input_order(tiny_llama, tiny_adapter, tmp_path):
    """`accelerate launch` with 2 CPU processes (torchrun launcher, gloo): every row scored once, same
    probabilities."""
    single = tmp_path / "single"
    run(base_argv(tiny_llama, tiny_adapter, single, rows=9) + ["--no_report"])
    sharded = tmp_path / "sharded"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "scripts" / "eval.py"),
        *map(str, base_argv(tiny_llama, tiny_adapter, sharded, rows=9)), "--no_report",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 5/5 " in done.stderr and "| 4/4 " in done.stderr  # each process's bar: a shard of 5 and one of 4 rows
    one, two = (pd.read_csv(d / "submission.csv", dtype={"id": str}) for d in (single, sharded))
    assert two["id"].tolist() == one["id"].tolist() == pd.read_csv(PANDALM, dtype=str)["id"].head(9).tolist()
    np.testing.assert_allclose(two.iloc[:, 1:].to_numpy(), one.iloc[:, 1:].to_numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------ issue 15


def one_line_error(capsys, argv) -> str:
    """scripts/eval.py as its __main__ runs it: exit status 2 and a single `error:` line, no traceback."""
    from lmsys_trl.configs import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(load_script().main, [str(a) for a in argv])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr and len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-2000:]
    return errors[0]


def base_only_argv(model, out, rows=4, *extra):
    """A member without adapters (the tiny base model itself): a few seconds on the CPU."""
    return ["--base_model", model, "--data", PANDALM, "--max_rows", rows, "--max_length", 256, "--out", out, *extra]


def tiny_model_copy(tiny_llama, tmp_path):
    import shutil

    return shutil.copytree(tiny_llama, tmp_path / "base")


@pytest.mark.slow
def test_cache_is_keyed_on_the_base_model_files(tiny_llama, tmp_path, monkeypatch):
    """Item 5: base weights replaced at the same path are scored again, not taken from the member cache."""
    from safetensors.torch import load_file, save_file

    base = tiny_model_copy(tiny_llama, tmp_path)
    out = tmp_path / "eval"
    run(base_only_argv(base, out, 4, "--report", "false"))
    first = pd.read_parquet(out / "predictions.parquet")
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: v * 1.5 if v.dim() > 1 else v for k, v in weights.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    loads = []
    load = MemberScorer._load
    monkeypatch.setattr(MemberScorer, "_load", lambda self: loads.append(1) or load(self))
    run(base_only_argv(base, out, 4, "--report", "false", "--overwrite", "true"))
    second = pd.read_parquet(out / "predictions.parquet")
    assert loads == [1], "the old logits of the replaced base model were reused"
    assert not np.allclose(first["winner_model_a"], second["winner_model_a"])
    # nothing changed: the cache is used
    run(base_only_argv(base, out, 4, "--report", "false", "--overwrite", "true"))
    assert loads == [1]


def test_cache_key_follows_what_changes_the_logits(tiny_llama, tmp_path):
    """Item 5: the key changes with the base model's weight / config files, the max length, the precision / kernels
    and the rows, and stays put otherwise."""
    from lmsys_trl.evaluation import load_data

    base = tiny_model_copy(tiny_llama, tmp_path)

    def key(*extra, swapped=False):
        (args,) = parse((EvalArguments,), [str(a) for a in base_only_argv(base, tmp_path / "o", 4, *extra)])
        return MemberScorer(args.members()[0], args).cache_key(load_data(args)["data"], swapped)

    plain = key()
    assert key() == plain
    assert key(swapped=True) != plain
    assert key("--max_rows", 3) != plain
    assert key("--max_length", 200) != plain
    assert key("--precision", "bf16") != plain
    assert key("--attn_implementation", "sdpa") != plain
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert key() != plain
    changed = key()
    os.utime(base / "model.safetensors", ns=(1, 1))
    assert key() != changed


@pytest.mark.parametrize(
    "option, values, expected",
    [
        ("--temperature", ["nan"], "temperature must be a finite number > 0, got nan"),
        ("--temperature", ["inf"], "temperature must be a finite number > 0, got inf"),
        ("--temperature", ["0"], "temperature must be a finite number > 0, got 0"),
        ("--weights", ["nan", "1"], r"weights must be finite and >= 0 with a positive sum, got \[nan, 1.0\]"),
        ("--weights", ["inf", "1"], r"weights must be finite and >= 0 with a positive sum, got \[inf, 1.0\]"),
        ("--weights", ["0", "0"], r"weights must be finite and >= 0 with a positive sum, got \[0.0, 0.0\]"),
        ("--swap_weight", ["nan"], r"swap_weight must be in \[0, 1\], got nan"),
        ("--empty_shift", ["2"], r"empty_shift must be in \[0, 1\], got 2"),
        ("--empty_shift", ["-0.1"], r"empty_shift must be in \[0, 1\], got -0.1"),
        ("--identical_shift", ["nan"], r"identical_shift must be in \[0, 1\], got nan"),
        ("--max_rows", ["-1"], "max_rows must be >= 1, got -1"),
        ("--max_rows", ["0"], "max_rows must be >= 1, got 0"),
        ("--token_budget", ["0"], "token_budget must be >= 1, got 0"),
        ("--max_batch_size", ["-3"], "max_batch_size must be >= 1, got -3"),
        ("--tokenize_workers", ["0"], "tokenize_workers must be >= 1, got 0"),
        ("--tokenize_workers", ["-2"], "tokenize_workers must be >= 1, got -2"),
        ("--max_length", ["0"], r"max_length must be >= 1 for every member, got \[0\]"),
    ],
)
def test_numeric_options_are_checked(tmp_path, capsys, option, values, expected):
    """Item 6: every numeric option is finite and in range, as a one-line error naming it; nothing is written."""
    out = tmp_path / "out"
    argv = ["--base_model", "unused", "--adapters", "a", "b", "--data", PANDALM, "--out", out, option, *values]
    import re

    line = one_line_error(capsys, argv)
    assert re.search(expected, line), line
    assert not out.exists()


def test_final_probabilities_are_checked_before_anything_is_written(tiny_llama, tmp_path, capsys, monkeypatch):
    """Item 6: non-finite logits (an overflowing model) never reach submission.csv / metrics.json."""
    import lmsys_trl.scoring

    monkeypatch.setattr(lmsys_trl.scoring, "score_dataset", lambda *a, **k: np.full((4, 3), np.nan))
    out = tmp_path / "out"
    line = one_line_error(capsys, base_only_argv(tiny_llama, out))
    assert "final probabilities" in line and "not finite" in line
    assert not any((out / f).exists() for f in RESULT_FILES)


@pytest.mark.slow
def test_overwrite_clears_the_earlier_runs_results(tiny_llama, tmp_path):
    """Item 8: --overwrite true --report false leaves no report.html / plots of the earlier run beside new metrics."""
    out = tmp_path / "eval"
    run(base_only_argv(tiny_llama, out))
    assert (out / "report.html").is_file() and (out / "reliability.png").is_file()
    (out / "notes.md").write_text("mine")
    run(base_only_argv(tiny_llama, out, 4, "--overwrite", "true", "--report", "false"))
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "predictions.parquet", "submission.csv", "notes.md"} <= names
    assert not names & {"report.html", "reliability.png", "confusion.png", "loss_by_length.png"}


def test_a_second_run_into_the_same_out_is_refused(tiny_llama, tmp_path, capsys):
    """Item 8: while one run holds --out (an exclusive flock on <out>/.lock), another is refused, writing nothing."""
    import fcntl

    out = tmp_path / "eval"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
         " print('locked', flush=True); time.sleep(60)", str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_error(capsys, base_only_argv(tiny_llama, out))
        assert f"{out} is in use by another run" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    with open(out / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nothing left locked


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", ""])
def test_member_names_must_be_plain_names(tiny_llama, tmp_path, capsys, name):
    """Hygiene: --member_names ../x would write <out>/../x-data.parquet."""
    out = tmp_path / "deep" / "eval"
    line = one_line_error(capsys, base_only_argv(tiny_llama, out, 4, "--member_names", name))
    assert f"member name {name!r}" in line and "--member_names" in line
    assert not (tmp_path / "deep").exists()


def test_orphan_temp_files_are_cleaned_on_the_next_run(tiny_llama, tmp_path):
    """Hygiene: a killed run's <file>.tmp-<pid> files go on the next run into that --out; outputs get 0644."""
    out = tmp_path / "eval"
    (out / "members").mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    orphans = [out / f"submission.csv.tmp-{child.pid}", out / "members" / f"base-data.parquet.tmp-{child.pid}"]
    for path in orphans:
        path.write_text("partial")
    old = os.umask(0o022)
    try:
        run(base_only_argv(tiny_llama, out, 4, "--report", "false"))
    finally:
        os.umask(old)
    assert not any(p.exists() for p in orphans)
    assert not list(out.rglob("*.tmp-*"))
    for path in [out / "submission.csv", out / "metrics.json", *(out / "members").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path
