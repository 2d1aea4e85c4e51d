"""The training fast path is TRL's packing + transformers' packed-sequence attention + accelerate's regional
compilation: an optimiser step over packed sequences equals the padded step over the same rows.

Tolerance: float32 on CPU, only the summation order differs -> rtol 1e-4, atol 1e-6 (every LoRA gradient).
Flex attention has no backward on CPU, so it is checked on the forward (logits per row); its backward is torch's.
"""

import pytest
import torch
from transformers import TrainerCallback

from lmsys_trl.kernels import FLEX_ATTENTION, register_flex_attention
from lmsys_trl.trainer import ArenaSFTConfig, ArenaSFTTrainer

from conftest import ARENA_SAMPLE, TOKENIZERS


TOL = dict(rtol=1e-4, atol=1e-6)
N_ROWS = 6
ROW_MAX_LENGTH = 256
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
    formatted = format_dataset(load_arena([str(ARENA_SAMPLE)]).select(range(N_ROWS)), tokenizer, ROW_MAX_LENGTH)
    columns = {"input_ids": [], "labels": []}
    for record in formatted:
        ids = [t % VOCAB for t in chat_token_ids(tokenizer, record)]
        prompt = len(chat_token_ids(tokenizer, {"prompt": record["prompt"]}))
        columns["input_ids"].append(ids)
        columns["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(columns), tokenizer


class FirstStepGradients(TrainerCallback):
    """The LoRA gradients of the first optimiser step, as the optimiser is about to see them."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def first_step(records, tmp_path, attn="eager", **keys):
    """Train one optimiser step through `ArenaSFTTrainer.train()`; returns (gradients, trainer)."""
    from peft import LoraConfig

    dataset, tokenizer = records
    values = dict(
        output_dir=str(tmp_path / "out"), max_length=ROW_MAX_LENGTH, per_device_train_batch_size=N_ROWS,
        activation_checkpointing=False, completion_only_loss=True, report_to="none", use_cpu=True, bf16=False,
        max_steps=1, logging_steps=1, save_strategy="no", learning_rate=1e-3, seed=0, max_grad_norm=0.0,
    )
    args = ArenaSFTConfig(**{**values, **keys})
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    grads = FirstStepGradients()
    trainer = ArenaSFTTrainer(tiny_model(attn), args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora, callbacks=[grads])
    generator = torch.Generator().manual_seed(1)
    for name, param in sorted(trainer.model.named_parameters()):
        if "lora_B" in name:  # B starts at zero, which would leave every lora_A gradient zero
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    trainer.train()
    return grads.grads, trainer


def packed_keys(records, tmp_path, budget=512, **extra):
    """Recipe keys of the packed path whose one optimiser step takes every packed sequence (all N_ROWS rows)."""
    from trl.data_utils import pack_dataset

    sequences = len(pack_dataset(records[0], budget, "bfd"))
    assert 1 < sequences < N_ROWS  # several rows per sequence, several sequences per step
    return dict(packing=True, packing_strategy="bfd", max_length=budget, pad_to_multiple_of=budget,
                per_device_train_batch_size=1, gradient_accumulation_steps=sequences, **extra)


def assert_same_gradients(grads, reference):
    assert grads.keys() == reference.keys() and len(reference) == 2 * 4 * 2  # layers x qkvo x A/B
    for name in reference:
        assert reference[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], reference[name], **TOL, msg=name)


@pytest.mark.slow
def test_packed_step_equals_padded_step(records, tmp_path):
    reference, _ = first_step(records, tmp_path)
    grads, trainer = first_step(records, tmp_path, **packed_keys(records, tmp_path))
    assert "seq_lengths" in trainer.train_dataset.column_names  # TRL packed the rows
    assert_same_gradients(grads, reference)


@pytest.mark.slow
def test_regional_compilation_and_every_other_layer_checkpointed_give_the_same_step(records, tmp_path, monkeypatch):
    """accelerate's regional compilation (aot_eager: dynamo + AOT autograd without codegen, as CI has no GPU) and
    transformers' `every_n_layers` checkpointing on the packed path: the padded step's gradients."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
    reference, _ = first_step(records, tmp_path)
    keys = packed_keys(records, tmp_path, torch_compile=True, torch_compile_backend="aot_eager",
                       activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 2})
    grads, trainer = first_step(records, tmp_path, **keys)
    layers = trainer.model.base_model.model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert trainer.accelerator.state.dynamo_plugin.use_regional_compilation
    assert_same_gradients(grads, reference)


@pytest.mark.parametrize("attn", ["eager", pytest.param(FLEX_ATTENTION, marks=pytest.mark.slow)])
def test_packed_rows_never_attend_across(records, attn, monkeypatch):
    """Logits of each row inside a padding-free packed sequence (TRL's collator, padded to a multiple) equal those
    of the row alone through eager attention. transformers compiles flex attention; on the CPU inductor's C++ code
    for it has failed to build with g++ 12 (`CppCompileError: 'cur_kvSplitSize6' was not declared`), so here the same
    flex_attention runs uncompiled: the mask and softcap it is given are what is tested."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as library_flex
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    monkeypatch.setattr(library_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    register_flex_attention()
    dataset = records[0]
    model, eager = tiny_model(attn).eval(), tiny_model("eager").eval()
    rows = [dataset[i]["input_ids"] for i in range(3)]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=128)
    batch = collator([{"input_ids": r} for r in rows])
    assert batch["input_ids"].shape[1] == sum(map(len, rows)) // 128 * 128 + 128
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for ids in rows:
            alone = eager(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[offset : offset + len(ids)], alone, rtol=1e-4, atol=1e-4)
            offset += len(ids)
