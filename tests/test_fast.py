"""The fast path (lmsys_trl.fast) equals the reference path: same loss and LoRA gradients on the same rows.

Tolerance: float32 on CPU, only the summation order differs -> rtol 1e-4, atol 1e-6 (loss and every LoRA gradient).
Flex attention has no backward on CPU, so it is checked on the forward (logits per row); its backward is torch's.
"""

import pytest
import torch

from lmsys_trl.fast import (
    FLEX_ATTENTION,
    FastSFTConfig,
    FastSFTTrainer,
    PackingCollator,
    limit_checkpointed_layers,
    pack_rows,
    register_flex_attention,
)

from conftest import ARENA_SAMPLE, TOKENIZERS


TOL = dict(rtol=1e-4, atol=1e-6)
N_ROWS = 6
MAX_LENGTH = 256


VOCAB = 512  # token ids are taken modulo this: the equivalence does not depend on the text, only on the lengths


def tiny_model(attn: str):
    """A 2-layer random gemma-2 (softcapping on) with a small vocabulary; the same weights on every call."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=128, pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)


@pytest.fixture(scope="module")
def records():
    """N_ROWS arena rows as the recipe formats them, tokenized with completion-only labels (-100 on the prompt)."""
    from datasets import Dataset

    from lmsys_trl.data import load_arena
    from lmsys_trl.formatting import chat_token_ids, format_dataset
    from lmsys_trl.model import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZERS / "gemma-2"))
    formatted = format_dataset(load_arena([str(ARENA_SAMPLE)]).select(range(N_ROWS)), tokenizer, MAX_LENGTH)
    columns = {"input_ids": [], "labels": []}
    for record in formatted:
        ids = [t % VOCAB for t in chat_token_ids(tokenizer, record)]
        prompt = len(chat_token_ids(tokenizer, {"prompt": record["prompt"]}))
        columns["input_ids"].append(ids)
        columns["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(columns), tokenizer


def make_trainer(records, tmp_path, attn="eager", **fast_keys):
    from peft import LoraConfig

    dataset, tokenizer = records
    keys = dict(
        output_dir=str(tmp_path / "out"), max_length=MAX_LENGTH, per_device_train_batch_size=N_ROWS,
        gradient_checkpointing=False, completion_only_loss=True, report_to="none", use_cpu=True, bf16=False,
        max_steps=2, logging_steps=1, save_strategy="no", learning_rate=1e-3, seed=0,
    )
    args = FastSFTConfig(**{**keys, **fast_keys})
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = FastSFTTrainer(tiny_model(attn), args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    generator = torch.Generator().manual_seed(1)
    for name, param in sorted(trainer.model.named_parameters()):
        if "lora_B" in name:  # B starts at zero, which would leave every lora_A gradient zero
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return trainer


def loss_and_grads(trainer):
    """One training step's loss and LoRA gradients on the first N_ROWS rows (the batch the sampler would give)."""
    examples = [trainer.train_dataset[i] for i in range(N_ROWS)]
    collator = trainer.packing_collator or trainer.data_collator
    batch = collator(examples)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, batch, num_items)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    return loss.detach(), grads


