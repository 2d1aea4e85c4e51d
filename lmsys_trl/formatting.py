"""Arena row -> the recipe's comparison text (turn packing, truncation) -> conversational prompt/completion record.

The comparison text is the user message; the answer letter is the assistant message. The tokenizer's chat template
does all model-specific wrapping, so gemma-2, llama-3.1 and any chat model share this one code path.
"""

import hashlib
import os
from functools import lru_cache

from datasets import Dataset

from .data import LETTERS, DataError


HEADER = (
    "Here are two question-answering dialogues. "
    "Compare two models' performance on answering questions, determine which is better.\n"
)
OPTIONS = "###options\nA. Model A\nB. Model B\nC. Tie"
INFER_SPLIT = (300, 800, 800)  # prompt / response A / response B tokens for one over-long turn at inference


class TemplateError(ValueError):
    """The tokenizer cannot render the records this project needs."""


class BudgetError(ValueError):
    """`max_length` cannot hold the fixed text and one turn (a prompt and two responses of at least a token each)."""


def turn_block(index: int, prompt: str, response_a: str, response_b: str) -> str:
    """One conversation turn as the recipe writes it (`index` counts from 1 within the packed row)."""
    return f"#Prompt{index}\n{prompt}\n#Response\n##Model A\n{response_a}\n##Model B\n{response_b}\n"


def render_text(turns: list[tuple[str, str, str]]) -> str:
    """The whole user message for a packed row of (prompt, response_a, response_b) turns."""
    return HEADER + "".join(turn_block(i, *t) for i, t in enumerate(turns, start=1)) + OPTIONS


def to_messages(text: str, label: int | None = None) -> dict:
    """A conversational record: prompt = the user turn; completion = the answer letter when the label is known."""
    record = {"prompt": [{"role": "user", "content": text}]}
    if label is not None and label >= 0:
        record["completion"] = [{"role": "assistant", "content": LETTERS[label]}]
    return record


def chat_token_ids(tokenizer, record: dict) -> list[int]:
    """Token ids of a record as TRL builds them: the chat template rendered and tokenized in one step."""
    messages = record["prompt"] + record.get("completion", [])
    try:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt="completion" not in record, return_dict=True
        )
    except Exception as err:  # jinja's TemplateError, ValueError for a missing template
        name = getattr(tokenizer, "name_or_path", "tokenizer")
        raise TemplateError(
            f"{name}: its chat template cannot render a user turn followed by an assistant turn ({err}); "
            "give a chat model's tokenizer or set `tokenizer.chat_template`"
        ) from None
    return list(encoded["input_ids"])


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _head(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[: max(max_tokens, 0)])


@lru_cache(maxsize=16)
def _fixed_tokens(tokenizer, mode: str) -> int:
    """Tokens of everything but the turns: header, options, chat template wrapping and (training) the answer."""
    return len(chat_token_ids(tokenizer, to_messages(render_text([]), 0 if mode == "train" else None)))


def _part_budgets(left: int, mode: str) -> tuple[int, int, int]:
    """Token budgets of (prompt, response A, response B) of one over-long turn, given `left` tokens for the three:
    train: prompt left//5, half the rest each; infer: 300/800/800, scaled down to `left`."""
    if mode == "train":
        prompt_budget = left // 5
        return prompt_budget, (left - prompt_budget) // 2, (left - prompt_budget) // 2
    scale = min(1.0, left / sum(INFER_SPLIT))
    return tuple(int(p * scale) for p in INFER_SPLIT)


@lru_cache(maxsize=16)
def _min_turn_tokens(tokenizer, mode: str) -> int:
    """The smallest budget of one cut turn: its skeleton plus parts of at least one token each."""
    left = next(n for n in range(1, sum(INFER_SPLIT) + 1) if min(_part_budgets(n, mode)) >= 1)
    return _count(tokenizer, turn_block(1, "", "", "")) + left


def _cut_turn(turn, tokenizer, budget: int, mode: str):
    """Cut a single over-long turn per part (`_part_budgets` of what the turn's skeleton leaves)."""
    left = budget - _count(tokenizer, turn_block(1, "", "", ""))
    return tuple(_head(tokenizer, text, n) for text, n in zip(turn, _part_budgets(left, mode)))


