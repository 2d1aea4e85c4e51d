"""HTML report of an evaluation: metric tables and PNG plots (reliability, confusion matrix, loss by length)."""

import html
import json
import math
import os

import numpy as np

from .io import atomic_output
from .metrics import confusion_matrix, reliability_bins, row_log_loss


UNIFORM_LOG_LOSS = math.log(3)
PLOTS = ("reliability.png", "confusion.png", "loss_by_length.png")
PLOT_TITLES = dict(zip(PLOTS, ("Reliability diagram", "Confusion matrix", "Log loss by conversation length")))
CLASS_NAMES = {"A": "model A wins", "B": "model B wins", "C": "tie"}


def class_shares(labels) -> np.ndarray:
    """Share of rows of each class (A wins, B wins, tie) among `labels` (0 / 1 / 2)."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.bincount(labels, minlength=3)[:3] / max(len(labels), 1)


def label_prior_log_loss(labels) -> float:
    """Log loss of the label prior: predicting every row's class shares (of these very rows), whatever its text.

    A model that reads the conversations must beat it; one that does not has learnt at most the class shares."""
    shares = class_shares(labels)
    present = shares > 0
    return float(-(shares[present] * np.log(shares[present])).sum())


def swap_tta_words(swap_tta: dict) -> str:
    """`metrics["swap_tta"]` as a sentence."""
    if not swap_tta or not swap_tta.get("enabled"):
        return "Swap test-time augmentation: off (each row scored once, as given)."
    weight = float(swap_tta.get("swap_weight", 0.5))
    return (f"Swap test-time augmentation: on (each row also scored with responses A and B exchanged; the final "
            f"probabilities weight the swapped pass {weight:g} and the original {1 - weight:g}).")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return path


def plot_reliability(probs, labels, path: str, num_bins: int = 10) -> str:
    """Accuracy vs top-label confidence per bin (diagonal = calibrated), with the row count of each bin."""
    plt = _pyplot()
    bins = reliability_bins(probs, labels, num_bins)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6), height_ratios=[3, 1], sharex=True)
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    filled = [b for b in bins if b["count"]]
    top.bar([(b["low"] + b["high"]) / 2 for b in filled], [b["accuracy"] for b in filled], width=1 / num_bins,
            edgecolor="black", alpha=0.75, label="accuracy")
    top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="darkred",
             label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram (top label)")
    top.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # outside: never over a bar
    bottom.bar(centers, [b["count"] for b in bins], width=1 / num_bins, edgecolor="black", color="steelblue")
    bottom.set(xlabel="confidence of the predicted class", ylabel="rows")
    return _save(fig, path)


def plot_confusion(probs, labels, path: str) -> str:
    """Counts of true vs predicted (argmax) class, annotated, with each true class's row share."""
    plt = _pyplot()
    matrix = confusion_matrix(probs, labels)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    names = ["A wins", "B wins", "tie"]
    ax.set(xticks=range(3), yticks=range(3), xticklabels=names, yticklabels=names, xlabel="predicted",
           ylabel="true", title="Confusion matrix")
    for t in range(3):
        for p in range(3):
            color = "white" if shares[t, p] > 0.6 else "black"
            ax.text(p, t, f"{matrix[t, p]}\n{shares[t, p]:.0%}", ha="center", va="center", color=color)
    fig.colorbar(image, ax=ax, label="share of the true class")
    return _save(fig, path)


def length_bins(lengths, num_bins: int = 6):
    """Quantile edges of conversation lengths (unique, so small sets get fewer bins) and each row's bin."""
    lengths = np.asarray(lengths, dtype=np.float64)
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, num_bins + 1)))
    if len(edges) < 2:
        edges = np.array([lengths.min(), lengths.min() + 1])
    index = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, len(edges) - 2)
    return edges, index


def plot_loss_by_length(probs, labels, lengths, path: str) -> str:
    """Mean log loss per quantile bin of conversation length (characters of prompts + both responses), with the
    uniform guess and the label prior of these rows as lines; row counts under the bars, the legend outside."""
    plt = _pyplot()
    losses = row_log_loss(probs, labels)
    edges, index = length_bins(lengths)
    present = [b for b in range(len(edges) - 1) if (index == b).any()]
    means = [losses[index == b].mean() for b in present]
    counts = [int((index == b).sum()) for b in present]
    names = [f"{int(edges[b])}–{int(edges[b + 1])}\nn={n}" for b, n in zip(present, counts)]  # counts under the bars
    prior = label_prior_log_loss(labels)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(present)), means, color="teal", edgecolor="black", label="model (mean per bin)")
    ax.axhline(UNIFORM_LOG_LOSS, ls="--", color="gray", label=f"uniform guess ({UNIFORM_LOG_LOSS:.4f})")
    ax.axhline(prior, ls="-.", color="darkorange", label=f"label prior of these rows ({prior:.4f})")
    ax.axhline(losses.mean(), ls=":", color="darkred", label=f"model overall ({losses.mean():.4f})")
    ax.set_xticks(range(len(present)), names, fontsize=8)
    ax.set(xlabel="conversation length (characters; n = rows in the bin)", ylabel="mean log loss",
           title="Log loss by conversation length", ylim=(0, 1.15 * max(max(means), UNIFORM_LOG_LOSS, prior)))
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # outside: never over a bar
    return _save(fig, path)


