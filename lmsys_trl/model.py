"""Tokenizer and model set-up shared by training and scoring: pad token, answer-letter ids, load kwargs."""

import torch
from transformers import AutoConfig, AutoTokenizer

from .data import LETTERS
from .formatting import TemplateError


# Families whose attention needs logit softcapping: eager is the safe default kernel.
SOFTCAP_MODEL_TYPES = ("gemma2",)
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>")


def load_tokenizer(name_or_path: str, revision: str = "main", trust_remote_code: bool = False):
    """Load a chat tokenizer; give it a pad token (never the end-of-turn token when an unused one exists)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise TemplateError(f"{name_or_path}: the tokenizer has no chat template; use a chat (instruct) model")
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((t for t in PAD_CANDIDATES if t in vocab), tokenizer.eos_token)
    return tokenizer


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of the answer letters A, B, C; each must be a single token."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            name = getattr(tokenizer, "name_or_path", "tokenizer")
            raise TemplateError(f"{name}: answer letter {letter!r} is {len(encoded)} tokens {encoded}; it must be one")
        ids.append(encoded[0])
    return ids


def resolve_dtype(dtype):
    """'bfloat16' -> torch.bfloat16; 'auto' and None pass through."""
    return dtype if dtype in ("auto", None) or isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def default_attn_implementation(name_or_path: str, requested: str | None, revision: str = "main") -> str | None:
    """The requested kernel, or eager for families with attention softcapping (gemma-2)."""
    if requested:
        return requested
    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    return "eager" if config.model_type in SOFTCAP_MODEL_TYPES else None
