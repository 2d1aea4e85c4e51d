"""Scoring throughput of named variants (the reference recipe vs `scripts/eval.py`'s defaults), same rows, same weights.

A variant is a set of `EvalArguments` scoring keys (`SCORING_KEYS`) over their defaults; each one scores the real
length mix (the inference prompts of an arena file) with `score.score_token_rows`, the function `scripts/eval.py`
runs, on a random-weight model of a real shape (seed 0, so every variant has the same base weights) with a random
LoRA-shaped adapter (r 32 / alpha 64 on q, k, v, o; seed 1) left unmerged, as `score.load_model` leaves it.
Untimed warm-up passes come first (compilation); `max_abs_prob_diff` compares the variant's A/B/C probabilities with a
plain unbatched full forward of the same model (`score.reference_letter_logits`).
"""

import gc
import tempfile
import time
from dataclasses import fields

import numpy as np
import torch

from ..evaluation import EvalArguments
from ..metrics import softmax
from ..score import load_kwargs, reference_letter_logits, score_token_rows, scoring_attention_kwargs


SCORING_KEYS = ("precision", "attn_implementation", "attn_softcapping", "token_budget", "max_batch_size", "pack_rows")
# The 38th-place recipe's scoring: 4-bit base + LoRA, eager attention, batches of 4 length-sorted left-padded rows,
# last-token logits.
REFERENCE = {"precision": "4bit", "attn_implementation": "eager", "max_batch_size": 4, "token_budget": 1 << 30,
             "pack_rows": False}
LORA = dict(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def scoring_settings(overrides: dict) -> dict:
    """`SCORING_KEYS` at their `EvalArguments` defaults, with `overrides` (unknown keys are an error)."""
    unknown = set(overrides) - set(SCORING_KEYS)
    if unknown:
        raise ValueError(f"unknown scoring keys {sorted(unknown)}; variants may set {', '.join(SCORING_KEYS)}")
    defaults = {f.name: f.default for f in fields(EvalArguments) if f.name in SCORING_KEYS}
    return {**defaults, **overrides}


def effective_precision(precision: str, device: str) -> str:
    """The precision a variant runs at: 'auto' as `scripts/eval.py` resolves it; k-bit falls back to fp32 off CUDA."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision in ("4bit", "8bit") and not device.startswith("cuda"):
        print(f"precision {precision} needs CUDA (bitsandbytes): this run uses fp32", flush=True)
        return "fp32"
    return precision


def build_scoring_model(shape: str, tokenizer, settings: dict, device: str, num_layers: int | None = None):
    """Random-weight model of `shape` at the variant's precision and attention, with a random unmerged LoRA adapter;
    returns (model, precision used)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ..shapes import model_config
    from .train_bench import quantize_nf4

    precision = effective_precision(settings["precision"], device)
    if precision == "8bit":
        raise ValueError("precision 8bit: the benchmark quantizes random weights in place for 4bit only")
    config = model_config(shape, tokenizer, num_layers)
    with tempfile.TemporaryDirectory() as folder:  # the attention choice reads a saved config, as for a real model
        config.save_pretrained(folder)
        attention = scoring_attention_kwargs(folder, settings["attn_implementation"], settings["attn_softcapping"])
    attn_implementation = attention.pop("attn_implementation")
    for key, value in attention.items():  # config overrides (softcapping off)
        setattr(config, key, value)
    dtype = load_kwargs(precision, device)["dtype"] if precision != "4bit" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if precision == "4bit":
        quantize_nf4(model)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False, task_type="CAUSAL_LM"))
    return model.eval(), precision


def _synchronized_clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def run_variant(name: str, overrides: dict, shape: str, tokenizer, rows: list[list[int]], passes: int = 1,
                warmup_passes: int = 1, parity_rows: int = 32, num_layers: int | None = None) -> dict:
    """Score `rows` `warmup_passes` (untimed) + `passes` (timed) times under one variant; its measured numbers."""
    from ..model import letter_token_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = scoring_settings(overrides)
    model, precision = build_scoring_model(shape, tokenizer, settings, device, num_layers)
    letter_ids = letter_token_ids(tokenizer)

    def score():
        return score_token_rows(
            model, rows, letter_ids, tokenizer.pad_token_id, settings["token_budget"], settings["max_batch_size"],
            desc=name, pack=settings["pack_rows"],
        )

    for _ in range(warmup_passes):
        score()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = _synchronized_clock(device)
    for _ in range(passes):
        logits = score()
    seconds = _synchronized_clock(device) - start
    checked = rows[:parity_rows]
    plain = np.stack([reference_letter_logits(model, ids, letter_ids).cpu().numpy() for ids in checked])
    tokens = passes * sum(map(len, rows))
    result = {
        "variant": name,
        "tokens_per_s": round(tokens / seconds, 1),
        "rows_per_s": round(passes * len(rows) / seconds, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None,
        "max_abs_prob_diff": float(np.abs(softmax(logits[: len(checked)]) - softmax(plain)).max()),
        "parity_rows": len(checked),
        "precision": precision,
        "seconds": round(seconds, 3),
        "timed_tokens": tokens,
        "timed_rows": passes * len(rows),
        "settings": settings,
        "overrides": overrides,
    }
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result