def _table(rows: dict, columns=("rows", "log_loss", "accuracy", "ece"), key_name: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (key_name, *columns))
    body = "".join(
        "<tr><td>" + html.escape(str(k)) + "</td>"
        + "".join(f"<td>{_fmt(v.get(c))}</td>" for c in columns) + "</tr>"
        for k, v in rows.items()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("" if value is None else str(value))


def _warnings(log_loss: float, prior: float) -> list[str]:
    """A plain warning when the model does no better than a baseline that ignores the conversations."""
    if log_loss <= prior:
        return []
    worse = "the uniform guess and " if log_loss > UNIFORM_LOG_LOSS else ""
    return [
        f"<p class='warning'><strong>Warning:</strong> the model's log loss ({log_loss:.4f}) is worse than "
        f"{worse}the label prior ({prior:.4f}). Predicting the class shares of these rows for every row, without "
        "reading a word of them, would score better: on these rows the model has not learnt to tell the better "
        "answer (too little training, too few rows, or a bug in labels / letters / swaps).</p>"
    ]


def write_report(out_dir: str, metrics: dict, probs, labels, lengths) -> str:
    """Render the three plots and `report.html` (metrics, per-class / per-turn / per-member tables) into `out_dir`."""
    plot_reliability(probs, labels, os.path.join(out_dir, PLOTS[0]))
    plot_confusion(probs, labels, os.path.join(out_dir, PLOTS[1]))
    plot_loss_by_length(probs, labels, lengths, os.path.join(out_dir, PLOTS[2]))
    name = "ensemble" if len(metrics.get("members", {})) > 1 else "model"
    shares = class_shares(labels)
    prior = label_prior_log_loss(labels)
    baselines = {
        name: metrics,
        "label prior (each row: these rows' class shares, A {:.0%} / B {:.0%} / tie {:.0%})".format(*shares): {
            "rows": len(labels), "log_loss": prior, "accuracy": float(shares.max())},
        "uniform guess (1/3 each)": {"rows": len(labels), "log_loss": UNIFORM_LOG_LOSS},
    }
    sections = [
        "<h2>Overall, beside two baselines that ignore the conversations</h2>",
        _table(baselines),
        *_warnings(metrics["log_loss"], prior),
        f"<p>Temperature: {_fmt(metrics['temperature']['value'])} ({html.escape(metrics['temperature']['source'])})."
        f" {html.escape(swap_tta_words(metrics.get('swap_tta')))}</p>",
        "<h2>Members</h2>",
        _table(metrics["members"], ("weight", "rows", "log_loss", "accuracy", "ece", "log_loss_no_tta"), "member"),
        "<h2>Per true class</h2>",
        _table({f"{k} ({CLASS_NAMES.get(k, k)})": v for k, v in metrics["per_class"].items()}, key_name="class"),
        "<h2>Per number of turns</h2>",
        _table(metrics.get("per_turn_count", {}), key_name="turns"),
    ]
    if metrics.get("post_processing"):
        effect = html.escape(json.dumps(metrics["post_processing"], indent=2))
        sections += ["<h2>Post-processing</h2>", f"<pre>{effect}</pre>"]
    sections += [f'<h2>{PLOT_TITLES[p]}</h2><img src="{p}" alt="{PLOT_TITLES[p]}">' for p in PLOTS]
    sections += ["<h2>All metrics</h2>", "<p>As saved in metrics.json.</p>",
                 f"<pre>{html.escape(json.dumps(metrics, indent=2))}</pre>"]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>lmsys-trl evaluation</title><style>"
        "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
        ".warning{background:#fff3cd;border:1px solid #e0a800;padding:8px}</style></head><body>"
        f"<h1>lmsys-trl evaluation</h1><p>Data: {html.escape(', '.join(metrics.get('data', [])))}</p>"
        + "".join(sections) + "</body></html>"
    )
    path = os.path.join(out_dir, "report.html")
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
    return path
