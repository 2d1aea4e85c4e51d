"""Score arena rows with a (base model + LoRA adapters): A/B/C letter logits at the answer position, swap TTA.

Each row is the training prompt in inference mode (`formatting.comparison_text(mode="infer")`) rendered by the chat
template up to the assistant turn, so the next token is the answer letter. Two paths, results in input order:
- padded (default): rows length-sorted into batches under a token budget, left-padded with explicit position ids;
- packed (`pack=True`): rows packed first-fit-decreasing into flat sequences of exactly `token_budget` tokens
  (`lmsys_trl.fast.PackingCollator`: position ids restart at each row, no attention mask, so transformers builds the
  packed-document mask), the backbone run once per sequence.
Either way only each row's last hidden state meets the LM head, and only its three letter rows, in fp32
(`distill.letter_logits_from_hidden(fp32_head=True)`).
Before scoring, `prepare_for_scoring` merges the LoRA adapters into the base, quantises its linear layers to FP8 for
`precision="fp8"` and compiles the decoder layers, as `resolve_scoring` settles for the device.
"""

import importlib.util
import logging
import os
from contextlib import contextmanager
from itertools import accumulate

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import swap_row
from .distill import causal_lm_of, letter_logits_from_hidden
from .formatting import chat_token_ids, format_example
from .metrics import softmax
from .model import attention_kwargs, letter_token_ids, load_tokenizer


logger = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8", "8bit", "4bit")
KBIT = ("8bit", "4bit")  # bitsandbytes bases: adapters stay unmerged
# fp8 loads in bf16 and is quantised by `prepare_for_scoring`
LOAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
# Scoring settings (`EvalArguments` fields) and what `resolve_scoring` makes of their "auto" (None) values.
SCORING_KEYS = ("precision", "attn_implementation", "attn_softcapping", "token_budget", "max_batch_size", "pack_rows",
                "merge_adapters", "compile_layers")
PACKED_TOKEN_BUDGET, PADDED_TOKEN_BUDGET = 16384, 8192
SWAP_BACK = [1, 0, 2]  # probabilities of a swapped row, reordered to the original A/B


# ----------------------------------------------------------------------------------------------- model loading


def same_model(trained_on: str | None, base_model: str) -> bool:
    """Whether an adapter's recorded base model names `base_model`: equal ids, the same local path, or equal
    final path components (a hub id and a local copy of it, e.g. `google/gemma-2-9b-it` and `/models/gemma-2-9b-it`).
    """
    if not trained_on:
        return True  # nothing recorded: nothing to check
    a, b = trained_on.rstrip("/\\"), base_model.rstrip("/\\")
    if a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)):
        return True
    return os.path.basename(a).lower() == os.path.basename(b).lower()


def check_adapter_base(adapter: str, base_model: str, allow_mismatch: bool = False) -> None:
    """Raise a clear error when `adapter` was trained on another base model than `base_model`."""
    from peft import PeftConfig

    try:
        trained_on = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    except Exception as err:
        raise ValueError(
            f"{adapter}: not a LoRA adapter (no readable adapter_config.json): {type(err).__name__}: {err}"
        ) from None
    if same_model(trained_on, base_model):
        return
    message = f"adapter {adapter} was trained on base model '{trained_on}', but --base_model is '{base_model}'"
    if not allow_mismatch:
        raise ValueError(f"{message}; pass the matching --base_model, or --allow_base_mismatch true to use it anyway")
    logger.warning("%s (allowed by --allow_base_mismatch)", message)


def auto_precision(precision: str, device: str) -> str:
    """'auto' -> fp8 on a GPU with FP8 tensor cores (compute capability >= 8.9: H100, L4, ...), bf16 on older GPUs,
    fp32 on the CPU; other values unchanged. (FP8 is the fastest precision that lost no log loss against the reference
    recipe's 4-bit scoring: docs/benchmarks.md, "Precision and log loss".)"""
    if precision != "auto":
        return precision
    if not device.startswith("cuda"):
        return "fp32"
    fp8_cores = torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)
    return "fp8" if fp8_cores else "bf16"


