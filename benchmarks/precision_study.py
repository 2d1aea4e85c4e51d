"""Log loss of one (base model + adapters) scored at several precisions on the same labelled rows (issue 6, part 2).

Each precision loads the model through `model.load_model` (fp8: adapters merged, then linear layers in FP8) and scores
the rows with `scoring.score_token_rows`; the log loss (Kaggle clipping), accuracy and the paired per-row difference of
log loss against a baseline precision (mean and standard error) come out as one dict per precision.
"""

import numpy as np
from accelerate.utils.memory import clear_device_cache

from lmsys_trl.data import load_arena
from lmsys_trl.metrics import accuracy, log_loss, row_log_loss, softmax
from lmsys_trl.model import KBIT, letter_token_ids, load_model
from lmsys_trl.scoring import encode_rows, load_scoring_tokenizer, score_token_rows


def compare_precisions(base_model: str, adapters: list[str], data: str, max_length: int, precisions: list[str],
                       baseline: str, rows: int | None = None, temperature: float = 1.0, device: str = "auto",
                       token_budget: int = 8192) -> list[dict]:
    """One result per precision: log loss, accuracy, and the paired log-loss difference to `baseline`."""
    if baseline not in precisions:
        raise ValueError(f"baseline {baseline!r} must be one of the precisions {precisions}")
    dataset = load_arena([data])
    dataset = dataset.select(range(min(rows or len(dataset), len(dataset))))
    labels = np.asarray(dataset["label"])
    if (labels < 0).any():
        raise ValueError(f"{data}: the precision study needs labelled rows (winner columns)")
    tokenizer = load_scoring_tokenizer(base_model)
    token_rows = encode_rows(dataset, tokenizer, max_length)
    probs = {}
    for precision in precisions:
        model = load_model(base_model, adapters, precision, device, merge_adapters=precision not in KBIT)
        logits = score_token_rows(model, token_rows, letter_token_ids(tokenizer), tokenizer.pad_token_id,
                                  token_budget, desc=f"Scoring ({precision})")
        probs[precision] = softmax(logits, temperature)
        del model
        clear_device_cache(garbage_collection=True)
    base_losses = row_log_loss(probs[baseline], labels)
    results = []
    for precision, p in probs.items():
        delta = row_log_loss(p, labels) - base_losses
        results.append({
            "precision": precision, "baseline": baseline, "rows": len(labels), "temperature": temperature,
            "log_loss": log_loss(p, labels), "accuracy": accuracy(p, labels),
            "delta_log_loss": float(delta.mean()), "delta_log_loss_se": float(delta.std() / np.sqrt(len(delta))),
            "mean_abs_prob_diff": float(np.abs(p - probs[baseline]).mean()),
            "base_model": base_model, "adapters": adapters, "data": data, "max_length": max_length,
        })
    return results
