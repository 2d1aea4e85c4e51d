"""Former home of scoring, kept only for the benchmark tooling (`lmsys_trl.speed`, `scripts/benchmark.py`,
`scripts/parity.py`) until it moves out of the package: delete this file then. New homes: model loading in
`lmsys_trl.model`, forwards in `lmsys_trl.scoring`, scoring settings in `lmsys_trl.evaluation`."""

from .evaluation import PRECISIONS, SCORING_KEYS, resolve_scoring  # noqa: F401
from .model import KBIT, LOAD_DTYPES, attention_kwargs, load_model, prepare_for_scoring  # noqa: F401
from .scoring import (  # noqa: F401
    encode_rows,
    load_scoring_tokenizer,
    parity_check,
    plain_forward,
    plain_letter_logits,
    score_token_rows,
)


def scoring_attention_kwargs(base_model: str, attn_implementation: str | None, softcapping: bool = True) -> dict:
    """`model.attention_kwargs` (which registers the flex kernel itself when it is asked for)."""
    return attention_kwargs(base_model, attn_implementation, softcapping=softcapping)
