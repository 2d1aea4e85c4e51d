"""Log loss of one (base model + adapters) scored at several precisions / scoring variants on the same labelled rows
(issue 6, part 2; issue 17: which FP8 is faithful).

A plain precision loads the model through `model.load_model` (adapters merged; fp8: linear layers in FP8) and scores
the rows in padded batches, uncompiled. A named variant is a set of `scripts/eval.py` scoring keys (as in
`benchmark.py infer`: precision, pack_rows, compile_layers, ...; unset keys take eval's defaults for the device) plus
the FP8 keys of `model.prepare_for_scoring` (`fp8_keep`, `fp8_keep_fraction` with a calibration pass on the first rows,
`fp8_fast_accum`). The log loss (Kaggle clipping), accuracy and the paired per-row difference of log loss against a
baseline (mean and standard error) come out as one dict per precision / variant; with `swap_tta` each row is also
scored A/B-swapped and the two averaged, as `scripts/eval.py --swap_tta true` does.
"""

import time

import numpy as np
import torch
from accelerate.utils.memory import clear_device_cache

from lmsys_trl.data import load_arena
from lmsys_trl.metrics import accuracy, log_loss, row_log_loss
from lmsys_trl.model import KBIT, letter_token_ids, load_model
from lmsys_trl.scoring import encode_rows, letter_probs, load_scoring_tokenizer, score_token_rows


def _variant_model(base_model, adapters, overrides: dict, device: str, rows, pad_token_id):
    """(model, settings) of a named variant, loaded as `scripts/eval.py` loads it."""
    from infer_bench import fp8_options, load_trained_model, scoring_settings

    settings = scoring_settings(overrides, device)
    model = load_trained_model(base_model, adapters, {**settings, "fp8": fp8_options(overrides, rows, pad_token_id)},
                               device)
    return model, settings


def compare_precisions(base_model: str, adapters: list[str], data: str, max_length: int, precisions: list[str],
                       baseline: str, rows: int | None = None, temperature: float = 1.0, device: str = "auto",
                       token_budget: int = 8192, variants: dict | None = None, swap_tta: bool = False) -> list[dict]:
    """One result per precision, then per named variant: log loss, accuracy, the paired log-loss difference to
    `baseline` (a precision or a variant name), seconds of scoring (compilation included)."""
    from lmsys_trl.model import resolve_device

    variants = variants or {}
    if baseline not in precisions and baseline not in variants:
        raise ValueError(f"baseline {baseline!r} must be one of the precisions {precisions} or variants")
    device = resolve_device(device)
    dataset = load_arena([data])
    dataset = dataset.select(range(min(rows or len(dataset), len(dataset))))
    labels = np.asarray(dataset["label"])
    if (labels < 0).any():
        raise ValueError(f"{data}: the precision study needs labelled rows (winner columns)")
    tokenizer = load_scoring_tokenizer(base_model)
    letter_ids = letter_token_ids(tokenizer)
    token_rows = encode_rows(dataset, tokenizer, max_length)
    parts = [token_rows, encode_rows(dataset, tokenizer, max_length, swapped=True)] if swap_tta else [token_rows]
    runs = [(p, {"precision": p}, None) for p in precisions] + [(n, o, o) for n, o in variants.items()]
    probs, info = {}, {}
    for name, overrides, variant in runs:
        start = time.perf_counter()
        if variant is None:
            model = load_model(base_model, adapters, name, device, merge_adapters=name not in KBIT)
            settings = {"precision": name, "pack_rows": False, "token_budget": token_budget, "max_batch_size": None}
        else:
            model, settings = _variant_model(base_model, adapters, variant, device, token_rows, tokenizer.pad_token_id)
        logits = [
            score_token_rows(model, part, letter_ids, tokenizer.pad_token_id, settings["token_budget"],
                             settings["max_batch_size"], desc=f"Scoring ({name})", pack=settings["pack_rows"])
            for part in parts
        ]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        info[name] = {"seconds": round(time.perf_counter() - start, 2), "overrides": overrides,
                      "settings": settings,
                      "fp8_layers": sum(type(m).__name__ == "Float8Linear" for m in model.modules())}
        probs[name] = letter_probs(logits[0], temperature, logits[1] if swap_tta else None)
        del model
        clear_device_cache(garbage_collection=True)
    base_losses = row_log_loss(probs[baseline], labels)
    results = []
    for name, p in probs.items():
        delta = row_log_loss(p, labels) - base_losses
        results.append({
            "precision": info[name]["settings"]["precision"], "variant": name, "baseline": baseline,
            "rows": len(labels), "temperature": temperature, "swap_tta": swap_tta,
            "log_loss": log_loss(p, labels), "accuracy": accuracy(p, labels),
            "delta_log_loss": float(delta.mean()), "delta_log_loss_se": float(delta.std() / np.sqrt(len(delta))),
            "mean_abs_prob_diff": float(np.abs(p - probs[baseline]).mean()),
            "max_abs_prob_diff": float(np.abs(p - probs[baseline]).max()),
            **info[name], "base_model": base_model, "adapters": adapters, "data": data, "max_length": max_length,
        })
    return results
