"""Bad input, faults and resumption (issue 8).

Every entry of the bad-input matrix reaches the user of scripts/sft.py and scripts/eval.py as one line
`error: <message>` (exit status 2) naming the file and row id, or the option, and saying what to do. Where the
loader/formatter itself is tested elsewhere, this file checks what the user sees:

 1 missing column, 2 non-JSON / non-list cell, 3 unequal turn counts, 4 zero / two winners, 5 empty file,
 6 non-UTF-8 bytes, 12 duplicate ids (a clear error, so a submission has one row per id)
                                   -> tests/test_data.py (loader); here test_bad_data_is_one_line_naming_file_and_row
 5 zero rows after filtering      -> here test_no_training_rows_left_is_one_line
 7 over-long single turn          -> tests/test_formatting.py test_single_overlong_turn_is_split_per_recipe (cut,
                                     not an error); here the property test
 8 chat template missing/rejects  -> here test_chat_template_missing_or_rejecting_roles
 9 letters not single tokens      -> here test_answer_letters_that_are_not_single_tokens
10 adapter of another base model  -> tests/test_score.py, tests/test_eval_script.py; here test_adapter_problems_*
11 output dir                     -> tests/test_eval_script.py (eval --overwrite); here test_output_dir_*
Faults: training SIGKILLed mid-run resumes to the uninterrupted weights; eval SIGKILLed leaves no partial results
and --resume re-scores only what was not cached; push failure -> tests/test_train.py
(test_push_failure_keeps_the_local_adapter_and_says_how_to_retry).
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors.torch import load_file
from test_data import kaggle_row, write_csv

from lmsys_trl.configs import run_main
from lmsys_trl.data import LETTERS
from lmsys_trl.formatting import OPTIONS, BudgetError, chat_token_ids, format_example, render_text, to_messages
from lmsys_trl.io import RESULT_FILES

from conftest import ARENA_SAMPLE, PANDALM, REPO


TINY_RECIPE = REPO / "tests" / "recipes" / "tiny.yaml"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "cli", module.main)  # scripts/sft.py: cli(argv) parses, main(...) trains


def one_line_error(capsys, name: str, argv) -> str:
    """Run scripts/<name>.py as its __main__ does; expect exit 2 and a single `error:` line (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(script(name), [str(a) for a in argv])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-2000:]
    return errors[0]


def sft_argv(model, output_dir, *extra):
    return [TINY_RECIPE, "--model_name_or_path", model, "--output_dir", output_dir, "--train_files", ARENA_SAMPLE,
            "--max_length", 160, *extra]


def eval_argv(base_model, data, out, *extra):
    return ["--base_model", base_model, "--data", data, "--out", out, "--max_length", 256, "--report", "false", *extra]


# ------------------------------------------------------------------------------------------ bad input (matrix)


def _bad_file(tmp_path, case: str) -> str:
    good, bad = kaggle_row(10), kaggle_row(11)
    path = tmp_path / "bad.csv"
    if case == "missing column":
        del good["response_b"], bad["response_b"]
    elif case == "not JSON":
        bad["prompt"] = "[not json"
    elif case == "not a list":
        bad["response_a"] = "42"
    elif case == "unequal turns":
        bad["prompt"] = json.dumps(["a", "b"])
    elif case == "no winner":
        bad["winner_model_a"] = 0
    elif case == "two winners":
        bad["winner_model_b"] = 1
    elif case == "duplicate ids":
        bad["id"] = 10
    write_csv(path, [good, bad])
    if case == "empty file":
        path.write_text("")
    elif case == "header only":
        path.write_text("id,prompt,response_a,response_b\n")
    elif case == "non-UTF-8":
        path.write_bytes(path.read_bytes().replace(b"Hello", "Hélló".encode("latin-1"), 1))
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing column", r"bad.csv: missing required column\(s\) \['response_b'\]; found \["),
        ("not JSON", r"bad.csv: row id 11: column 'prompt' is not valid JSON"),
        ("not a list", r"bad.csv: row id 11: column 'response_a' must be a non-empty JSON list of turns"),
        ("unequal turns", r"bad.csv: row id 11: unequal turn counts .*each turn needs a prompt and two responses"),
        ("no winner", r"bad.csv: row id 11: exactly one of .* must be 1, got \[0, 0, 0\]"),
        ("two winners", r"bad.csv: row id 11: exactly one of .* must be 1, got \[1, 1, 0\]"),
        ("empty file", r"bad.csv: the file is empty; give a file with a header and at least one row"),
        ("header only", r"bad.csv: the file has no rows"),
        ("non-UTF-8", r"bad.csv: not UTF-8 text at line 2 \(byte offset \d+\); re-save the file as UTF-8"),
        ("duplicate ids", r"bad.csv: duplicate row id\(s\) \['10'\]; ids must be unique"),
    ],
)
def test_bad_data_is_one_line_naming_file_and_row(tmp_path, capsys, case, expected):
    """Entries 1-6 and 12 as the user of scripts/eval.py meets them (the data loads before any model)."""
    line = one_line_error(capsys, "eval", eval_argv("no-model-needed", _bad_file(tmp_path, case), tmp_path / "out"))
    assert re.search(expected, line), line
    assert not any((tmp_path / "out" / f).exists() for f in RESULT_FILES)


