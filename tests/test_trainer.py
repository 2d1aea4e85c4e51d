"""ArenaSFTTrainer (lmsys_trl.trainer): soft labels, swap-consistent training, A/B/C metrics; the teacher data
(lmsys_trl.teachers), pseudo-labels (lmsys_trl.pseudo_labels) and the attention-softcapping switch."""

import math
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from lmsys_trl.data import TEACHER_COLUMNS, WINNER_COLUMNS, DataError, load_arena, swap_row
from lmsys_trl.pseudo_labels import write_pseudo_labels
from lmsys_trl.teachers import TEACHER_PROBS, attach_teachers, pair_with_swaps, with_teacher_probs
from lmsys_trl.trainer import (
    ArenaSFTConfig,
    ArenaSFTTrainer,
    PairedSampler,
    SoftLabelCollator,
    answer_positions,
    soft_label_loss,
    symmetry_penalty,
)

from conftest import ARENA_SAMPLE, KAGGLE_TEST, REPO


MAX_LENGTH = 160
TEACHER = [0.6, 0.1, 0.3]


def arena_csv(tmp_path, rows=4, teacher=None, name="arena.csv"):
    """The first `rows` rows of the shared sample, optionally with teacher columns (a list of 3 values per row)."""
    frame = pd.read_csv(ARENA_SAMPLE, dtype=str, keep_default_na=False).head(rows)
    if teacher is not None:
        for k, column in enumerate(TEACHER_COLUMNS):
            frame[column] = [t[k] for t in teacher]
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


# ----------------------------------------------------------------------------------------------- data


def test_teacher_columns_are_kept_validated_and_swapped(tmp_path):
    teacher = [[0.2, 0.5, 0.3], ["", "", ""], [1.0, 0.0, 0.0]]
    rows = load_arena(arena_csv(tmp_path, 3, teacher))
    assert rows.column_names[-3:] == list(TEACHER_COLUMNS)
    assert [rows[0][c] for c in TEACHER_COLUMNS] == [0.2, 0.5, 0.3]
    assert rows[1]["teacher_a"] is None  # no teacher on that row: trains on its hard label
    swapped = swap_row(rows[0])
    assert [swapped[c] for c in TEACHER_COLUMNS] == [0.5, 0.2, 0.3]
    assert swapped["label"] == {0: 1, 1: 0, 2: 2}[rows[0]["label"]]
    assert "teacher_a" not in load_arena(arena_csv(tmp_path, 2)).column_names  # files without: schema unchanged
    targets = with_teacher_probs(rows)[TEACHER_PROBS]
    assert targets[0] == [0.2, 0.5, 0.3] and targets[1] == [float(rows[1]["label"] == k) for k in range(3)]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([-0.1, 0.6, 0.5], "non-negative and sum to 1"),
        ([0.2, 0.2, 0.2], "non-negative and sum to 1"),
        (["0.5", "", "0.5"], "finite"),
        (["inf", 0.0, 0.0], "finite"),
        (["x", 0.5, 0.5], "must be numbers"),
    ],
)
def test_bad_teacher_probabilities_name_file_and_row(tmp_path, bad, message):
    path = arena_csv(tmp_path, 2, [[0.2, 0.5, 0.3], bad])
    row_id = pd.read_csv(path, dtype=str)["id"][1]
    with pytest.raises(DataError, match=message) as err:
        load_arena(path)
    assert path in str(err.value) and f"row id {row_id}" in str(err.value)


