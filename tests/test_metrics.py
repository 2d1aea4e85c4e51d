"""Metrics: Kaggle log loss against hand computations, ECE, breakdowns, and the `evaluate` module (offline)."""

import math

import numpy as np
import pytest

from lmsys_trl.metrics import (
    accuracy,
    breakdown,
    confusion_matrix,
    expected_calibration_error,
    log_loss,
    reliability_bins,
    row_log_loss,
)


PROBS = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.25, 0.5], [0.2, 0.5, 0.3]]
LABELS = [0, 2, 1, 2]
HAND_LOSS = -(math.log(0.7) + math.log(0.6) + math.log(0.25) + math.log(0.3)) / 4


def test_log_loss_matches_hand_computation():
    assert log_loss(PROBS, LABELS) == pytest.approx(HAND_LOSS, abs=1e-12)
    assert row_log_loss(PROBS, LABELS) == pytest.approx([-math.log(p) for p in (0.7, 0.6, 0.25, 0.3)])


def test_log_loss_clips_like_kaggle():
    # a zero probability on the true class costs -ln(1e-15 / (1 + 1e-15)) instead of infinity
    assert log_loss([[0.0, 1.0, 0.0]], [0]) == pytest.approx(-math.log(1e-15 / (1 + 2e-15)), rel=1e-6)
    # unnormalised rows are renormalised
    assert log_loss([[0.5, 0.3, 0.3]], [0]) == pytest.approx(-math.log(0.5 / 1.1))


def test_ece_matches_hand_computation():
    # bins: 0.7 (correct: |1 - 0.7| = 0.3), 0.6 (correct: 0.4), 0.5 x2 (row 3 wrong, row 4 wrong: |0 - 0.5|)
    expected = (0.3 + 0.4 + 2 * 0.5) / 4
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected)
    bins = reliability_bins(PROBS, LABELS)
    assert sum(b["count"] for b in bins) == 4
    assert bins[5]["count"] == 2 and bins[5]["accuracy"] == 0.0 and bins[5]["confidence"] == pytest.approx(0.5)


def test_confusion_accuracy_and_breakdown():
    matrix = confusion_matrix(PROBS, LABELS)
    assert matrix.sum() == 4 and matrix[0, 0] == 1 and matrix[2, 2] == 1 and matrix[1, 2] == 1 and matrix[2, 1] == 1
    assert accuracy(PROBS, LABELS) == 0.5
    groups = breakdown(PROBS, LABELS, ["1", "1", "2", "2"])
    assert groups["1"]["rows"] == 2 and groups["1"]["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.6)) / 2)
    assert groups["2"]["accuracy"] == 0.0


def test_evaluate_module_loads_offline_and_breaks_down(monkeypatch, tmp_path):
    import evaluate

    from lmsys_trl.arena_metric import PATH

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path))
    metric = evaluate.load(PATH)
    result = metric.compute(predictions=PROBS, references=LABELS, turns=[1, 1, 3, 7])
    assert result["log_loss"] == pytest.approx(HAND_LOSS, abs=1e-12)
    assert result["accuracy"] == 0.5
    assert result["ece"] == pytest.approx(expected_calibration_error(PROBS, LABELS))
    assert set(result["per_class"]) == {"A", "B", "C"}
    assert result["per_class"]["C"]["rows"] == 2
    assert result["per_class"]["B"]["log_loss"] == pytest.approx(-math.log(0.25))
    assert set(result["per_turn_count"]) == {"1", "3", "5+"}
    assert result["per_turn_count"]["1"]["rows"] == 2


def test_evaluate_module_rejects_unlabelled_rows():
    import evaluate

    from lmsys_trl.arena_metric import PATH

    with pytest.raises(ValueError, match="references must be labels"):
        evaluate.load(PATH).compute(predictions=PROBS[:1], references=[-1])


def test_metrics_random_probs_properties():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=200)
    labels = rng.integers(0, 3, size=200)
    assert 0 <= expected_calibration_error(probs, labels) <= 1
    assert log_loss(np.full((5, 3), 1 / 3), [0, 1, 2, 0, 1]) == pytest.approx(math.log(3))