def test_bad_data_reaches_the_training_script_the_same_way(tiny_llama, tmp_path, capsys):
    line = one_line_error(
        capsys, "sft", sft_argv(tiny_llama, tmp_path / "out", "--train_files", _bad_file(tmp_path, "two winners"))
    )
    assert re.search(r"bad.csv: row id 11: exactly one of", line), line


def test_no_training_rows_left_is_one_line(tiny_llama, tmp_path, capsys):
    line = one_line_error(capsys, "sft", sft_argv(tiny_llama, tmp_path / "out", "--max_train_rows", 0))
    assert "lmsys_arena_sample100.csv: no training rows left" in line and "--max_train_rows" in line


def _model_with_tokenizer(tiny_llama, path, edit):
    """tiny_llama's weights (symlinked) with an edited copy of its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    edit(tokenizer)
    tokenizer.save_pretrained(str(path))
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (tiny_llama / name).exists():
            os.symlink(tiny_llama / name, path / name)
    return path


def _no_template(tokenizer):
    tokenizer.chat_template = None


def _foreign_roles(tokenizer):  # a template for human/gpt turns only: raises on user and assistant
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['human', 'gpt'] %}"
        "{{ raise_exception('Unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}"
    )


@pytest.mark.parametrize("edit, expected", [
    (_no_template, r"tiny: the tokenizer has no chat template; use a chat \(instruct\) model"),
    (_foreign_roles, r"tiny: its chat template cannot render a user turn followed by an assistant turn "
                     r"\(Unknown role user\); give a chat model's tokenizer or set `tokenizer.chat_template`"),
], ids=["no template", "foreign roles"])
@pytest.mark.slow
def test_chat_template_missing_or_rejecting_roles(tiny_llama, tmp_path, capsys, edit, expected):
    """Entry 8, in both scripts (eval meets the rejecting template only when it formats rows, after loading)."""
    model = _model_with_tokenizer(tiny_llama, tmp_path / "tiny", edit)
    line = one_line_error(capsys, "sft", sft_argv(model, tmp_path / "train"))
    assert re.search(expected, line), line
    line = one_line_error(capsys, "eval", eval_argv(model, PANDALM, tmp_path / "eval", "--max_rows", 2))
    assert re.search(expected, line), line
    assert not (tmp_path / "train" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_answer_letters_that_are_not_single_tokens(tiny_llama, tmp_path, capsys):
    """Entry 9: a tokenizer whose normalizer splits 'A' (as tokenizers without a bare-letter token do)."""
    from tokenizers import normalizers

    def split_letters(tokenizer):
        tokenizer.backend_tokenizer.normalizer = normalizers.Replace("A", "\u2581A\u2581")

    model = _model_with_tokenizer(tiny_llama, tmp_path / "tiny", split_letters)
    expected = r"tiny: answer letter 'A' is \d tokens \[[\d, ]+\]; it must be one"
    assert re.search(expected, one_line_error(capsys, "sft", sft_argv(model, tmp_path / "train")))
    assert re.search(expected, one_line_error(capsys, "eval", eval_argv(model, PANDALM, tmp_path / "eval")))


@pytest.mark.slow
def test_adapter_problems_are_one_line(tiny_llama, tmp_path, capsys):
    """Entry 10 (plus an adapter dir without adapter_config.json) through scripts/eval.py."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "google/gemma-2-9b-it", "task_type": "CAUSAL_LM"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, "eval", eval_argv(tiny_llama, PANDALM, tmp_path / "w", "--adapters", adapter))
    assert f"{adapter}: adapter_config.json but no adapter_model.safetensors" in line  # weights missing
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # present (the base check does not read it)
    line = one_line_error(capsys, "eval", eval_argv(tiny_llama, PANDALM, tmp_path / "a", "--adapters", adapter))
    assert f"adapter {adapter} was trained on base model 'google/gemma-2-9b-it', but --base_model is" in line
    assert "pass the matching --base_model, or --allow_base_mismatch true" in line
    line = one_line_error(capsys, "eval", eval_argv(tiny_llama, PANDALM, tmp_path / "b", "--adapters", tmp_path))
    assert f"{tmp_path}: not a LoRA adapter (no readable adapter_config.json)" in line


