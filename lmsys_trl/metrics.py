"""Preference metrics on A/B/C probabilities: Kaggle-clipped multi-class log loss and accuracy."""

import numpy as np


EPS = 1e-15  # Kaggle clips probabilities to [eps, 1 - eps] and renormalises rows


def log_loss(probs, labels, eps: float = EPS) -> float:
    """Mean multi-class log loss, clipped and renormalised like Kaggle's scorer."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    labels = np.asarray(labels, dtype=np.int64)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def accuracy(probs, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(probs), axis=1) == np.asarray(labels)))


def softmax(logits, temperature: float = 1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
