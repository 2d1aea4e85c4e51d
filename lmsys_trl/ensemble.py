"""Ensembles of scored members: probabilities combined by weight, weights and temperature fitted, post-processing."""

import math

import numpy as np

from .metrics import log_loss


def combine(member_probs, weights) -> np.ndarray:
    """Weighted average of (N, 3) probability arrays."""
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights, np.stack(member_probs), axes=1)


def fit_weights(member_probs, labels, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Mixture weights (non-negative, sum 1) minimising the log loss of the weighted average.

    EM for mixture proportions: the objective is convex in the weights and every step keeps them on the simplex.
    """
    labels = np.asarray(labels)
    # p[m, i]: member m's probability of row i's true class
    p = np.stack([np.asarray(m)[np.arange(len(labels)), labels] for m in member_probs]).clip(1e-15)
    weights = np.full(len(p), 1.0 / len(p))
    for _ in range(max_iter):
        responsibility = weights[:, None] * p
        updated = (responsibility / responsibility.sum(axis=0, keepdims=True)).mean(axis=1)
        if np.abs(updated - weights).max() < tol:
            return updated
        weights = updated
    return weights


def minimise_scalar(f, low: float, high: float, tol: float = 1e-5) -> float:
    """Golden-section search for the minimum of a unimodal `f` on [low, high]."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(probs_at, labels, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T minimising log loss of `probs_at(T)` (searched on log T over [low, high])."""
    log_t = minimise_scalar(lambda x: log_loss(probs_at(math.exp(x)), labels), math.log(low), math.log(high))
    return math.exp(log_t)


def ensemble_probs(member_logits: dict, weights, temperature: float, swap_weight: float, tta: bool = True):
    """(per-member probabilities, weighted ensemble) at `temperature`; `member_logits`: {name: (logits, swapped
    logits or None)}."""
    from .scoring import letter_probs

    probs = {
        name: letter_probs(logits, temperature, swapped if tta else None, swap_weight)
        for name, (logits, swapped) in member_logits.items()
    }
    return probs, combine(list(probs.values()), weights)


def calibrate(args, member_logits: dict, labels, weights) -> tuple[float, np.ndarray]:
    """Temperature and weights as `args` (`EvalArguments`) asks: fitted on the labelled rows among `labels`
    (alternating when both are fitted), else the given ones."""
    temperature = args.temperature
    if not (args.fit_temperature or args.fit_weights):
        return temperature, weights
    keep = np.asarray(labels) >= 0
    if not keep.any():
        raise ValueError("fitting temperature / weights needs labelled rows: give --fit_data or labelled --data")
    labels = np.asarray(labels)[keep]
    member_logits = {n: (lg[keep], None if sw is None else sw[keep]) for n, (lg, sw) in member_logits.items()}
    for _ in range(3 if args.fit_temperature and args.fit_weights else 1):
        if args.fit_temperature:
            temperature = fit_temperature(
                lambda t: ensemble_probs(member_logits, weights, t, args.swap_weight, args.swap_tta)[1], labels
            )
        if args.fit_weights and len(member_logits) > 1:
            probs, _ = ensemble_probs(member_logits, weights, temperature, args.swap_weight, args.swap_tta)
            weights = fit_weights(list(probs.values()), labels)
    return temperature, weights


def is_empty_response(turns) -> bool:
    """Every turn of a response is null/empty (the loader writes those as the text 'None') or whitespace."""
    return all(t.strip() in ("", "None") for t in turns)


def post_process(probs, response_a, response_b, empty_shift: float = 0.5, identical_shift: float = 0.5):
    """Move probability for rows with an empty or duplicated response; returns (new probs, per-row rule).

    A side whose response is empty gives `empty_shift` of its probability to the other side; identical responses
    (both empty included) give `identical_shift` of P(A) + P(B) to the tie. Rules: "", "empty_a", "empty_b",
    "identical".
    """
    probs = np.array(probs, dtype=np.float64)
    rules = []
    for i, (a, b) in enumerate(zip(response_a, response_b)):
        empty_a, empty_b = is_empty_response(a), is_empty_response(b)
        if list(a) == list(b) or (empty_a and empty_b):
            moved = identical_shift * probs[i, :2]
            probs[i, :2] -= moved
            probs[i, 2] += moved.sum()
            rules.append("identical")
        elif empty_a or empty_b:
            src, dst = (0, 1) if empty_a else (1, 0)
            moved = empty_shift * probs[i, src]
            probs[i, src] -= moved
            probs[i, dst] += moved
            rules.append("empty_a" if empty_a else "empty_b")
        else:
            rules.append("")
    return probs, rules