def test_output_dir_of_eval_not_writable_or_holding_results(tmp_path, capsys):
    """Entry 11 for scripts/eval.py: refused before any data or model is read."""
    data = write_csv(tmp_path / "ok.csv", [kaggle_row(1)])
    (tmp_path / "file").write_text("x")
    line = one_line_error(capsys, "eval", eval_argv("unused", data, tmp_path / "file" / "out"))
    assert line.startswith(f"error: {tmp_path / 'file' / 'out'}: cannot create the output dir") and "--out" in line
    done = tmp_path / "done"
    done.mkdir()
    (done / "submission.csv").write_text("id\n")
    line = one_line_error(capsys, "eval", eval_argv("unused", data, done))
    assert "already holds results (submission.csv); pass --overwrite true" in line
    line = one_line_error(capsys, "eval", eval_argv("unused", data, done, "--resume", "--rescore"))
    assert "--resume reuses the cached member logits and --rescore discards them" in line


def test_output_dir_of_training_not_writable_or_holding_results(tmp_path, capsys):
    """Entry 11 for scripts/sft.py: decided like transformers' old `overwrite_output_dir` - an earlier run's adapter,
    metrics or checkpoints are refused unless resumed or --overwrite_output_dir true; checked before the tokenizer,
    data or model load (the model path here does not even exist)."""
    from lmsys_trl.training import check_output_dir

    (tmp_path / "file").write_text("x")
    line = one_line_error(capsys, "sft", sft_argv("no-such-model", tmp_path / "file" / "out"))
    assert f"{tmp_path / 'file' / 'out'}: the output directory cannot be written" in line and "--output_dir" in line
    earlier = tmp_path / "earlier"
    (earlier / "checkpoint-3").mkdir(parents=True)
    (earlier / "metrics.json").write_text("{}")
    line = one_line_error(capsys, "sft", sft_argv("no-such-model", earlier))
    assert f"{earlier} already holds an earlier run (checkpoint-3, metrics.json)" in line
    assert "--resume_from_checkpoint true" in line and "--overwrite_output_dir true" in line
    check_output_dir(str(earlier), resuming=False, overwrite=True)
    check_output_dir(str(earlier), resuming=True, overwrite=False)
    check_output_dir(str(tmp_path / "new" / "dir"), resuming=False, overwrite=False)  # created
    assert (tmp_path / "new" / "dir").is_dir()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_output_dirs_are_refused(tmp_path):
    from lmsys_trl.io import check_output_dir as check_eval_dir
    from lmsys_trl.training import check_output_dir

    locked = tmp_path / "locked"
    (locked / "members").mkdir(parents=True)
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot be written"):
            check_output_dir(str(locked), resuming=False, overwrite=False)
        with pytest.raises(PermissionError, match="not writable"):
            check_eval_dir(str(locked), overwrite=False)
    finally:
        locked.chmod(0o700)