def load_kwargs(precision: str, device: str) -> dict:
    """`from_pretrained` kwargs: fp32 / bf16 / fp16 (fp8: bf16), or bitsandbytes 8-bit / 4-bit (nf4, double quant)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    precision = auto_precision(precision, device)
    if precision in LOAD_DTYPES:
        return {"dtype": LOAD_DTYPES[precision]}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"precision {precision} needs bitsandbytes (`pip install lmsys-trl[quantization]`, CUDA only); "
            "use --precision bf16 or fp32 on this machine"
        )
    from transformers import BitsAndBytesConfig

    if precision == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return {"dtype": torch.bfloat16, "quantization_config": quantization, "device_map": {"": device}}


def process_state():
    """accelerate's state of this process: several under `accelerate launch` (gloo on CPU, NCCL on GPUs)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_scoring(settings: dict, device: str) -> dict:
    """`SCORING_KEYS` settings with their automatic values settled for `device`: on a GPU rows are packed into
    sequences of `PACKED_TOKEN_BUDGET` tokens scored with the compiled flex kernel and compiled decoder layers at
    `auto_precision`'s precision (fp8 on an H100); on the CPU, fp32 padded batches of `PADDED_TOKEN_BUDGET` tokens.
    Explicit values are kept, except that adapters are never merged into a k-bit base."""
    resolved = {key: settings.get(key) for key in SCORING_KEYS}
    cuda = device.startswith("cuda")
    resolved["precision"] = auto_precision(resolved["precision"] or "auto", device)
    if resolved["pack_rows"] is None:
        resolved["pack_rows"] = cuda and resolved["max_batch_size"] is None
    if resolved["token_budget"] is None:
        resolved["token_budget"] = PACKED_TOKEN_BUDGET if resolved["pack_rows"] else PADDED_TOKEN_BUDGET
    if resolved["attn_implementation"] is None and cuda and resolved["pack_rows"]:
        from .fast import FLEX_ATTENTION

        resolved["attn_implementation"] = FLEX_ATTENTION
    if resolved["compile_layers"] is None:
        resolved["compile_layers"] = cuda and resolved["pack_rows"]  # one fixed shape: one compilation
    if resolved["attn_softcapping"] is None:
        resolved["attn_softcapping"] = True
    resolved["merge_adapters"] = resolved["merge_adapters"] is not False and resolved["precision"] not in KBIT
    return resolved


def prepare_for_scoring(model, precision: str, merge_adapters: bool = True, compile_layers: bool = False):
    """The model as it is scored: LoRA adapters merged into the base (always for fp8), linear layers in FP8 for
    `precision="fp8"`, decoder layers compiled; returns the (possibly unwrapped) model in eval mode."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and (merge_adapters or precision == "fp8"):
        if precision in KBIT:
            raise ValueError(f"LoRA adapters cannot be merged into a {precision} base; score them unmerged")
        model = model.merge_and_unload()
    if precision == "fp8":
        from .fp8 import check_fp8_device, quantize_linear_layers

        check_fp8_device(model_device(model))
        quantize_linear_layers(model)
    if compile_layers:
        from .model import compile_decoder_layers

        compile_decoder_layers(model)
    return model.eval()


def resolve_device(device: str = "auto") -> str:
    """'auto': this process's GPU (cuda:<local rank>) when there is one, else the CPU."""
    if device == "auto":
        return f"cuda:{process_state().local_process_index}" if torch.cuda.is_available() else "cpu"
    return device


