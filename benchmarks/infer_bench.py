"""Scoring throughput of named variants (the reference recipe vs `scripts/eval.py`'s defaults), same rows and weights.

A variant is a set of `EvalArguments` scoring keys (`SCORING_KEYS`) over their defaults; each one scores the real
length mix (the inference prompts of an arena file) with `scoring.score_token_rows`, the function `scripts/eval.py`
runs, on a model built for the variant's settings: a random-weight model of a real shape (`build_scoring_model`:
seed 0, so every variant has the same base weights, with a random LoRA-shaped adapter, r 32 / alpha 64 on q, k, v, o,
seed 1) or a real trained model + adapters (`load_trained_model`, through `model.load_model` as `scripts/eval.py`).
Untimed warm-up passes come first (compilation); `max_abs_prob_diff` (and `mean_abs_prob_diff`, over rows and letters)
compares the variant's A/B/C probabilities with a plain unbatched full forward of the same model
(`scoring.plain_letter_logits`).
"""

import tempfile
import time
from dataclasses import fields

import numpy as np
import torch
from accelerate.utils.memory import clear_device_cache

from lmsys_trl import kernels
from lmsys_trl.evaluation import SCORING_KEYS, EvalArguments, resolve_scoring
from lmsys_trl.kernels import attention_kwargs
from lmsys_trl.metrics import softmax
from lmsys_trl.model import KBIT, LOAD_DTYPES, letter_token_ids, load_model, prepare_for_scoring
from lmsys_trl.scoring import calibration_forward, plain_forward, plain_letter_logits, score_token_rows


# The 38th-place recipe's scoring: 4-bit base + LoRA, eager attention, batches of 4 length-sorted left-padded rows,
# last-token logits.
REFERENCE = {"precision": "4bit", "attn_implementation": "eager", "max_batch_size": 4, "token_budget": 1 << 30,
             "pack_rows": False, "merge_adapters": False, "compile_layers": False}
