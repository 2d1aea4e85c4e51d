"""Report: the three PNG plots and report.html render from metrics and probabilities."""

import math
import re

import numpy as np
import pytest

from lmsys_trl.report import PLOTS, label_prior_log_loss, length_bins, write_report


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_metrics(probs, labels):
    import evaluate

    from lmsys_trl.arena_metric import PATH

    metric = evaluate.load(PATH)
    metrics = metric.compute(predictions=probs.tolist(), references=labels.tolist(), turns=[1] * len(labels))
    metrics["members"] = {"m1": {"weight": 0.6, **{k: metrics[k] for k in ("rows", "log_loss", "accuracy", "ece")}}}
    metrics["members"]["m2 <b>"] = dict(metrics["members"]["m1"], weight=0.4)
    metrics["temperature"] = {"value": 1.03, "source": "given"}
    metrics["swap_tta"] = {"enabled": True, "swap_weight": 0.5}
    metrics["data"] = ["val.csv"]
    return metrics


def test_write_report_renders_plots_and_html(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=120)
    labels = rng.integers(0, 3, size=120)
    lengths = rng.integers(50, 5000, size=120)
    metrics = fake_metrics(probs, labels)
    path = write_report(str(tmp_path), metrics, probs, labels, lengths)
    page = open(path, encoding="utf-8").read()
    for name in PLOTS:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
        assert f'src="{name}"' in page
    assert f"{metrics['log_loss']:.4f}" in page and "m2 &lt;b&gt;" in page  # values shown, names escaped
    assert "tie" in page and "1.0986" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*PLOTS, "report.html"])  # no temporary files left


def test_length_bins_handle_few_distinct_lengths():
    edges, index = length_bins([10, 10, 10, 10])
    assert len(edges) == 2 and (index == 0).all()
    edges, index = length_bins(list(range(100)), num_bins=4)
    assert len(edges) == 5 and np.bincount(index).tolist() == [25, 25, 25, 25]


def render(out_dir, probs, labels, **changes):
    out_dir.mkdir()
    metrics = fake_metrics(probs, labels) | changes
    path = write_report(str(out_dir), metrics, probs, labels, np.arange(len(labels)) * 10 + 50)
    return metrics, open(path, encoding="utf-8").read()


def test_label_prior_is_the_log_loss_of_predicting_the_class_shares():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    shares = np.array([0.5, 0.3, 0.2])
    expected = -np.mean(np.log(shares[labels]))  # every row predicted with the shares, scored like any model
    assert label_prior_log_loss(labels) == pytest.approx(expected)
    assert label_prior_log_loss([2, 2, 2]) == 0.0 and label_prior_log_loss([0, 1, 2]) == pytest.approx(math.log(3))


def test_report_shows_the_prior_beside_uniform_and_warns_when_the_model_is_worse(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    prior = f"{label_prior_log_loss(labels):.4f}"
    worse = rng.dirichlet(np.ones(3), size=100)  # random: worse than the prior of these skewed labels
    metrics, page = render(tmp_path / "worse", worse, labels)
    assert metrics["log_loss"] > label_prior_log_loss(labels)
    assert "label prior" in page and prior in page and "uniform guess" in page and "1.0986" in page
    assert "Warning:" in page and "worse than the uniform guess and the label prior" in page
    better = np.full((100, 3), 0.02)
    better[np.arange(100), labels] = 0.96
    _, page = render(tmp_path / "better", better, labels)
    assert "Warning:" not in page and prior in page


def test_report_headings_and_swap_tta_are_words(tmp_path):
    rng = np.random.default_rng(2)
    probs, labels = rng.dirichlet(np.ones(3), size=50), rng.integers(0, 3, size=50)
    _, page = render(tmp_path / "on", probs, labels)
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert not [h for h in headings if re.search(r"\.(png|json)\b", h)], headings  # no file names as headings
    assert {"Reliability diagram", "Confusion matrix", "Log loss by conversation length"} <= set(headings)
    assert "{" not in page.split("<pre>")[0].split("</style>")[1]  # no Python dict before the raw metrics dump
    assert "Swap test-time augmentation: on" in page and "exchanged" in page
    _, page = render(tmp_path / "off", probs, labels, swap_tta={"enabled": False, "swap_weight": 0.5})
    assert "Swap test-time augmentation: off" in page


def overlapping_texts(fig):
    """Pairs of visible, non-empty text boxes (titles, axis and tick labels, annotations, legends) that overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels()]
        boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]
        if ax.get_legend() is not None:
            boxes.append(("legend", ax.get_legend().get_window_extent(renderer)))
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


@pytest.mark.parametrize("plot", ["reliability", "confusion", "loss_by_length"])
def test_plot_labels_do_not_overlap(plot, tmp_path, monkeypatch):
    import lmsys_trl.report as report

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=300)
    probs = rng.dirichlet(np.ones(3) * 0.3, size=300)  # confident rows: bars up to the top of the axes
    lengths = rng.integers(100, 200_000, size=300)  # long tick labels
    {"reliability": lambda: report.plot_reliability(probs, labels, "r.png"),
     "confusion": lambda: report.plot_confusion(probs, labels, "c.png"),
     "loss_by_length": lambda: report.plot_loss_by_length(probs, labels, lengths, "l.png")}[plot]()
    (fig,) = figures
    assert overlapping_texts(fig) == []
    for ax in fig.axes:  # a legend sits outside the axes, over no bar, point or line
        if ax.get_legend() is not None:
            legend = ax.get_legend().get_window_extent()
            assert not legend.overlaps(ax.get_window_extent())