def test_only_our_checked_errors_are_shortened(monkeypatch):
    def library_failure(argv):
        return json.loads("{")  # a ValueError raised inside a library: keep the traceback

    with pytest.raises(json.JSONDecodeError):
        run_main(library_failure)
    from lmsys_trl.data import load_arena

    monkeypatch.setenv("LMSYS_TRL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="no data files given"):
        run_main(lambda argv: load_arena([]))


@pytest.mark.slow
def test_scripts_run_as_programs_print_one_line(tmp_path):
    """The `__main__` wiring of both scripts: a real process, exit status 2, no traceback."""
    bad = _bad_file(tmp_path, "unequal turns")
    runs = {
        "eval": eval_argv("unused", bad, tmp_path / "eval"),
        "sft": sft_argv("no-such-model", tmp_path / "file" / "out"),
    }
    (tmp_path / "file").write_text("x")
    for name, argv in runs.items():
        done = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *map(str, argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.rstrip().splitlines()[-1].startswith("error: "), done.stderr[-2000:]


# ------------------------------------------------------------------------------------------ faults


def wait_for(path, process, timeout: float = 240):
    """Poll until `path` exists (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the process ended ({process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_training_killed_mid_run_resumes_to_the_uninterrupted_weights(tiny_llama, tmp_path, capsys, caplog):
    steps = ["--max_steps", 4, "--max_val_rows", 1]
    saves = ["--save_strategy", "steps", "--save_steps", 1]
    killed = tmp_path / "killed"
    argv = sft_argv(tiny_llama, killed, *steps, *saves)
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "sft.py"), *map(str, argv)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(killed / "checkpoint-1" / "trainer_state.json", process)
    finally:
        kill(process)
    assert not (killed / "adapter_model.safetensors").exists()  # killed mid-run, not after it
    # As if the kill had also cut the next save short: a checkpoint without trainer_state.json must be skipped.
    last = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    partial = killed / f"checkpoint-{last + 1}"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    line = one_line_error(capsys, "sft", sft_argv(tiny_llama, killed, *steps, *saves))  # not resuming: refused
    assert "already holds an earlier run" in line and "--resume_from_checkpoint true" in line

    resume = ["--resume_from_checkpoint", "true"]
    trainer, _ = script("sft")([str(a) for a in sft_argv(tiny_llama, killed, *steps, *saves, *resume)])
    assert trainer.state.global_step == 4
    assert f"{partial} is incomplete" in caplog.text
    uninterrupted = tmp_path / "uninterrupted"
    script("sft")([str(a) for a in sft_argv(tiny_llama, uninterrupted, *steps)])  # no checkpoints
    full = load_file(str(uninterrupted / "adapter_model.safetensors"))
    resumed = load_file(str(killed / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys() and len(full) == 16
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_eval_killed_mid_run_leaves_no_partial_results_and_resume_reuses_the_cache(
    tiny_llama, tmp_path, monkeypatch
):
    out = tmp_path / "eval"
    argv = eval_argv(tiny_llama, PANDALM, out, "--max_rows", 250, "--swap_tta", "--token_budget", 2048)
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "eval.py"), *map(str, argv)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    swapped = out / "members" / f"{tiny_llama.name}-data-swapped.parquet"
    try:
        wait_for(swapped, process)  # the swapped pass is cached; the plain pass is running
    finally:
        kill(process)
    assert not (out / "members" / f"{tiny_llama.name}-data.parquet").exists()  # killed while scoring
    assert not any((out / f).exists() for f in RESULT_FILES)
    assert not list(out.rglob("*.tmp-*"))
    cached_at = swapped.stat().st_mtime_ns

    import lmsys_trl.scoring

    passes = []
    score_dataset = lmsys_trl.scoring.score_dataset

    def counting(model, tokenizer, dataset, max_length, swapped=False, *args, **kwargs):
        passes.append(swapped)
        return score_dataset(model, tokenizer, dataset, max_length, swapped, *args, **kwargs)

    monkeypatch.setattr(lmsys_trl.scoring, "score_dataset", counting)
    metrics = script("eval")([str(a) for a in argv + ["--resume"]])
    assert passes == [False]  # only the pass the kill interrupted is scored again
    assert swapped.stat().st_mtime_ns == cached_at
    assert metrics["rows"] == 250 and metrics["swap_tta"]["enabled"]
    submission = pd.read_csv(out / "submission.csv", dtype={"id": str})
    assert len(submission) == 250 and submission["id"].is_unique

    # a finished run resumed again (e.g. to re-calibrate) needs neither the models nor --overwrite
    passes.clear()
    again = script("eval")([str(a) for a in argv + ["--resume", "--temperature", 1.5]])
    assert passes == [] and again["temperature"]["value"] == 1.5 and again["log_loss"] != metrics["log_loss"]


# ------------------------------------------------------------------------------------------ property test

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="#"), max_size=300)
TURN_TEXT = TEXT | st.builds(lambda word, n: word * n, TEXT.filter(bool), st.integers(1, 300))  # some far too long
TURNS = st.lists(st.tuples(TURN_TEXT, TURN_TEXT, TURN_TEXT), min_size=1, max_size=12)


def _last_block(text: str) -> tuple[str, str, str]:
    """The (prompt, response A, response B) of the last packed turn (turn texts hold no '#')."""
    block = text[text.rindex("#Prompt"):]
    prompt, rest = block.split("\n", 1)[1].split("\n#Response\n##Model A\n")
    response_a, rest = rest.split("\n##Model B\n")
    return prompt, response_a, rest.split("\n" + OPTIONS)[0]


# A budget: absolute, or tokens above the fixed text (header, options, chat template) down to below it: the edge.
MAX_LENGTH = st.integers(150, 700) | st.tuples(st.just("fixed +"), st.integers(-3, 40))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turns=TURNS, max_length=MAX_LENGTH, label=st.sampled_from([0, 1, 2]), mode=st.sampled_from(["train", "infer"]))
def test_formatting_invariants_on_random_rows(tokenizer, turns, max_length, label, mode):
    """Random schema-valid rows (unicode, empty strings, many turns, over-long turns) through the real templates,
    at budgets down to the fixed text: the rendered record fits max_length, has exactly one answer completion (train)
    or none (infer), and keeps the last turn (whole, or a head of each part); or, only where no turn fits, a
    BudgetError saying how many tokens are needed (it returns: the budget loop never walks below zero)."""
    if isinstance(max_length, tuple):
        fixed = len(chat_token_ids(tokenizer, to_messages(render_text([]), 0 if mode == "train" else None)))
        max_length = fixed + max_length[1]
    prompt, response_a, response_b = map(list, zip(*turns))
    row = {"prompt": prompt, "response_a": response_a, "response_b": response_b, "label": label}
    try:
        record = format_example(row, tokenizer, max_length, mode)
    except BudgetError as err:
        assert max_length < 150 and int(str(err).split("needs at least ")[1].split()[0]) > max_length
        event("budget refused")
        return
    assert len(chat_token_ids(tokenizer, record)) <= max_length
    text = record["prompt"][0]["content"]
    assert [m["role"] for m in record["prompt"]] == ["user"] and text.count(OPTIONS) == 1 and text.endswith(OPTIONS)
    if mode == "train":
        assert record["completion"] == [{"role": "assistant", "content": LETTERS[label]}]
    else:
        assert "completion" not in record
    last = _last_block(text)
    for kept, original in zip(last, turns[-1]):
        head = kept.rstrip("\ufffd")  # a cut inside a multi-byte character decodes to U+FFFD
        assert original.startswith(head), (kept[:80], original[:80])
        assert bool(kept) == bool(original)  # a head of every non-empty part survives
    event("last turn cut" if last != turns[-1] else "last turn whole")
    event(f"{text.count('#Prompt')} of {len(turns)} turns kept" if len(turns) > 1 else "one turn")


# ------------------------------------------------------------------------------------------ issue 15, item 1: the
# demo model's export never deletes what this project did not write


def _prepare_demo_model():
    path = REPO / "scripts" / "prepare_demo_model.py"
    spec = importlib.util.spec_from_file_location("prepare_demo_model_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def fake_gguf(monkeypatch):
    """A stand-in for the GGUF load (the real export takes a minute): any package with a folder, a tiny model and
    tokenizer whose save_pretrained writes a few files; `fake_gguf` counts the loads."""
    import transformers

    loads = []

    class Saved:
        def __init__(self, files):
            self.files, self.config, self.hf_quantizer, self.is_quantized = files, object(), None, False

        def save_pretrained(self, folder):
            for name, content in self.files.items():
                with open(os.path.join(folder, name), "w") as f:
                    f.write(content)
            os.chmod(os.path.join(folder, name), 0o600)  # as safetensors writes its file

    def model(*args, **kwargs):
        loads.append(kwargs["gguf_file"])
        return Saved({"config.json": "{}", "model.safetensors": kwargs["gguf_file"]})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: Saved({"tokenizer.json": "{}"}))
    return loads


def _export_cli(capsys, out, gguf="m.gguf"):
    """scripts/prepare_demo_model.py as its __main__ runs it; returns (exit status, stderr)."""
    capsys.readouterr()
    argv = ["--package", "json", "--gguf_file", gguf, "--out", str(out)]
    module = _prepare_demo_model()
    status = module.cli(argv) if hasattr(module, "cli") else module.main(argv) or 0
    return status, capsys.readouterr().err


@pytest.mark.parametrize("content", [{"notes.txt": "mine"}, {"config.json": "{}", "weights.bin": "x"},
                                     {"sub/deep.txt": "mine"}])
def test_demo_model_export_refuses_a_folder_it_did_not_write(tmp_path, capsys, fake_gguf, content):
    out = tmp_path / "models"
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _tree(tmp_path)
    status, stderr = _export_cli(capsys, out)
    assert status == 2 and stderr.count("\n") == 1 and stderr.startswith(f"error: {out}: "), stderr
    assert "not an earlier export" in stderr and "nothing was deleted" in stderr
    assert _tree(tmp_path) == before and fake_gguf == []


def test_demo_model_export_refuses_a_file_and_the_current_folder(tmp_path, capsys, fake_gguf, monkeypatch):
    (tmp_path / "file").write_text("mine")
    status, stderr = _export_cli(capsys, tmp_path / "file")
    assert status == 2 and "is not a folder" in stderr and (tmp_path / "file").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    status, stderr = _export_cli(capsys, ".")
    assert status == 2 and "not an earlier export" in stderr and (tmp_path / "file").read_text() == "mine"


def test_demo_model_export_writes_new_and_empty_folders_replaces_only_its_own(tmp_path, capsys, fake_gguf):
    out = tmp_path / "a" / "model"
    assert _export_cli(capsys, out) == (0, "")
    written = _tree(out)
    assert set(written) >= {"config.json", "model.safetensors", "tokenizer.json"}
    marker = json.loads(written[".lmsys_trl_export"])
    assert marker == {"package": "json", "gguf_file": "m.gguf", "files": sorted(set(written) - {".lmsys_trl_export"})}
    assert {oct(p.stat().st_mode & 0o777) for p in [out, *out.iterdir()]} <= {"0o755", "0o644"}  # umask 022
    assert _export_cli(capsys, out) == (0, "") and fake_gguf == ["m.gguf"]  # an earlier complete export: kept
    assert _export_cli(capsys, out, gguf="other.gguf") == (0, "")  # another model: our own folder replaced
    assert (out / "model.safetensors").read_text() == "other.gguf" and fake_gguf == ["m.gguf", "other.gguf"]
    (out / "my_notes.txt").write_text("mine")  # a user's file inside an export is not ours to delete
    status, stderr = _export_cli(capsys, out, gguf="third.gguf")
    assert status == 2 and "my_notes.txt" in stderr and (out / "my_notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export_cli(capsys, empty) == (0, "") and (empty / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]  # no temporary folder left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model"]


def test_demo_model_export_failure_leaves_the_earlier_export(tmp_path, capsys, fake_gguf, monkeypatch):
    import transformers

    out = tmp_path / "model"
    assert _export_cli(capsys, out) == (0, "")
    before = _tree(out)

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(OSError, match="No space left"):
        _export_cli(capsys, out, gguf="other.gguf")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
