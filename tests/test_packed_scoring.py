"""Packed scoring (rows packed into flat sequences, LM head at each row's last token) == one row at a time.

float32 on CPU; tolerance: |p_packed - p_plain| < 1e-5 and |logit_packed - logit_plain| < 1e-4 (float32 rounding of
other reduction orders; a row attending to another row or a wrong position id moves them by > 1e-2).
"""

import numpy as np
import pytest
import torch

from lmsys_trl.data import load_arena
from lmsys_trl.evaluation import EvalArguments
from lmsys_trl.members import MemberScorer
from lmsys_trl.metrics import softmax
from lmsys_trl.model import letter_token_ids, load_model, load_tokenizer
from lmsys_trl.scoring import encode_rows, packed_sequences, plain_letter_logits, score_token_rows

from conftest import ARENA_SAMPLE, PANDALM


BUDGET = 512  # forces several packed sequences for the rows below (max_length 256)


@pytest.fixture(scope="module")
def arena_rows():
    """Rows of very different lengths: short PandaLM rows and long (truncated to 256 tokens) arena rows."""
    from datasets import concatenate_datasets

    pandalm = load_arena(str(PANDALM)).select(range(0, 36, 9))
    arena = load_arena(str(ARENA_SAMPLE)).select(range(3))
    return concatenate_datasets([pandalm, arena.cast(pandalm.features)])


def assert_same_probabilities(packed, plain):
    np.testing.assert_allclose(packed, plain, atol=1e-4, rtol=0)
    assert np.abs(softmax(packed) - softmax(plain)).max() < 1e-5


def test_packed_sequences_layout():
    rows = [[5] * 300, [6] * 40, [7] * 200, [8] * 1, [9] * 250, [10] * 260]
    sequences = list(packed_sequences(rows, token_budget=BUDGET, pad_token_id=0))
    assert len(sequences) >= 3 and sorted(i for s in sequences for i in s[0]) == list(range(len(rows)))
    for indices, input_ids, position_ids, ends in sequences:
        assert input_ids.shape == position_ids.shape == (1, BUDGET)  # one fixed shape for compiled kernels
        assert sum(len(rows[i]) for i in indices) <= BUDGET
        for i, end in zip(indices, ends.tolist()):
            assert input_ids[0, end] == rows[i][-1] and position_ids[0, end] == len(rows[i]) - 1
            assert position_ids[0, end - len(rows[i]) + 1] == 0  # positions restart at each row
    with pytest.raises(ValueError, match="row 0 has 600 tokens, more than the packed token_budget 512"):
        list(packed_sequences([[1] * 600], BUDGET, 0))


@pytest.mark.parametrize(
    "family, attn",
    [("llama", "sdpa"), pytest.param("llama", "eager", marks=pytest.mark.slow),
     pytest.param("llama", "lmsys_flex", marks=pytest.mark.slow),
     pytest.param("gemma", "eager", marks=pytest.mark.slow),
     pytest.param("gemma", "lmsys_flex", marks=pytest.mark.slow)],
)
def test_packed_scoring_equals_one_row_at_a_time(family, attn, arena_rows, tiny_llama, tiny_gemma):
    path = str(tiny_llama if family == "llama" else tiny_gemma)
    tokenizer = load_tokenizer(path)
    model = load_model(path, [], precision="fp32", device="cpu", attn_implementation=attn)
    assert model.config._attn_implementation == attn
    rows = encode_rows(arena_rows, tokenizer, max_length=256)
    rows[3:3] = [rows[0][:12], rows[1][:70]]  # token prefixes: far shorter than any formatted row
    lengths = [len(r) for r in rows]
    assert max(lengths) > 250 and min(lengths) == 12
    assert len(list(packed_sequences(rows, BUDGET, tokenizer.pad_token_id))) >= 3
    letter_ids = letter_token_ids(tokenizer)
    packed = score_token_rows(model, rows, letter_ids, tokenizer.pad_token_id, BUDGET, pack=True)
    # flex builds its block mask with a compiled function per sequence length: the plain reference runs eager
    plain = model if attn != "lmsys_flex" else load_model(path, [], "fp32", "cpu", attn_implementation="eager")
    assert_same_probabilities(packed, plain_letter_logits(plain, rows, letter_ids))  # also: results in input order


def test_packed_scoring_applies_the_lora_adapter(arena_rows, tiny_llama):
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(str(tiny_llama))
    base = load_model(str(tiny_llama), [], precision="fp32", device="cpu")
    rows = encode_rows(arena_rows.select(range(6)), tokenizer, max_length=256)
    letter_ids = letter_token_ids(tokenizer)
    before = plain_letter_logits(base, rows, letter_ids)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    plain = plain_letter_logits(model, rows, letter_ids)
    assert np.abs(plain - before).max() > 1e-3  # the adapter changes the letters' logits
    packed = score_token_rows(model, rows, letter_ids, tokenizer.pad_token_id, BUDGET, pack=True)
    assert_same_probabilities(packed, plain)


@pytest.mark.slow
def test_pack_rows_key_scores_like_the_padded_path(arena_rows, tiny_llama, tmp_path):
    common = dict(data=["x.csv"], base_model=[str(tiny_llama)], max_length=[256], out=str(tmp_path), precision="fp32")
    scorers = []
    for pack in (False, True):
        args = EvalArguments(**common, token_budget=BUDGET, pack_rows=pack)
        scorers.append(MemberScorer(args.members()[0], args))
    (tmp_path / "members").mkdir()
    expected = scorers[0].logits(arena_rows, "data", swapped=False)
    assert_same_probabilities(scorers[1].logits(arena_rows, "data", swapped=False), expected)
    with pytest.raises(ValueError, match="token_budget \\(200\\) must be >= max_length \\(256\\)"):
        EvalArguments(**common, token_budget=200, pack_rows=True)
    with pytest.raises(ValueError, match="max_batch_size limits padded batches"):
        EvalArguments(**common, max_batch_size=4, pack_rows=True)