def test_pack_rows_first_fit_decreasing():
    bins = pack_rows([5, 9, 3, 7, 1], budget=10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 1][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 25 tokens need 3 bins of 10
    with pytest.raises(ValueError, match="row 1 has 12 tokens"):
        pack_rows([3, 12], budget=10)


def test_collator_keeps_rows_whole_and_pads_as_separate_row():
    examples = [{"input_ids": [1] * n, "labels": [-100] * (n - 1) + [7]} for n in (5, 9, 3, 7)]
    batch = PackingCollator(pad_token_id=0, token_budget=12, pad_to_multiple_of=4)(examples)
    lengths = batch["micro_batch_lengths"]
    assert all(n % 4 == 0 and n <= 12 for n in lengths) and sum(lengths) == batch["input_ids"].shape[1]
    assert int((batch["labels"] == 7).sum()) == 4  # every answer token once
    positions = batch["position_ids"][0]
    starts = [0] + [int(x) for x in torch.tensor(lengths).cumsum(0)[:-1]]
    assert all(positions[s] == 0 for s in starts)  # each micro-batch starts a new row
    padded = batch["input_ids"][0] == 0
    assert (batch["labels"][0][padded] == -100).all()


def test_config_rejects_inconsistent_keys(tmp_path):
    with pytest.raises(ValueError, match="must be >= max_length"):
        FastSFTConfig(output_dir=str(tmp_path), max_length=256, pack_token_budget=128)
    with pytest.raises(ValueError, match="multiple of pad_to_multiple_of"):
        FastSFTConfig(output_dir=str(tmp_path), max_length=256, pack_token_budget=1000, pad_to_multiple_of=64)
    with pytest.raises(ValueError, match="fraction"):
        FastSFTConfig(output_dir=str(tmp_path), checkpointed_layers=1.5)


def test_packed_step_equals_padded_step(records, tmp_path):
    reference = make_trainer(records, tmp_path)
    fast = make_trainer(records, tmp_path, pack_token_budget=512, pad_to_multiple_of=64)
    ref_loss, ref_grads = loss_and_grads(reference)
    fast_loss, fast_grads = loss_and_grads(fast)
    assert len(fast.packing_collator([fast.train_dataset[i] for i in range(N_ROWS)])["micro_batch_lengths"]) > 1
    torch.testing.assert_close(fast_loss, ref_loss, **TOL)
    assert ref_grads.keys() == fast_grads.keys() and len(ref_grads) == 2 * 4 * 2  # layers x qkvo x A/B
    for name in ref_grads:
        assert ref_grads[name].abs().sum() > 0, name
        torch.testing.assert_close(fast_grads[name], ref_grads[name], **TOL, msg=name)


def test_compiled_layers_step_equals_padded_step(records, tmp_path, monkeypatch):
    """`compile_layers` (here the aot_eager backend: dynamo + AOT autograd without codegen, as CI has no GPU) with
    packing and one of two layers checkpointed: the reference's loss and LoRA gradients."""
    import functools

    import lmsys_trl.fast

    monkeypatch.setattr(lmsys_trl.fast, "compile_decoder_layers",
                        functools.partial(lmsys_trl.fast.compile_decoder_layers, backend="aot_eager"))
    ref_loss, ref_grads = loss_and_grads(make_trainer(records, tmp_path))
    fast = make_trainer(records, tmp_path, pack_token_budget=512, pad_to_multiple_of=512, compile_layers=True,
                        gradient_checkpointing=True, checkpointed_layers=0.5)
    if not fast.model.is_gradient_checkpointing:  # (the Trainer switches it on when training starts)
        fast.model.gradient_checkpointing_enable(fast.args.gradient_checkpointing_kwargs)
    limit_checkpointed_layers(fast.model, fast.args.checkpointed_layers)
    layers = lmsys_trl.fast.decoder_layers(fast.model)
    assert all(layer._compiled_call_impl for layer in layers) and [l.gradient_checkpointing for l in layers] == [1, 0]
    fast_loss, fast_grads = loss_and_grads(fast)
    torch.testing.assert_close(fast_loss, ref_loss, **TOL)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], **TOL, msg=name)


def test_padding_micro_batches_change_nothing(records, tmp_path, monkeypatch):
    """A process whose rows pack into fewer micro-batches than another's runs padding ones (TRL gathers metrics once
    per micro-batch): they add no loss and no gradient."""
    fast = make_trainer(records, tmp_path, pack_token_budget=512, pad_to_multiple_of=64)
    loss, grads = loss_and_grads(fast)
    calls = []
    original = FastSFTTrainer.compute_loss
    monkeypatch.setattr(FastSFTTrainer, "compute_loss", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    monkeypatch.setattr(FastSFTTrainer, "_most_micro_batches", lambda self, count: count + 2)  # another has 2 more
    padded_loss, padded_grads = loss_and_grads(fast)
    micro_batches = len(fast.packing_collator([fast.train_dataset[i] for i in range(N_ROWS)])["micro_batch_lengths"])
    assert len(calls) == micro_batches + 2 and fast.padded_steps == 1
    torch.testing.assert_close(padded_loss, loss, **TOL)
    for name in grads:
        torch.testing.assert_close(padded_grads[name], grads[name], **TOL, msg=name)


@pytest.mark.parametrize("attn", ["eager", FLEX_ATTENTION])
def test_packed_rows_never_attend_across(records, attn):
    """Logits of each row inside a packed sequence equal those of the row alone through eager attention."""
    register_flex_attention()
    dataset = records[0]
    model, eager = tiny_model(attn).eval(), tiny_model("eager").eval()
    rows = [dataset[i]["input_ids"] for i in range(3)]
    batch = PackingCollator(pad_token_id=0, token_budget=1024, pad_to_multiple_of=128)([{"input_ids": r} for r in rows])
    assert batch["micro_batch_lengths"] == [sum(map(len, rows)) // 128 * 128 + 128]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        order = sorted(range(3), key=lambda i: -len(rows[i]))  # first-fit-decreasing order inside the bin
        offset = 0
        for i in order:
            alone = eager(input_ids=torch.tensor([rows[i]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[offset : offset + len(rows[i])], alone, rtol=1e-4, atol=1e-4)
            offset += len(rows[i])


def test_train_with_packing_and_selective_checkpointing(records, tmp_path):
    trainer = make_trainer(
        records, tmp_path, pack_token_budget=512, pad_to_multiple_of=64,
        gradient_checkpointing=True, checkpointed_layers=0.5,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    layers = [m for m in trainer.model.modules() if hasattr(m, "gradient_checkpointing") and "Layer" in type(m).__name__]
    assert sum(layer.gradient_checkpointing for layer in layers) == 1  # 2 layers x 0.5
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_limit_checkpointed_layers_spreads_the_kept_layers(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.gradient_checkpointing_enable()
    assert limit_checkpointed_layers(model, 1.0) == 2
    assert limit_checkpointed_layers(model, 0.5) == 1
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    assert limit_checkpointed_layers(model, 0.0) == 0