def _last_packed_row(turns, tokenizer, budget: int, mode: str):
    """Walk the turns, packing while they fit the budget; return the last row (cut if it is one over-long turn)."""
    row, used = [], 0
    for turn in turns:
        need = _count(tokenizer, turn_block(len(row) + 1, *turn))
        if row and used + need > budget:
            row, used = [], 0
            need = _count(tokenizer, turn_block(1, *turn))
        row.append(turn)
        used += need
    if len(row) == 1 and used > budget:
        row = [_cut_turn(row[0], tokenizer, budget, mode)]
    return row


def comparison_text(prompt, response_a, response_b, tokenizer, max_length: int, mode: str = "train") -> str:
    """The user-message text of the row the model sees for one conversation (lists of turn strings in).

    Turns are packed under `max_length` tokens measured with `tokenizer` (chat template and, in training, the answer
    included); the last packed row is kept, so the most recent turns survive. `mode="infer"` uses the inference
    split for a single over-long turn. The rendered sequence never exceeds `max_length` tokens.
    """
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    turns = list(zip(prompt, response_a, response_b))
    fixed = _fixed_tokens(tokenizer, mode)
    budget = max_length - fixed
    least = _min_turn_tokens(tokenizer, mode)
    if budget < least:
        raise BudgetError(
            f"max_length={max_length} cannot hold one turn: {mode} mode needs at least {fixed + least} tokens "
            f"({fixed} of fixed text and chat template, {least} for a turn's skeleton and a token of each part)"
        )
    label = 0 if mode == "train" else None
    while True:
        text = render_text(_last_packed_row(turns, tokenizer, budget, mode))
        excess = len(chat_token_ids(tokenizer, to_messages(text, label))) - max_length
        if excess <= 0:
            return text
        budget -= max(excess, 1)  # token merges at part boundaries: tighten and re-pack
        if budget < least:  # (the merges of this row's text cost more than the estimate above)
            raise BudgetError(
                f"max_length={max_length} cannot hold one turn of this row: {mode} mode needs at least "
                f"{max_length + 1} tokens for it ({fixed} of fixed text and chat template, a turn's skeleton and a "
                "token of each part)"
            )


def format_example(example: dict, tokenizer, max_length: int, mode: str) -> dict:
    """`datasets.map` function: arena row -> conversational prompt (+ completion when labelled and training)."""
    text = comparison_text(
        example["prompt"], example["response_a"], example["response_b"], tokenizer, max_length, mode
    )
    return to_messages(text, example["label"] if mode == "train" else None)


def format_dataset(
    dataset: Dataset, tokenizer, max_length: int, mode: str = "train", num_proc: int | None = None, cache_dir=None
) -> Dataset:
    """Map arena rows to conversational records (columns `id`, `label`, `prompt`[, `completion`]).

    With `cache_dir`, the result is cached on disk keyed by the data, the tokenizer, its template and the budget.
    """
    if mode == "train" and len(dataset) and min(dataset["label"]) < 0:
        raise ValueError("training rows need labels (0/1/2); got unlabelled rows (label -1)")
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    fixed, least = _fixed_tokens(tokenizer, mode), _min_turn_tokens(tokenizer, mode)  # fail early, before any worker
    if max_length < fixed + least:
        comparison_text([""], [""], [""], tokenizer, max_length, mode)  # raises the BudgetError
    # Our own fingerprint: letting `datasets` hash the tokenizer (a 256k vocabulary) costs a minute per call.
    key = "|".join(map(str, (dataset._fingerprint, tokenizer.name_or_path, tokenizer.chat_template, max_length, mode)))
    fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"formatted-{fingerprint}.arrow")
    drop = [c for c in ("response_a", "response_b") if c in dataset.column_names]
    try:
        formatted = dataset.map(
            format_example,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "mode": mode},
            remove_columns=["prompt", *drop],
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            cache_file_name=cache_file,
            new_fingerprint=fingerprint,
            load_from_cache_file=cache_file is not None,
            desc=f"Formatting ({mode}, max_length={max_length})",
        )
    except (TemplateError, BudgetError, DataError) as err:
        # From a `num_proc > 1` worker it is re-raised by multiprocess' pool: raise it here again, so that it reads
        # as the checked error it is (`configs.run_main`: one line).
        raise type(err)(str(err)) from err
    return formatted