LORA = dict(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
# benchmark-only variant keys: also score the A/B-swapped rows in every pass; `model.prepare_for_scoring`'s FP8 options
# (fp8_keep_fraction calibrates on the first rows); the flex kernel's tile options for head_dim 256 ({}: PyTorch's own)
BENCH_KEYS = ("swap_tta", "fp8_keep", "fp8_keep_fraction", "fp8_fast_accum", "flex_kernel_options")
FP8_KEYS = ("fp8_keep", "fp8_keep_fraction", "fp8_fast_accum")


def scoring_settings(overrides: dict, device: str) -> dict:
    """`SCORING_KEYS` at their `EvalArguments` defaults with `overrides`, resolved for `device` as `scripts/eval.py`
    resolves them (k-bit falls back to fp32 off CUDA); unknown keys are an error."""
    unknown = set(overrides) - set(SCORING_KEYS) - set(BENCH_KEYS)
    if unknown:
        allowed = ", ".join(SCORING_KEYS + BENCH_KEYS)
        raise ValueError(f"unknown scoring keys {sorted(unknown)}; variants may set {allowed}")
    defaults = {f.name: f.default for f in fields(EvalArguments) if f.name in SCORING_KEYS}
    settings = resolve_scoring({**defaults, **{k: v for k, v in overrides.items() if k in SCORING_KEYS}}, device)
    if settings["precision"] in KBIT and not device.startswith("cuda"):
        print(f"precision {settings['precision']} needs CUDA (bitsandbytes): this run uses fp32", flush=True)
        settings["precision"] = "fp32"
    return settings


def fp8_options(overrides: dict, rows: list[list[int]], pad_token_id: int) -> dict:
    """`model.prepare_for_scoring`'s FP8 keyword arguments from a variant's keys (calibrating on `rows`)."""
    fp8 = {k: tuple(v) if k == "fp8_keep" else v for k, v in overrides.items() if k in FP8_KEYS}
    if fp8.get("fp8_keep_fraction"):
        fp8["calibrate"] = calibration_forward(rows, pad_token_id)
    return fp8


def build_scoring_model(shape: str, tokenizer, settings: dict, device: str, num_layers: int | None = None):
    """Random-weight model of `shape` with a random LoRA adapter, at the variant's (resolved) settings and made ready
    by `model.prepare_for_scoring`, as `model.load_model` does for real weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shapes import model_config
    from train_bench import quantize_nf4

    precision = settings["precision"]
    if precision == "8bit":
        raise ValueError("precision 8bit: the benchmark quantizes random weights in place for 4bit only")
    config = model_config(shape, tokenizer, num_layers)
    with tempfile.TemporaryDirectory() as folder:  # the attention choice reads a saved config, as for a real model
        config.save_pretrained(folder)
        attention = attention_kwargs(folder, settings["attn_implementation"], softcapping=settings["attn_softcapping"])
    attn_implementation = attention.pop("attn_implementation")
    for key, value in attention.items():  # config overrides (softcapping off)
        setattr(config, key, value)
    dtype = LOAD_DTYPES.get(precision, torch.bfloat16)  # 4bit: a bf16 model quantised in place below
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if precision == "4bit":
        quantize_nf4(model)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False, task_type="CAUSAL_LM"))
    return prepare_for_scoring(model, precision, settings["merge_adapters"], settings["compile_layers"],
                               **settings.get("fp8", {}))


def load_trained_model(base_model: str, adapters: list[str], settings: dict, device: str):
    """A real base model + LoRA adapters loaded by `model.load_model` (as `scripts/eval.py` loads it) at the variant's
    resolved settings."""
    return load_model(
        base_model, adapters, settings["precision"], device, settings["attn_implementation"],
        attn_softcapping=settings["attn_softcapping"], merge_adapters=settings["merge_adapters"],
        compile_layers=settings["compile_layers"], **settings.get("fp8", {}),
    )


def _synchronized_clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def run_variant(name: str, overrides: dict, build_model, tokenizer, rows: list[list[int]], passes: int = 1,
                warmup_passes: int = 1, parity_rows: int = 32, swapped_rows: list[list[int]] | None = None) -> dict:
    """Score `rows` (and `swapped_rows` too with the variant key `swap_tta`) `warmup_passes` (untimed) + `passes`
    (timed) times under one variant, on `build_model(settings, device)` (e.g. a partial of `build_scoring_model` or
    `load_trained_model`); its measured numbers. `rows_per_s` counts arena rows (a row and its swap: one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = scoring_settings(overrides, device)
    tta = bool(overrides.get("swap_tta"))
    if tta and swapped_rows is None:
        raise ValueError(f"variant {name}: swap_tta needs the swapped rows")
    fp8 = fp8_options(overrides, rows, tokenizer.pad_token_id)
    flex_options = kernels.LARGE_HEAD_KERNEL_OPTIONS
    if "flex_kernel_options" in overrides:
        kernels.LARGE_HEAD_KERNEL_OPTIONS = overrides["flex_kernel_options"]
    try:
        model = build_model({**settings, "fp8": fp8}, device)
        result = _measure(name, overrides, settings, model, tokenizer, rows, passes, warmup_passes, parity_rows,
                          swapped_rows, device)
    finally:
        kernels.LARGE_HEAD_KERNEL_OPTIONS = flex_options
    result["fp8_layers"] = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    model = None  # free the GPU memory before the next variant
    clear_device_cache(garbage_collection=True)
    return result


def _measure(name, overrides, settings, model, tokenizer, rows, passes, warmup_passes, parity_rows, swapped_rows,
             device) -> dict:
    tta = bool(overrides.get("swap_tta"))
    letter_ids = letter_token_ids(tokenizer)

    def score():
        logits = [
            score_token_rows(
                model, part, letter_ids, tokenizer.pad_token_id, settings["token_budget"],
                settings["max_batch_size"], desc=name, pack=settings["pack_rows"],
            )
            for part in ([rows, swapped_rows] if tta else [rows])
        ]
        return logits[0]

    for _ in range(warmup_passes):
        score()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = _synchronized_clock(device)
    for _ in range(passes):
        logits = score()
    seconds = _synchronized_clock(device) - start
    checked = rows[:parity_rows]
    with plain_forward(model):
        plain = plain_letter_logits(model, checked, letter_ids)
    prob_diff = np.abs(softmax(logits[: len(checked)]) - softmax(plain))
    tokens = passes * (sum(map(len, rows)) + (sum(map(len, swapped_rows)) if tta else 0))
    rows_per_s = passes * len(rows) / seconds
    result = {
        "variant": name,
        "tokens_per_s": round(tokens / seconds, 1),
        "rows_per_s": round(rows_per_s, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None,
        "max_abs_prob_diff": float(prob_diff.max()),
        "mean_abs_prob_diff": float(prob_diff.mean()),
        "parity_rows": len(checked),
        "precision": settings["precision"],
        "swap_tta": tta,
        "projected_s_25k_rows": round(25_000 / rows_per_s, 1),
        "seconds": round(seconds, 3),
        "timed_tokens": tokens,
        "timed_rows": passes * len(rows),
        "settings": settings,
        "overrides": overrides,
    }
    return result
