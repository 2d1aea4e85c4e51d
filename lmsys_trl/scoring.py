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

import os
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import DataError, swap_row
from .formatting import (
    BudgetError,
    TemplateError,
    _fixed_tokens,
    _min_turn_tokens,
    chat_token_ids,
    comparison_text,
    format_example,
)
from .io import release_inherited_locks
from .kernels import decoder_layers
from .metrics import softmax
from .model import causal_lm_of, letter_logits_from_hidden, letter_token_ids, load_tokenizer


SWAP_BACK = [1, 0, 2]  # probabilities of a swapped row, reordered to the original A/B


def load_scoring_tokenizer(base_model: str, trust_remote_code: bool = False):
    """The base model's tokenizer (pad token set) after checking the answer letters are single tokens."""
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
    letter_token_ids(tokenizer)
    return tokenizer


ROW_ERRORS = (BudgetError, DataError, TemplateError)  # checked errors of one row: raised naming the row
CHUNK_ROWS = 64  # rows per worker task: 50k rows -> ~800 tasks, balanced over 16 workers, little pickling each
MIN_POOL_ROWS = 400  # fewer rows (all passes together) are encoded in the plain loop: see `encoding_workers`
MAX_WORKERS = 16


def default_workers() -> int:
    """Worker processes for tokenising when none are given: this process's CPUs (its affinity mask), shared between
    the processes of an `accelerate launch` on this host, at most `MAX_WORKERS`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(MAX_WORKERS, cpus // max(local, 1)))


def encoding_workers(rows: int, workers: int | None) -> int:
    """Processes to tokenise `rows` rows with: 1 (the plain loop, in this process) for `workers` 1 and for fewer
    than `MIN_POOL_ROWS` rows; else `workers` (None: `default_workers()`), at most one per `CHUNK_ROWS` rows.

    MIN_POOL_ROWS (docs/benchmarks.md, issue 17): starting and stopping a forked pool of 2 took 0.17 s on the 2-core
    dev box (2 rows: 0.20 s against 0.04 s in the loop); on 16 cores the loop does 333 arena rows/s and 16 workers
    ~2,600, so a pool pays off from roughly 100-200 rows, and below 400 rows it would save under a second: small runs
    and the CPU test-suite keep the loop."""
    if workers is not None and workers < 1:
        raise ValueError(f"tokenize_workers must be >= 1, got {workers}")
    workers = default_workers() if workers is None else workers
    if rows < MIN_POOL_ROWS:
        return 1
    return max(1, min(workers, -(-rows // CHUNK_ROWS)))


def encode_row(row: dict, tokenizer, max_length: int, swapped: bool = False) -> list[int]:
    """Token ids of one arena row's inference prompt (A/B exchanged when `swapped`); a checked error of the row
    (`ROW_ERRORS`) is raised again naming the row's id."""
    try:
        record = format_example(swap_row(row) if swapped else row, tokenizer, max_length, "infer")
        return chat_token_ids(tokenizer, record)
    except ROW_ERRORS as err:
        raise type(err)(f"row {row.get('id')!r}{' (A/B swapped)' if swapped else ''}: {err}") from None


def _check_budget(tokenizer, max_length: int) -> None:
    """The BudgetError of a `max_length` too small for any row, raised once before any row is encoded (not per
    row: it is no row's fault)."""
    if max_length < _fixed_tokens(tokenizer, "infer") + _min_turn_tokens(tokenizer, "infer"):
        comparison_text([""], [""], [""], tokenizer, max_length, "infer")  # raises the BudgetError


# A worker's dataset and tokenizer: set by `_init_worker` (inherited by fork, pickled once per worker otherwise).
_WORKER = {}


def _init_worker(dataset, tokenizer, max_length: int) -> None:
    release_inherited_locks()  # a worker must not keep --out locked if the run is killed
    _WORKER.update(dataset=dataset, tokenizer=tokenizer, max_length=max_length)


def _encode_chunk(start: int, stop: int, swapped: bool):
    """Rows [start, stop) of the worker's dataset encoded: (flat int32 token ids, row lengths); two arrays pickle far
    faster than thousands of lists of ints."""
    batch = _WORKER["dataset"][start:stop]
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    encoded = [encode_row(row, _WORKER["tokenizer"], _WORKER["max_length"], swapped) for row in rows]
    flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int32, count=sum(map(len, encoded)))
    return flat, np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))