def test_partial_teacher_columns_are_refused(tmp_path):
    path = arena_csv(tmp_path, 2, [[0.2, 0.5, 0.3]] * 2)
    pd.read_csv(path, dtype=str).drop(columns=["teacher_tie"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="teacher_tie"):
        load_arena(path)


def test_teacher_files_join_predictions_parquet_by_id(tmp_path):
    rows = load_arena(arena_csv(tmp_path, 3))
    predictions = tmp_path / "predictions.parquet"
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    pd.DataFrame({"id": rows["id"][:2], "label": rows["label"][:2],
                  **{c: probs[:, k] for k, c in enumerate(WINNER_COLUMNS)}}).to_parquet(predictions)
    joined = attach_teachers(rows, [str(predictions)])
    assert np.allclose([[joined[i][c] for c in TEACHER_COLUMNS] for i in range(2)], probs)
    assert joined[2]["teacher_a"] is None
    pd.DataFrame({"id": ["nope"], **{c: [1 / 3] for c in WINNER_COLUMNS}}).to_parquet(predictions)
    with pytest.raises(DataError, match="no teacher row matches"):
        attach_teachers(rows, [str(predictions)])
    pd.DataFrame({"id": rows["id"][:1], **{c: [0.9] for c in WINNER_COLUMNS}}).to_parquet(predictions)
    with pytest.raises(DataError, match=f"predictions.parquet: row id {rows['id'][0]}"):
        attach_teachers(rows, [str(predictions)])


# ----------------------------------------------------------------------------------------------- collators


def test_collators_put_each_rows_teacher_on_its_answer_position():
    """Padded and padding-free (TRL's collator both): the teacher at each answer position is that row's own."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = []
    for i, length in enumerate([9, 5, 7, 4]):  # distinct lengths: packed rows stay identifiable
        labels = [-100] * (length - 2) + [100 + i, 1]
        examples.append({"input_ids": list(range(2, length + 2)), "labels": labels,
                         TEACHER_PROBS: [i / 10, 1 - i / 10, 0.0]})
    padded = SoftLabelCollator(DataCollatorForLanguageModeling(pad_token_id=0))(examples)
    packing = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)
    packed = SoftLabelCollator(packing)(examples)
    for batch in (padded, packed):
        assert batch[TEACHER_PROBS].shape == (*batch["input_ids"].shape, 3)
        rows, positions = answer_positions(batch["labels"])
        assert len(rows) == len(examples)
        for r, p in zip(rows, positions):
            i = int(batch["labels"][r, p + 1]) - 100  # the answer token names the example
            assert batch[TEACHER_PROBS][r, p].tolist() == pytest.approx(examples[i][TEACHER_PROBS])
    assert packed["input_ids"].shape == (1, 32)  # 25 tokens padded to a multiple of 8


# ----------------------------------------------------------------------------------------------- loss


def test_soft_label_loss_and_symmetry_penalty_values():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.5, 2.0, -1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([TEACHER] * 4)
    expected = -(targets * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(soft_label_loss(logits, targets), expected)
    penalty = symmetry_penalty(logits)
    assert penalty[0].item() == pytest.approx(0.0, abs=1e-7)  # (2, .5, -1) and its swap (.5, 2, -1) agree
    p, q = torch.softmax(logits[2], -1), torch.softmax(logits[3], -1)[[1, 0, 2]]
    assert penalty[1].item() == pytest.approx(0.5 * float(((p - q) * (p.log() - q.log())).sum()))
    assert penalty[1] > 0
    with pytest.raises(ValueError, match="whole swap pairs"):
        symmetry_penalty(logits[:3])


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), max_length=MAX_LENGTH, completion_only_loss=True, packing=False,
        activation_checkpointing=False, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=5e-3, max_steps=1, lr_scheduler_type="constant", report_to="none", save_strategy="no",
        use_cpu=True, seed=0, logging_steps=1, dataloader_drop_last=False,
    )
    return ArenaSFTConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def rows(tiny_llama, tmp_path_factory):
    """Four sample rows with a fixed teacher distribution, and the tokenizer."""
    from lmsys_trl.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama))
    path = arena_csv(tmp_path_factory.mktemp("data"), 4, [TEACHER] * 4)
    return load_arena(path), tokenizer


def formatted(rows, tokenizer, teacher=True, pairs=False):
    from lmsys_trl.formatting import format_dataset

    data = pair_with_swaps(rows) if pairs else rows
    data = format_dataset(data, tokenizer, MAX_LENGTH)
    return with_teacher_probs(data) if teacher else data.remove_columns(list(TEACHER_COLUMNS))


def trainer_for(model_path, tokenizer, train, args, peft=False):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM") if peft else None
    return ArenaSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora)


def first_batch(trainer, size=None):
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    examples = [dataset[i] for i in range(size or len(dataset))]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def full_logits_letters(model, batch, letter_ids):
    """A/B/C logits at each answer position from the model's plain forward (full logits, no fused head)."""
    rows, positions = answer_positions(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[rows, positions][:, letter_ids]


@pytest.mark.slow
def test_weight_zero_equals_hard_path_and_mix_is_exact(rows, tiny_llama, tmp_path):
    data, tokenizer = rows
    plain = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer, teacher=False), config(tmp_path))
    zero = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer), config(tmp_path, soft_label_weight=0.0))
    half = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer), config(tmp_path, soft_label_weight=0.5))
    hard_batch, soft_batch = first_batch(plain, 2), first_batch(zero, 2)
    assert TEACHER_PROBS in soft_batch and TEACHER_PROBS not in hard_batch
    for trainer in (plain, zero, half):
        trainer.model.train()
    hard = plain.compute_loss(plain.model, dict(hard_batch))
    assert torch.equal(zero.compute_loss(zero.model, dict(soft_batch)), hard)
    mixed = half.compute_loss(half.model, dict(soft_batch))
    letters = full_logits_letters(half.model, soft_batch, half.letter_ids)
    teacher = torch.tensor([TEACHER] * len(letters))
    soft = -(teacher * torch.log_softmax(letters, -1)).sum(-1).mean()
    assert mixed.item() == pytest.approx(0.5 * hard.item() + 0.5 * soft.item(), rel=1e-5)
    assert half._metrics["train"]["soft_label_loss"][-1] == pytest.approx(soft.item(), rel=1e-5)
    # evaluation (prediction_step) goes through the same loss and pops the teacher tensor before the forward
    loss, _, _ = half.prediction_step(half.model, dict(soft_batch), prediction_loss_only=True)
    assert math.isfinite(loss.item())


