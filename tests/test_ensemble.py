"""Ensemble helpers: weight / temperature fitting recover planted values, Parquet cache, post-processing."""

import math
import os

import numpy as np
import pytest

from lmsys_trl.ensemble import combine, fit_temperature, fit_weights, minimise_scalar, post_process
from lmsys_trl.io import atomic_output, load_logits, save_logits
from lmsys_trl.metrics import log_loss, softmax


def sample_labels(probs, rng):
    cumulative = np.cumsum(probs, axis=1)
    return (rng.random((len(probs), 1)) > cumulative).sum(axis=1)


def test_fit_weights_recovers_planted_mixture():
    rng = np.random.default_rng(0)
    members = [rng.dirichlet(np.full(3, 0.5), size=20000) for _ in range(3)]
    planted = np.array([0.6, 0.3, 0.1])
    labels = sample_labels(combine(members, planted), rng)
    weights = fit_weights(members, labels)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(weights, planted, atol=0.04)
    assert log_loss(combine(members, weights), labels) <= log_loss(combine(members, planted), labels) + 1e-9


def test_fit_weights_drops_a_useless_member():
    rng = np.random.default_rng(1)
    good = rng.dirichlet(np.full(3, 0.3), size=5000)
    labels = sample_labels(good, rng)
    noise = rng.dirichlet(np.full(3, 0.3), size=5000)
    weights = fit_weights([good, noise], labels)
    assert weights[0] > 0.9


def test_fit_temperature_recovers_planted_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20000, 3))
    labels = sample_labels(softmax(logits, 2.0), rng)
    fitted = fit_temperature(lambda t: softmax(logits, t), labels)
    assert fitted == pytest.approx(2.0, rel=0.05)


def test_minimise_scalar():
    assert minimise_scalar(lambda x: (x - 1.3) ** 2, -5, 5) == pytest.approx(1.3, abs=1e-4)
    assert minimise_scalar(lambda x: math.exp(-x), 0, 2) == pytest.approx(2, abs=1e-4)  # minimum at the edge


def test_logit_cache_round_trip_and_invalidation(tmp_path):
    path = str(tmp_path / "m" / "member-data.parquet")
    logits = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    ids = ["a", "b", "c", "d"]
    save_logits(path, "key1", ids, logits)
    np.testing.assert_array_equal(load_logits(path, "key1", ids), logits)
    assert load_logits(path, "key2", ids) is None  # other model / settings
    assert load_logits(path, "key1", ["a", "b", "c", "e"]) is None  # other rows
    assert load_logits(str(tmp_path / "missing.parquet"), "key1", ids) is None
    with open(path, "wb") as f:
        f.write(b"not parquet")
    assert load_logits(path, "key1", ids) is None


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "submission.csv"
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with atomic_output(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("whole")
    assert target.read_text() == "whole" and os.listdir(tmp_path) == ["submission.csv"]


def test_post_process_rules():
    probs = np.array([[0.5, 0.3, 0.2]] * 5)
    response_a = [["None"], ["same"], ["x"], ["None"], ["fine", "  "]]
    response_b = [["ok"], ["same"], [""], ["None"], ["also fine", "ok"]]
    original = probs.copy()
    out, rules = post_process(probs, response_a, response_b, empty_shift=0.5, identical_shift=0.4)
    assert rules == ["empty_a", "identical", "empty_b", "identical", ""]
    np.testing.assert_allclose(out[0], [0.25, 0.55, 0.2])
    np.testing.assert_allclose(out[1], [0.3, 0.18, 0.52])
    np.testing.assert_allclose(out[2], [0.65, 0.15, 0.2])
    np.testing.assert_allclose(out[4], probs[4])
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_array_equal(probs, original)  # the input is not modified
