"""Score arena rows with a loaded model: A/B/C letter logits at the answer position, letter probabilities, swap TTA.

Each row is the training prompt in inference mode (`formatting.comparison_text(mode="infer")`) rendered by the chat
template up to the assistant turn, so the next token is the answer letter. Two paths, results in input order:
- padded (default): rows length-sorted into batches under a token budget, left-padded with explicit position ids;
- packed (`pack=True`): rows packed best-fit-decreasing by TRL's `pack_dataset` into flat sequences padded to exactly
  `token_budget` tokens (position ids restart at each row, no attention mask, so transformers builds the
  packed-document mask), the backbone run once per sequence.
Either way only each row's last hidden state meets the LM head, and only its three letter rows, in fp32
(`model.letter_logits_from_hidden(fp32_head=True)`). Loading (merge, FP8, compile) is `model.load_model`'s job.
"""

from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import swap_row
from .formatting import chat_token_ids, format_example
from .kernels import decoder_layers
from .metrics import softmax
from .model import causal_lm_of, letter_logits_from_hidden, letter_token_ids, load_tokenizer


SWAP_BACK = [1, 0, 2]  # probabilities of a swapped row, reordered to the original A/B


def load_scoring_tokenizer(base_model: str, trust_remote_code: bool = False):
    """The base model's tokenizer (pad token set) after checking the answer letters are single tokens."""
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
    letter_token_ids(tokenizer)
    return tokenizer


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


def packed_sequences(rows: list[list[int]], token_budget: int, pad_token_id: int):
    """Yield (row indices, input_ids, position_ids, last-token positions) of each flat (1, token_budget) sequence.

    TRL's `pack_dataset` (best fit decreasing) bins a per-token `row` column (each row's index, once per token): it
    maps a bin back to input order and its `seq_lengths` give the boundaries. The tail is padding: a pseudo-row of its
    own (positions from 0), so every sequence has the one shape compiled kernels want."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lengths = [len(r) for r in rows]
    too_long = [i for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        raise ValueError(
            f"row {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packed token_budget {token_budget}; "
            "raise token_budget to at least max_length"
        )
    # the per-token row index is the only column packed: 3x faster than packing input_ids beside it (20k rows)
    table = Dataset.from_dict({"row": [np.full(n, i, dtype=np.int32) for i, n in enumerate(lengths)]})
    for packed in pack_dataset(table, token_budget, "bfd", {"desc": "Packing rows"}).with_format("numpy"):
        sizes = packed["seq_lengths"]
        indices = packed["row"][np.cumsum(sizes) - sizes].tolist()
        padding = token_budget - int(sizes.sum())
        input_ids = torch.tensor([[t for i in indices for t in rows[i]] + [pad_token_id] * padding])
        position_ids = torch.cat([torch.arange(n) for n in (*sizes.tolist(), padding)])[None]
        yield indices, input_ids, position_ids, torch.from_numpy(np.cumsum(sizes) - 1)


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
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device), use_cache=False,
    ).last_hidden_state
    return letter_logits_from_hidden(causal_lm, hidden[:, -1], letter_ids, fp32_head=True)


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


def score_token_rows(model, rows: list[list[int]], letter_ids: list[int], pad_token_id: int, token_budget: int = 8192,
                     max_batch_size: int | None = None, desc: str = "Scoring", pack: bool = False) -> np.ndarray:
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


def score_dataset(model, tokenizer, dataset, max_length: int, swapped: bool = False, token_budget: int = 8192,
                  max_batch_size: int | None = None, pack: bool = False) -> np.ndarray:
    """(N, 3) A/B/C logits of arena rows (of the A/B-swapped rows when `swapped`, letters as the model saw them)."""
    rows = encode_rows(dataset, tokenizer, max_length, swapped)
    desc = "Scoring swapped rows" if swapped else "Scoring rows"
    return score_token_rows(model, rows, letter_token_ids(tokenizer), tokenizer.pad_token_id, token_budget,
                            max_batch_size, desc, pack)


def letter_probs(logits, temperature: float = 1.0, swapped_logits=None, swap_weight: float = 0.5) -> np.ndarray:
    """softmax(logits / T); with swap TTA, averaged with the swapped rows' probabilities mapped back to A/B."""
    probs = softmax(logits, temperature)
    if swapped_logits is None:
        return probs
    swapped = softmax(swapped_logits, temperature)[:, SWAP_BACK]
    return (1 - swap_weight) * probs + swap_weight * swapped


# ----------------------------------------------------------------------------------------------- parity


@contextmanager
def plain_forward(model, attention: str = "eager"):
    """The model with its decoder layers uncompiled and `attention` kernel while inside: the plain forward of the
    parity checks (rows of any length, no recompilation), restored on exit."""
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
def unbatched_letter_logits(model, ids: list[int], letter_ids: list[int]) -> torch.Tensor:
    """The plain path, for parity checks only: one unpadded row, full forward, the letter head at its last token."""
    causal_lm = causal_lm_of(model)
    hidden = causal_lm.base_model(input_ids=torch.tensor([ids], device=model_device(model)), use_cache=False)
    return letter_logits_from_hidden(causal_lm, hidden.last_hidden_state[0, -1:], letter_ids, fp32_head=True)[0]


def plain_letter_logits(model, rows: list[list[int]], letter_ids: list[int]) -> np.ndarray:
    """(N, 3) letter logits of token rows by the plain path, one row at a time (`unbatched_letter_logits`)."""
    return np.stack([unbatched_letter_logits(model, ids, letter_ids).cpu().numpy() for ids in rows])


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
