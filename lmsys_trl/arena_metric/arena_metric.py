"""`evaluate` metric for LMSYS arena preference predictions (A wins / B wins / tie probabilities)."""

import datasets
import evaluate

from lmsys_trl.metrics import breakdown, summary


_DESCRIPTION = """
Multi-class log loss clipped like Kaggle's scorer (probabilities clipped to [1e-15, 1 - 1e-15], rows renormalised),
accuracy of the argmax, and top-label expected calibration error (10 equal-width bins); broken down per true class
and, when `turns` is given, per number of conversation turns (5 and more pooled as "5+").
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of [p_a, p_b, p_tie] probabilities per row.
    references: list of labels, 0 = model A wins, 1 = model B wins, 2 = tie.
    turns (optional): list of turn counts per row, for the per-turn-count breakdown.
Returns:
    rows, log_loss, accuracy, ece, per_class {A, B, C: {rows, log_loss, accuracy, ece}}[, per_turn_count {...}].
Example:
    >>> metric = evaluate.load(lmsys_trl.arena_metric.PATH)
    >>> round(metric.compute(predictions=[[0.7, 0.2, 0.1]], references=[0])["log_loss"], 4)  # -ln 0.7
    0.3567
"""

_CITATION = """
@misc{lmsys-arena-human-preference, title={LMSYS - Chatbot Arena Human Preference Predictions}, publisher={Kaggle},
year={2024}}
"""

CLASS_NAMES = ("A", "B", "C")


def turn_bucket(turns: int) -> str:
    return str(turns) if turns < 5 else "5+"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ArenaMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, turns=None):
        if any(len(p) != 3 for p in predictions):
            raise ValueError("each prediction must be 3 probabilities [p_a, p_b, p_tie]")
        if any(r not in (0, 1, 2) for r in references):
            raise ValueError("references must be labels 0 (A), 1 (B) or 2 (tie); unlabelled rows (-1) have no metric")
        result = summary(predictions, references)
        per_class = breakdown(predictions, references, references)
        result["per_class"] = {CLASS_NAMES[int(k)]: v for k, v in per_class.items()}
        if turns is not None:
            if len(turns) != len(references):
                raise ValueError(f"turns has {len(turns)} entries for {len(references)} rows")
            result["per_turn_count"] = breakdown(predictions, references, [turn_bucket(t) for t in turns])
        return result
