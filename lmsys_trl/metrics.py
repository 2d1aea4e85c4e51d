"""Preference metrics on A/B/C probabilities: Kaggle-clipped multi-class log loss and accuracy."""

import numpy as np


EPS = 1e-15  # Kaggle clips probabilities to [eps, 1 - eps] and renormalises rows


def row_log_loss(probs, labels, eps: float = EPS) -> np.ndarray:
    """Per-row -log p(label), probabilities clipped and renormalised like Kaggle's scorer."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    labels = np.asarray(labels, dtype=np.int64)
    return -np.log(p[np.arange(len(labels)), labels])


def log_loss(probs, labels, eps: float = EPS) -> float:
    """Mean multi-class log loss, clipped and renormalised like Kaggle's scorer."""
    return float(np.mean(row_log_loss(probs, labels, eps)))


def accuracy(probs, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(probs), axis=1) == np.asarray(labels)))


def softmax(logits, temperature: float = 1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def reliability_bins(probs, labels, num_bins: int = 10) -> list[dict]:
    """Equal-width bins of top-label confidence: row count, mean confidence and accuracy (None when empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    bins = []
    for b in range(num_bins):
        rows = which == b
        bins.append(
            {
                "low": b / num_bins,
                "high": (b + 1) / num_bins,
                "count": int(rows.sum()),
                "confidence": float(confidence[rows].mean()) if rows.any() else None,
                "accuracy": float(correct[rows].mean()) if rows.any() else None,
            }
        )
    return bins


def expected_calibration_error(probs, labels, num_bins: int = 10) -> float:
    """Top-label ECE: |accuracy - confidence| per confidence bin, weighted by the bin's share of rows."""
    bins = [b for b in reliability_bins(probs, labels, num_bins) if b["count"]]
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins))


def confusion_matrix(probs, labels, num_classes: int = 3):
    """Counts[true, predicted] of the argmax prediction."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(probs).argmax(axis=1)), 1)
    return matrix


def summary(probs, labels) -> dict:
    """Row count, log loss, accuracy and ECE of one set of rows."""
    return {
        "rows": int(len(labels)),
        "log_loss": log_loss(probs, labels),
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels),
    }


def breakdown(probs, labels, groups) -> dict:
    """`summary` per group value (e.g. the true class or the number of turns), keys sorted."""
    probs, labels, groups = np.asarray(probs), np.asarray(labels), np.asarray(groups)
    return {str(g): summary(probs[groups == g], labels[groups == g]) for g in sorted(set(groups.tolist()))}
