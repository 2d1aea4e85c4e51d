"""`benchmarks/benchmark.py precision`: log loss of one model at several precisions on the same labelled rows."""

import json
import runpy

import numpy as np
import pytest

from lmsys_trl.metrics import log_loss, row_log_loss

from conftest import KAGGLE_TEST, PANDALM, REPO


@pytest.fixture(scope="module")
def benchmarks():
    """Import benchmark modules as `benchmarks/benchmark.py` does (benchmarks/ on sys.path)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "benchmarks"))
        yield patch


def test_row_log_loss_averages_to_the_log_loss():
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]])
    labels = np.array([0, 0, 2])
    rows = row_log_loss(probs, labels)
    assert rows[0] == pytest.approx(-np.log(0.7)) and rows[1] == pytest.approx(-np.log(1e-15), rel=1e-6)
    assert rows.mean() == pytest.approx(log_loss(probs, labels))


@pytest.mark.slow
def test_precision_mode_compares_with_the_baseline(benchmarks, tiny_llama, tmp_path):
    main = runpy.run_path(str(REPO / "benchmarks" / "benchmark.py"))["main"]
    results = tmp_path / "precision.jsonl"
    main([
        "precision", "--base_model", str(tiny_llama), "--data", str(PANDALM), "--max_length", "128", "--rows", "8",
        "--precisions", "fp32", "bf16", "fp8", "--baseline", "fp32", "--results", str(results),
    ])
    lines = {line["precision"]: line for line in map(json.loads, results.read_text().splitlines())}
    assert list(lines) == ["fp32", "bf16", "fp8"] and all(line["mode"] == "precision" for line in lines.values())
    assert lines["fp32"]["delta_log_loss"] == 0 and lines["fp32"]["mean_abs_prob_diff"] == 0
    for precision in ("bf16", "fp8"):
        line = lines[precision]
        assert line["rows"] == 8 and line["mean_abs_prob_diff"] > 0
        assert line["delta_log_loss"] == pytest.approx(line["log_loss"] - lines["fp32"]["log_loss"], abs=1e-9)


def test_unlabelled_rows_are_refused(benchmarks, tiny_llama):
    from precision_study import compare_precisions

    with pytest.raises(ValueError, match="needs labelled rows"):
        compare_precisions(str(tiny_llama), [], str(KAGGLE_TEST), 128, ["fp32"], "fp32", rows=2)
    with pytest.raises(ValueError, match="baseline 'bf16' must be one of"):
        compare_precisions(str(tiny_llama), [], str(PANDALM), 128, ["fp32"], "bf16", rows=2)


@pytest.mark.slow
def test_precision_variants_score_like_eval_with_swap_tta(benchmarks, tiny_llama, tmp_path):
    """Named variants take eval's scoring keys (+ the FP8 ones); with swap TTA every row is scored both ways."""
    from precision_study import compare_precisions

    results = compare_precisions(
        str(tiny_llama), [], str(PANDALM), 128, ["fp32"], "fp32", rows=6, swap_tta=True,
        variants={"packed": {"precision": "fp32", "pack_rows": True, "token_budget": 512},
                  "fp8-half": {"precision": "fp8", "fp8_keep_fraction": 0.5}},
    )
    lines = {line["variant"]: line for line in results}
    assert list(lines) == ["fp32", "packed", "fp8-half"] and all(line["swap_tta"] for line in results)
    assert lines["packed"]["settings"]["pack_rows"] and abs(lines["packed"]["delta_log_loss"]) < 1e-6  # same function
    assert lines["fp8-half"]["fp8_layers"] == 7 and lines["fp8-half"]["mean_abs_prob_diff"] > 0  # 14 linear layers
    assert lines["fp32"]["fp8_layers"] == 0 and all(line["seconds"] > 0 for line in results)