@pytest.mark.slow
def test_padding_free_batches_give_the_padded_soft_label_loss(rows, tiny_llama, tmp_path):
    data, tokenizer = rows
    padded_args = config(tmp_path, soft_label_weight=0.5)
    padded_trainer = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer), padded_args)
    args = config(tmp_path, soft_label_weight=0.5, padding_free=True, pad_to_multiple_of=8, max_length=None)
    trainer = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer), args)
    trainer.model.train()
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    examples = [dataset[i] for i in range(2)]
    packed = trainer._prepare_inputs(trainer.data_collator(examples))
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # both rows, one flat sequence
    padded = padded_trainer._prepare_inputs(padded_trainer.data_collator(examples))
    loss_packed = trainer.compute_loss(trainer.model, packed)
    loss_padded = trainer.compute_loss(trainer.model, padded)
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-4)
    assert trainer._metrics["train"]["soft_label_loss"][-2] == pytest.approx(
        trainer._metrics["train"]["soft_label_loss"][-1], rel=1e-4)


@pytest.mark.slow
def test_training_on_a_fixed_teacher_moves_letter_probabilities_toward_it(rows, tiny_llama, tmp_path):
    data, tokenizer = rows
    args = config(tmp_path, soft_label_weight=1.0, max_steps=4, learning_rate=3e-2)
    trainer = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer), args, peft=True)
    batch = first_batch(trainer)
    teacher = torch.tensor(TEACHER)

    def kl_to_teacher():
        trainer.model.eval()
        with torch.no_grad():
            probs = torch.softmax(full_logits_letters(trainer.model, batch, trainer.letter_ids), -1)
        return float((teacher * (teacher.log() - probs.log())).sum(-1).mean()), probs.mean(0)

    before, _ = kl_to_teacher()
    trainer.train()
    after, mean_probs = kl_to_teacher()
    assert after < 0.3 * before, (before, after)
    assert torch.allclose(mean_probs, teacher, atol=0.1), mean_probs


