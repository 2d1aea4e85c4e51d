"""Scoring: token-budget batching, batched == one row at a time == full forward, swap TTA symmetry, adapter checks."""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmsys_trl.data import load_arena
from lmsys_trl.metrics import softmax
from lmsys_trl.model import check_adapter_base, letter_token_ids, load_kwargs, load_tokenizer, same_model
from lmsys_trl.scoring import (
    encode_rows,
    length_sorted_batches,
    letter_probs,
    plain_letter_logits,
    score_dataset,
    score_token_rows,
)

from conftest import PANDALM, TOKENIZERS


@pytest.fixture(scope="module")
def rows():
    return load_arena(str(PANDALM)).select(range(0, 40, 5))  # 8 rows of varied length


def test_length_sorted_batches_respect_budget():
    lengths = [5, 50, 20, 20, 7, 300, 1, 49]
    batches = length_sorted_batches(lengths, token_budget=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # longer than the budget: alone, first
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 100
        assert lengths[batch[0]] == max(lengths[i] for i in batch)
    assert all(len(b) <= 2 for b in length_sorted_batches(lengths, 10_000, max_batch_size=2))


def test_encoded_rows_end_at_the_answer_position(tokenizer, rows):
    encoded = encode_rows(rows, tokenizer, max_length=256)
    assert len(encoded) == len(rows) and all(len(ids) <= 256 for ids in encoded)
    for ids in encoded:
        text = tokenizer.decode(ids)
        assert text.rstrip().endswith(("<start_of_turn>model", "<|start_header_id|>assistant<|end_header_id|>"))
        assert "C. Tie" in text
    swapped = encode_rows(rows, tokenizer, max_length=256, swapped=True)
    first = rows[0]
    assert first["response_b"][0][:30] in tokenizer.decode(swapped[0]).split("##Model A")[1].split("##Model B")[0]


def test_batched_scoring_equals_one_row_at_a_time(tiny_llama, rows):
    """(gemma-2's eager softcapped path is covered the same way by test_parity_script_on_cpu.)"""
    from transformers import AutoModelForCausalLM

    from lmsys_trl.kernels import default_attn_implementation

    path = str(tiny_llama)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=default_attn_implementation(path, None))
    model.eval()
    batches, head_calls = [], []
    model.model.register_forward_hook(lambda module, args, output: batches.append(output.last_hidden_state.shape))
    model.lm_head.register_forward_hook(lambda module, args, output: head_calls.append(output.shape))
    encoded = encode_rows(rows, tokenizer, max_length=256)
    letter_ids = letter_token_ids(tokenizer)
    batched = score_token_rows(model, encoded, letter_ids, tokenizer.pad_token_id, token_budget=4 * 256)
    assert len(batches) >= 2 and not head_calls  # several batches; only the head's 3 letter rows are used (fp32)
    single = score_token_rows(model, encoded, letter_ids, tokenizer.pad_token_id, token_budget=1)
    plain = plain_letter_logits(model, encoded, letter_ids)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    np.testing.assert_allclose(batched, plain, atol=1e-4)
    assert np.abs(softmax(batched) - softmax(plain)).max() < 1e-5
    # results come back in input order, not in the length-sorted order
    np.testing.assert_allclose(score_dataset(model, tokenizer, rows.select([3]), 256), batched[[3]], atol=1e-4)


class ContentBlindModel(torch.nn.Module):
    """Ignores its input: the same letter logits for every row, whatever order A and B come in (a causal LM whose
    backbone outputs a constant hidden state and whose head's bias holds the letter logits)."""

    def __init__(self, vocab_size, letter_ids):
        super().__init__()
        self.head = torch.nn.Linear(1, vocab_size)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[letter_ids] = torch.tensor([2.0, 0.5, -1.0])
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace())

    def get_output_embeddings(self):
        return self.head

    def base_model(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 1))


def test_swap_tta_is_symmetric_for_a_content_blind_model(rows):
    tokenizer = load_tokenizer(str(TOKENIZERS / "llama-3.1"))
    model = ContentBlindModel(len(tokenizer), letter_token_ids(tokenizer))
    logits = score_dataset(model, tokenizer, rows, 256)
    swapped = score_dataset(model, tokenizer, rows, 256, swapped=True)
    plain = letter_probs(logits, temperature=1.03)
    assert (plain[:, 0] - plain[:, 1] > 0.5).all()  # a position bias without TTA
    tta = letter_probs(logits, 1.03, swapped, swap_weight=0.5)
    np.testing.assert_allclose(tta[:, 0], tta[:, 1], atol=1e-12)
    np.testing.assert_allclose(tta.sum(axis=1), 1.0)
    np.testing.assert_allclose(tta[:, 2], plain[:, 2])


def test_letter_probs_temperature():
    logits = np.array([[2.0, 1.0, 0.0]])
    expected = np.exp(logits / 1.03) / np.exp(logits / 1.03).sum()
    np.testing.assert_allclose(letter_probs(logits, 1.03), expected)
    # swap weight 0 ignores the swapped pass; 1 uses only it (mapped back to A/B)
    np.testing.assert_allclose(letter_probs(logits, 1.0, logits[:, [1, 0, 2]], 0.0), softmax(logits))
    np.testing.assert_allclose(letter_probs(logits, 1.0, logits[:, [1, 0, 2]], 1.0), softmax(logits))


def test_adapter_base_model_check(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "google/gemma-2-9b-it", "task_type": "CAUSAL_LM"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # present (the base check does not read the weights)
    check_adapter_base(str(adapter), "/models/gemma-2-9b-it/")  # a local copy of the same hub model
    with pytest.raises(ValueError, match="trained on base model 'google/gemma-2-9b-it'.*--allow_base_mismatch"):
        check_adapter_base(str(adapter), "meta-llama/Llama-3.1-8B-Instruct")
    check_adapter_base(str(adapter), "meta-llama/Llama-3.1-8B-Instruct", allow_mismatch=True)
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        check_adapter_base(str(tmp_path), "google/gemma-2-9b-it")
    assert same_model(str(tmp_path), str(tmp_path) + "/") and not same_model("a/b", "a/c")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_kbit_precision_without_bitsandbytes_is_a_clear_error():
    with pytest.raises(ValueError, match="needs bitsandbytes"):
        load_kwargs("4bit", "cpu")
    assert load_kwargs("auto", "cpu") == {"dtype": torch.float32}
    assert load_kwargs("bf16", "cuda:0") == {"dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="precision must be one of"):
        load_kwargs("int3", "cpu")
