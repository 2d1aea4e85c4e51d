"""The benchmark tooling in benchmarks/ (run as scripts from the repo root): scoring parity and `benchmark.py infer`
on random weights of tiny shapes (CPU), and the real shapes' sizes (meta device)."""

import json
import runpy
import subprocess
import sys

import pytest
import torch

from lmsys_trl.model import load_tokenizer

from conftest import ARENA_SAMPLE, REPO, TOKENIZERS


BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def benchmark_modules():
    """benchmarks/ on sys.path, as when its scripts run: they import each other as top-level modules."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield patch


@pytest.mark.slow
def test_parity_script_on_cpu(tmp_path):
    out = tmp_path / "parity.jsonl"
    command = [
        sys.executable, str(BENCHMARKS / "parity.py"), "--tokenizers", str(TOKENIZERS),
        "--data", str(ARENA_SAMPLE), "--rows", "6", "--max_length", "192", "--token_budget", "600", "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["shape"] for r in results] == ["gemma-2-tiny", "llama-3.1-tiny"]
    for r in results:
        assert r["ok"] and r["rows"] == 6 and r["batches"] >= 2 and r["max_abs_prob_diff"] < 1e-5


def test_parity_real_shapes_match_the_published_sizes(benchmark_modules):
    parity = runpy.run_path(str(BENCHMARKS / "parity.py"))
    for shape, family, billions in (("gemma-2-9b", "gemma-2", 9.24), ("llama-3.1-8b", "llama-3.1", 8.03)):
        tokenizer = load_tokenizer(str(TOKENIZERS / family))
        model = parity["build_model"](shape, tokenizer, torch.bfloat16, "meta")
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.02)


@pytest.mark.slow
def test_benchmark_infer_subcommand_on_cpu(benchmark_modules, tmp_path):
    main = runpy.run_path(str(BENCHMARKS / "benchmark.py"))["main"]
    results = tmp_path / "results.jsonl"
    main([
        "infer", "--shape", "llama-3.1-tiny", "--tokenizer", str(TOKENIZERS / "llama-3.1"),
        "--data", str(ARENA_SAMPLE),
        "--max_length", "256", "--rows", "6", "--parity_rows", "3", "--results", str(results),
        "--variant", "packed", "pack_rows=true", "token_budget=512",
    ])
    lines = {line["variant"]: line for line in map(json.loads, results.read_text().splitlines())}
    assert list(lines) == ["reference", "default", "packed"]
    for line in lines.values():
        assert {"date", "device", "model", "mode", "tokens_per_s", "rows_per_s", "peak_gib", "command"} <= set(line)
        assert line["mode"] == "infer" and line["model"] == "llama-3.1-tiny" and line["timed_rows"] == 6
        assert line["tokens_per_s"] > 0 and line["parity_rows"] == 3 and line["max_abs_prob_diff"] < 1e-5
    assert lines["reference"]["settings"]["max_batch_size"] == 4 and lines["reference"]["precision"] == "fp32"  # CPU
    assert lines["default"]["settings"]["pack_rows"] is False and lines["packed"]["settings"]["pack_rows"] is True
    assert len({line["timed_tokens"] for line in lines.values()}) == 1  # the same rows in every variant