@pytest.mark.slow
def test_sft_script_trains_on_teacher_files_with_swap_pairs(tiny_llama, tmp_path):
    """scripts/sft.py end to end: --teacher_files (a predictions.parquet) + --swap_pairs + --soft_label_weight."""
    import importlib.util

    data = arena_csv(tmp_path, 10)
    ids = pd.read_csv(data, dtype=str)["id"]
    predictions = tmp_path / "predictions.parquet"
    pd.DataFrame({"id": ids, **{c: [p] * len(ids) for c, p in zip(WINNER_COLUMNS, TEACHER)}}).to_parquet(predictions)
    spec = importlib.util.spec_from_file_location("sft_script", REPO / "scripts" / "sft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trainer, metrics = script.cli([
        str(REPO / "tests" / "recipes" / "tiny.yaml"), "--model_name_or_path", str(tiny_llama),
        "--output_dir", str(tmp_path / "out"), "--train_files", data, "--teacher_files", str(predictions),
        "--max_length", str(MAX_LENGTH), "--max_train_rows", "3", "--max_val_rows", "2", "--swap_augment", "0",
        "--swap_pairs", "true", "--soft_label_weight", "0.5", "--max_steps", "2",
    ])
    train_ids = trainer.train_dataset["id"]
    assert len(train_ids) == 6 and train_ids[0::2] == train_ids[1::2]
    assert trainer.train_dataset[1][TEACHER_PROBS] == [TEACHER[1], TEACHER[0], TEACHER[2]]
    logged = [h for h in trainer.state.log_history if "soft_label_loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["soft_label_loss"]) for h in logged)
    assert 0 < metrics["eval_log_loss"] < 5


# ----------------------------------------------------------------------------------------------- swap pairs


def letters_of(batch, letter_ids):
    rows, positions = answer_positions(batch["labels"])
    return [letter_ids.index(int(t)) for t in batch["labels"][rows, positions + 1]]


@pytest.mark.parametrize("batch_size, accumulation", [(2, 1), (1, 2)])
def test_swap_pairs_share_an_optimisation_step_with_swapped_labels(rows, tiny_llama, tmp_path, batch_size,
                                                                   accumulation):
    data, tokenizer = rows
    args = config(tmp_path, swap_pairs=True, per_device_train_batch_size=batch_size,
                  gradient_accumulation_steps=accumulation)
    trainer = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer, pairs=True), args)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) * batch_size == 2 * len(data)
    steps = [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]
    for step in steps:  # one optimisation step = `accumulation` micro-batches = one (row, swapped row) pair
        inputs = [b["input_ids"][r] for b in step for r in range(len(b["input_ids"]))]
        letters = [x for b in step for x in letters_of(b, trainer.letter_ids)]
        teachers = [b[TEACHER_PROBS][r, 0].tolist() for b in step for r in range(len(b["input_ids"]))]
        assert letters[1] == [1, 0, 2][letters[0]]
        assert teachers[1] == pytest.approx([teachers[0][1], teachers[0][0], teachers[0][2]])
        assert not torch.equal(inputs[0], inputs[1])
    seen = [tuple(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"])]
    assert sorted(seen) == sorted(map(tuple, trainer.train_dataset["input_ids"]))  # every row exactly once
    sampler = PairedSampler(12, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(12)) and all(order[i] // 2 == order[i + 1] // 2 for i in range(0, 12, 2))
    assert order != list(range(12))  # pairs are shuffled
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_swap_pairs_refuse_rows_that_are_not_pairs(rows, tiny_llama, tmp_path):
    data, tokenizer = rows
    trainer = trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer), config(tmp_path, swap_pairs=True))
    with pytest.raises(ValueError, match="not \\(row, swapped row\\) pairs"):
        trainer.get_train_dataloader()


@pytest.mark.slow
def test_symmetry_penalty_enters_the_loss(rows, tiny_llama, tmp_path):
    data, tokenizer = rows
    train = formatted(data, tokenizer, pairs=True)
    plain = trainer_for(tiny_llama, tokenizer, train, config(tmp_path, swap_pairs=True))
    sym = trainer_for(tiny_llama, tokenizer, train, config(tmp_path, swap_pairs=True, symmetry_weight=2.0))
    batch = first_batch(sym, 4)  # rows 0-3: two (row, swapped row) pairs
    plain.model.train(), sym.model.train()
    letters = full_logits_letters(sym.model, batch, sym.letter_ids)
    expected = 2.0 * 2 * symmetry_penalty(letters).sum() / 4
    difference = sym.compute_loss(sym.model, dict(batch)) - plain.compute_loss(plain.model, dict(batch))
    assert difference.item() == pytest.approx(expected.item(), rel=1e-4) and expected > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(swap_pairs=True, per_device_train_batch_size=1, gradient_accumulation_steps=3), "even number of rows"),
        (dict(symmetry_weight=1.0), "needs swap_pairs"),
        (dict(soft_label_weight=0.5, packing=True), "dataset-level packing"),
        (dict(swap_pairs=True, packing=True), "dataset-level packing"),
        (dict(soft_label_weight=1.5), "soft_label_weight"),
    ],
)
def test_config_refuses_inconsistent_keys(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_soft_label_weight_without_teacher_is_refused(rows, tiny_llama, tmp_path):
    data, tokenizer = rows
    with pytest.raises(ValueError, match="needs teacher probabilities"):
        trainer_for(tiny_llama, tokenizer, formatted(data, tokenizer, teacher=False),
                    config(tmp_path, soft_label_weight=0.5))


# ----------------------------------------------------------------------------------------------- pseudo-labels


def test_pseudo_labels_close_the_loop(tmp_path):
    import importlib.util

    data = load_arena(str(KAGGLE_TEST))
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], size=len(data))
    predictions = tmp_path / "predictions.parquet"
    pd.DataFrame({"id": data["id"], "label": data["label"],
                  **{c: probs[:, k] for k, c in enumerate(WINNER_COLUMNS)}}).to_parquet(predictions)
    spec = importlib.util.spec_from_file_location("pseudo_label", REPO / "scripts" / "pseudo_label.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "pseudo.csv"
    script.main(["--predictions", str(predictions), "--data", str(KAGGLE_TEST), "--out", str(out)])
    rows = load_arena(str(out))  # a valid labelled training file with soft labels
    assert rows["id"] == data["id"] and rows["prompt"] == data["prompt"] and rows["response_b"] == data["response_b"]
    assert rows["label"] == probs.argmax(1).tolist()
    assert np.allclose([[r[c] for c in TEACHER_COLUMNS] for r in rows], probs)
    kept = write_pseudo_labels(str(predictions), [str(KAGGLE_TEST)], str(tmp_path / "p.parquet"), min_confidence=0.6)
    assert len(kept) == int((probs.max(1) >= 0.6).sum())
    pd.DataFrame({"id": data["id"][1:], **{c: probs[1:, k] for k, c in enumerate(WINNER_COLUMNS)}}).to_parquet(
        predictions)
    with pytest.raises(DataError, match=f"no row for id\\(s\\) \\['{data['id'][0]}'\\]"):
        write_pseudo_labels(str(predictions), [str(KAGGLE_TEST)], str(tmp_path / "bad.csv"))
    assert not (tmp_path / "bad.csv").exists()


# ----------------------------------------------------------------------------------------------- softcapping


def test_softcapping_switch_reaches_the_attention_call(tiny_gemma):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gemma2 import modeling_gemma2

    from lmsys_trl.kernels import DOT_PRODUCT_ATTENTION, attention_kwargs

    ids = torch.tensor([[2, 651, 603, 476, 2121, 235265]])

    def run(softcapping, requested=None):
        kwargs = attention_kwargs(str(tiny_gemma), requested, softcapping=softcapping)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma), dtype=torch.float32, **kwargs)
        name = model.config._attn_implementation
        kernel = modeling_gemma2.eager_attention_forward if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]
        spy = mock.Mock(side_effect=kernel)
        patch = (mock.patch.object(modeling_gemma2, "eager_attention_forward", spy) if name == "eager"
                 else mock.patch.dict(ALL_ATTENTION_FUNCTIONS._global_mapping, {name: spy}))
        with patch, torch.no_grad():
            logits = model(input_ids=ids).logits
        return name, {call.kwargs["softcap"] for call in spy.call_args_list}, logits

    name, softcaps, _ = run(True)
    assert name == "eager" and softcaps == {50.0}  # the model's own setting (Gemma2Config default)
    name, softcaps, off = run(False, "eager")
    assert name == "eager" and softcaps == {None}
    name, softcaps, sdpa = run(False)
    assert name == DOT_PRODUCT_ATTENTION and softcaps == {None}  # SDPA opens for gemma-2
    assert torch.allclose(off, sdpa, atol=1e-5)  # the same attention through both kernels


def test_scoring_loads_gemma_without_softcapping_when_asked(tiny_gemma):
    from lmsys_trl.kernels import DOT_PRODUCT_ATTENTION
    from lmsys_trl.model import load_model

    default = load_model(str(tiny_gemma), [], precision="fp32", device="cpu")
    assert default.config.attn_logit_softcapping == 50.0 and default.config._attn_implementation == "eager"
    off = load_model(str(tiny_gemma), [], precision="fp32", device="cpu", attn_softcapping=False)
    assert off.config.attn_logit_softcapping is None and off.config._attn_implementation == DOT_PRODUCT_ATTENTION