def load_model(
    base_model: str,
    adapters: list[str],
    precision: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    allow_base_mismatch: bool = False,
    trust_remote_code: bool = False,
    attn_softcapping: bool = True,
    merge_adapters: bool = False,
    compile_layers: bool = False,
):
    """Base model (local path or hub id) at `precision`, with LoRA adapters applied together, then
    `prepare_for_scoring` (merge, FP8, compile); eval mode.

    Several adapters are stacked: all of them are active at once (their weight deltas add up).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    for adapter in adapters:
        check_adapter_base(adapter, base_model, allow_base_mismatch)
    kwargs = load_kwargs(precision, device)
    precision = auto_precision(precision, device)
    model = AutoModelForCausalLM.from_pretrained(
        base_model,
        **scoring_attention_kwargs(base_model, attn_implementation, attn_softcapping),
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if "device_map" not in kwargs:
        model.to(device)
    names = [f"adapter{i}" for i in range(len(adapters))]
    for i, (name, adapter) in enumerate(zip(names, adapters)):
        if i == 0:
            model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
        else:
            model.load_adapter(adapter, adapter_name=name)
    if len(adapters) > 1:
        model.base_model.set_adapter(names)
    return prepare_for_scoring(model, precision, merge_adapters, compile_layers)


def scoring_attention_kwargs(base_model: str, attn_implementation: str | None, softcapping: bool = True) -> dict:
    """`model.attention_kwargs`, registering the compiled flex kernel of `lmsys_trl.fast` first when it is asked for
    (`--attn_implementation lmsys_flex`: softcap score_mod, packed-row block mask)."""
    if attn_implementation is not None:  # only then pay for importing the training module (TRL)
        from .fast import FLEX_ATTENTION, register_flex_attention

        if attn_implementation == FLEX_ATTENTION:
            register_flex_attention()
    return attention_kwargs(base_model, attn_implementation, softcapping=softcapping)


# ----------------------------------------------------------------------------------------------- encoding


def encode_rows(dataset, tokenizer, max_length: int, swapped: bool = False) -> list[list[int]]:
    """Token ids of each arena row's inference prompt (A/B exchanged when `swapped`), in input order.

    A plain loop over `formatting.format_example`: a `datasets.map` would hash the tokenizer for its fingerprint,
    which costs more than formatting a few thousand rows.
    """
    rows = []
    for row in tqdm(dataset, desc=f"Formatting{' swapped' if swapped else ''} rows (max_length={max_length})"):
        record = format_example(swap_row(row) if swapped else row, tokenizer, max_length, "infer")
        rows.append(chat_token_ids(tokenizer, record))
    return rows


def length_sorted_batches(lengths, token_budget: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Row indices grouped longest-first so that rows x padded width <= `token_budget` (a longer row goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        full = current and (
            (len(current) + 1) * lengths[current[0]] > token_budget
            or (max_batch_size is not None and len(current) >= max_batch_size)
        )
        if full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------- forward passes


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def batch_letter_logits(model, rows: list[list[int]], letter_ids: list[int], pad_token_id: int) -> torch.Tensor:
    """(rows, 3) float32 logits of the letters at each row's last position: left padding, the head at the last one."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    device = model_device(model)
    causal_lm = causal_lm_of(model)
    hidden = causal_lm.base_model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
    ).last_hidden_state
    return letter_logits_from_hidden(causal_lm, hidden[:, -1], letter_ids, fp32_head=True)


@contextmanager
def plain_forward(model, attention: str = "eager"):
    """The model with its decoder layers uncompiled and `attention` kernel while inside: the reference forward of the
    parity checks (rows of any length, no recompilation), restored on exit."""
    from .model import decoder_layers

    causal_lm = causal_lm_of(model)
    layers = decoder_layers(causal_lm)
    compiled = [layer._compiled_call_impl for layer in layers]  # set by nn.Module.compile
    kernel = causal_lm.config._attn_implementation
    for layer in layers:
        layer._compiled_call_impl = None
    causal_lm.set_attn_implementation(attention)
    try:
        yield model
    finally:
        causal_lm.set_attn_implementation(kernel)
        for layer, call in zip(layers, compiled):
            layer._compiled_call_impl = call


@torch.inference_mode()
def reference_letter_logits(model, ids: list[int], letter_ids: list[int]) -> torch.Tensor:
    """The plain path, for parity checks only: one unpadded row, full forward, the letter head at its last token."""
    causal_lm = causal_lm_of(model)
    hidden = causal_lm.base_model(input_ids=torch.tensor([ids], device=model_device(model)), use_cache=False)
    return letter_logits_from_hidden(causal_lm, hidden.last_hidden_state[0, -1:], letter_ids, fp32_head=True)[0]


def plain_letter_logits(model, rows: list[list[int]], letter_ids: list[int]) -> np.ndarray:
    """(N, 3) letter logits of token rows by the plain path, one row at a time (`reference_letter_logits`)."""
    return np.stack([reference_letter_logits(model, ids, letter_ids).cpu().numpy() for ids in rows])