def _unflatten(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    ids = flat.tolist()
    ends = np.cumsum(lengths).tolist()
    return [ids[end - n:end] for end, n in zip(ends, lengths.tolist())]


class RowEncoding:
    """Token ids of arena rows' inference prompts for one or more passes (`swapped` False / True), in input order.

    With one worker (`workers` 1, or fewer than `MIN_POOL_ROWS` rows) each pass is the plain loop of `encode_row`,
    run when `rows(swapped)` asks for it. Otherwise every pass's chunks go to one process pool at once, in the order
    of `passes`: `rows(first pass)` returns as soon as its chunks are done, while the pool goes on with the next pass
    (the swap TTA rows are tokenised while the GPU scores the first pass). The pool forks where it can (the
    tokenizer and dataset are inherited, not pickled) and is shut down once every pass is collected, or by `close`.

    A process pool, not `datasets.Dataset.map(num_proc=...)` (with our own fingerprint, in memory, no cache file):
    measured with the gemma-2 tokenizer on 400 arena rows on a 16-core host (docs/benchmarks.md, issue 17), `map`
    with 4 processes ran at 15.9 rows/s, the pool at 910 (the loop: 320). `map` dill-pickles the tokenizer (27 MB,
    7 s) into the job of every shard and each worker unpickles it (2 s); a forked pool inherits it. Nor can `map`
    hand over the first pass while the second is still being tokenised.
    """

    def __init__(self, dataset, tokenizer, max_length: int, passes=(False,), workers: int | None = 1):
        self.dataset, self.tokenizer, self.max_length = dataset, tokenizer, max_length
        self.passes = list(dict.fromkeys(passes))
        self.workers = encoding_workers(len(dataset) * len(self.passes), workers)
        self._futures, self._pool = {}, None
        _check_budget(tokenizer, max_length)
        if self.workers > 1:
            self._start()

    def _start(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        self._pool = ProcessPoolExecutor(self.workers, context, initializer=_init_worker,
                                         initargs=(self.dataset, self.tokenizer, self.max_length))
        n = len(self.dataset)
        for swapped in self.passes:
            self._futures[swapped] = [
                self._pool.submit(_encode_chunk, start, min(start + CHUNK_ROWS, n), swapped)
                for start in range(0, n, CHUNK_ROWS)
            ]

    def rows(self, swapped: bool = False) -> list[list[int]]:
        """The pass's token ids, one list per row in input order."""
        if swapped not in self.passes:
            raise ValueError(f"pass swapped={swapped} was not encoded (passes {self.passes})")
        desc = f"Formatting{' swapped' if swapped else ''} rows (max_length={self.max_length})"
        futures = self._futures.pop(swapped, None)
        if futures is None:  # one worker (or a pass asked for again after the pool has handed it out): the loop
            with tqdm(self.dataset, desc=desc) as progress:  # closed (its line ended) before an error is printed
                return [encode_row(row, self.tokenizer, self.max_length, swapped) for row in progress]
        out = []
        try:
            with tqdm(total=len(self.dataset), desc=f"{desc}, {self.workers} processes", unit="row") as progress:
                for future in futures:
                    try:
                        part = _unflatten(*future.result())
                    except ROW_ERRORS as err:
                        # raised here again: from the pool it would read as concurrent.futures' error, not ours
                        # (`configs.run_main` prints checked errors of this package as one line)
                        raise type(err)(str(err)) from None
                    out.extend(part)
                    progress.update(len(part))
        except BaseException:
            self.close()
            raise
        if not self._futures:
            self.close()
        return out

    def close(self) -> None:
        """Stop the pool (queued chunks cancelled); idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._futures.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def encode_rows(dataset, tokenizer, max_length: int, swapped: bool = False, workers: int | None = 1):
    """Token ids of each arena row's inference prompt (A/B exchanged when `swapped`), in input order: the plain loop
    of `encode_row` (`workers` 1, the default, or a small input), or a process pool of `workers` (None: one per CPU,
    at most 16); see `RowEncoding`. The output is the same either way."""
    with RowEncoding(dataset, tokenizer, max_length, (swapped,), workers) as encoding:
        return encoding.rows(swapped)


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
                  max_batch_size: int | None = None, pack: bool = False, workers: int | None = 1,
                  rows: list[list[int]] | None = None) -> np.ndarray:
    """(N, 3) A/B/C logits of arena rows (of the A/B-swapped rows when `swapped`, letters as the model saw them).
    `rows`: the rows' token ids when already encoded (`RowEncoding`), else `encode_rows` with `workers`."""
    if rows is None:
        rows = encode_rows(dataset, tokenizer, max_length, swapped, workers)
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


CALIBRATION_TOKENS = 4096  # one packed sequence: a few rows, small enough for eager attention's full score matrix


def calibration_forward(rows: list[list[int]], pad_token_id: int, tokens: int = CALIBRATION_TOKENS):
    """A `model.prepare_for_scoring` calibration: `calibrate(model)` runs the backbone of the (bf16, uncompiled)
    model over the first packed sequence of `rows` (`tokens` tokens at most, rows longer than that left out), with
    eager attention."""
    fitting = [r for r in rows if len(r) <= tokens][:64]
    if not fitting:
        raise ValueError(f"no row of at most {tokens} tokens to calibrate FP8 on")

    @torch.inference_mode()
    def calibrate(model):
        _, input_ids, position_ids, _ = next(packed_sequences(fitting, tokens, pad_token_id))
        device = model_device(model)
        with plain_forward(model):
            causal_lm_of(model).base_model(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                                           attention_mask=None, use_cache=False)
    return calibrate


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
