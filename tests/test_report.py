"""Report: the three PNG plots and report.html render from metrics and probabilities."""

import numpy as np

from lmsys_trl.report import PLOTS, length_bins, write_report


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