def packed_sequences(rows: list[list[int]], token_budget: int, pad_token_id: int):
    """Yield (row indices, input_ids, position_ids, last-token positions) of each flat (1, token_budget) sequence that
    `fast.pack_rows` / `fast.PackingCollator` make of `rows` (padding: a pseudo-row of its own at the end)."""
    from .fast import PackingCollator, pack_rows

    lengths = [len(r) for r in rows]
    too_long = [i for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        raise ValueError(
            f"row {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packed token_budget {token_budget}; "
            "raise token_budget to at least max_length"
        )
    collator = PackingCollator(pad_token_id, token_budget)
    for indices in pack_rows(lengths, token_budget):  # each bin is already longest-first, as the collator orders it
        packed = collator([{"input_ids": rows[i]} for i in indices])
        ends = torch.tensor(list(accumulate(lengths[i] for i in indices))) - 1
        tokens = torch.tensor([t for i in indices for t in rows[i]])
        if packed["micro_batch_lengths"] != [token_budget] or not packed["input_ids"][0, : len(tokens)].equal(tokens):
            raise RuntimeError("the packed sequence does not hold the rows in bin order (PackingCollator changed?)")
        yield indices, packed["input_ids"], packed["position_ids"], ends


@torch.inference_mode()
def packed_letter_logits(model, input_ids, position_ids, ends, letter_ids: list[int]) -> torch.Tensor:
    """(rows, 3) float32 letter logits of one packed sequence: the backbone over all tokens (no attention mask, no
    cache: transformers detects the rows from `position_ids`), the letter head at `ends` only."""
    causal_lm = causal_lm_of(model)
    device = model_device(model)
    hidden = causal_lm.base_model(
        input_ids=input_ids.to(device), position_ids=position_ids.to(device), attention_mask=None, use_cache=False
    ).last_hidden_state
    return letter_logits_from_hidden(causal_lm, hidden[0, ends.to(device)], letter_ids, fp32_head=True)


def score_token_rows(
    model,
    rows: list[list[int]],
    letter_ids: list[int],
    pad_token_id: int,
    token_budget: int = 8192,
    max_batch_size: int | None = None,
    desc: str = "Scoring",
    pack: bool = False,
) -> np.ndarray:
    """(N, 3) letter logits for token rows, returned in input order: length-sorted padded batches, or with `pack`
    flat sequences of `token_budget` tokens (`packed_sequences`; `max_batch_size` does not apply)."""
    if pack:
        scored = (
            (indices, packed_letter_logits(model, input_ids, position_ids, ends, letter_ids))
            for indices, input_ids, position_ids, ends in packed_sequences(rows, token_budget, pad_token_id)
        )
    else:
        scored = (
            (batch, batch_letter_logits(model, [rows[i] for i in batch], letter_ids, pad_token_id))
            for batch in length_sorted_batches([len(r) for r in rows], token_budget, max_batch_size)
        )
    out = np.zeros((len(rows), 3), dtype=np.float64)
    with tqdm(total=len(rows), desc=desc, unit="row") as progress:
        for indices, logits in scored:
            out[indices] = logits.cpu().numpy()
            progress.update(len(indices))
    return out


def score_dataset(
    model,
    tokenizer,
    dataset,
    max_length: int,
    swapped: bool = False,
    token_budget: int = 8192,
    max_batch_size: int | None = None,
    pack: bool = False,
) -> np.ndarray:
    """(N, 3) A/B/C logits of arena rows (of the A/B-swapped rows when `swapped`, letters as the model saw them)."""
    rows = encode_rows(dataset, tokenizer, max_length, swapped)
    pad_token_id = tokenizer.pad_token_id
    desc = "Scoring swapped rows" if swapped else "Scoring rows"
    return score_token_rows(
        model, rows, letter_token_ids(tokenizer), pad_token_id, token_budget, max_batch_size, desc, pack
    )


# ----------------------------------------------------------------------------------------------- probabilities


def letter_probs(logits, temperature: float = 1.0, swapped_logits=None, swap_weight: float = 0.5) -> np.ndarray:
    """softmax(logits / T); with swap TTA, averaged with the swapped rows' probabilities mapped back to A/B."""
    probs = softmax(logits, temperature)
    if swapped_logits is None:
        return probs
    swapped = softmax(swapped_logits, temperature)[:, SWAP_BACK]
    return (1 - swap_weight) * probs + swap_weight * swapped


def load_scoring_tokenizer(base_model: str, trust_remote_code: bool = False):
    """The base model's tokenizer (pad token set) after checking the answer letters are single tokens."""
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
    letter_token_ids(tokenizer)
    return tokenizer


def parity_check(model, tokenizer, dataset, max_length: int, token_budget: int = 8192) -> dict:
    """Batched last-token letter probabilities vs the plain unbatched full forward, row by row (same weights)."""
    rows = encode_rows(dataset, tokenizer, max_length)
    letter_ids = letter_token_ids(tokenizer)
    batched = score_token_rows(model, rows, letter_ids, tokenizer.pad_token_id, token_budget, desc="Batched")
    plain = plain_letter_logits(model, rows, letter_ids)
    diff = np.abs(softmax(batched) - softmax(plain))
    lengths = [len(r) for r in rows]
    return {
        "rows": len(rows),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "batches": len(length_sorted_batches(lengths, token_budget)),
        "max_abs_prob_diff": float(diff.max()),
        "max_abs_logit_diff": float(np.abs(batched - plain).max()),
    }
