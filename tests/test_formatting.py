import pytest

from lmsys_trl.data import load_arena
from lmsys_trl.formatting import chat_token_ids, comparison_text, format_dataset, to_messages
from lmsys_trl.model import letter_token_ids

from conftest import ARENA_SAMPLE


END_OF_ANSWER = {"gemma-2": "<end_of_turn>\n", "llama-3.1": "<|eot_id|>"}

EXPECTED_TWO_TURNS = """Here are two question-answering dialogues. Compare two models' performance on answering questions, determine which is better.
#Prompt1
What is 2+2?
#Response
##Model A
4
##Model B
Four.
#Prompt2
And 3+3?
#Response
##Model A
None
##Model B
6
###options
A. Model A
B. Model B
C. Tie"""  # noqa: E501 (the prompt text as the model sees it, one line)


def family(tokenizer):
    return "gemma-2" if "gemma" in tokenizer.name_or_path else "llama-3.1"


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_user_message_is_the_recipe_text_exactly(tokenizer):
    text = comparison_text(["What is 2+2?", "And 3+3?"], ["4", "None"], ["Four.", "6"], tokenizer, 2200)
    assert text == EXPECTED_TWO_TURNS


def test_sft_trainer_feeds_the_template_tokenized_once(tiny_gemma, tiny_llama, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from lmsys_trl.model import load_tokenizer

    rows = load_arena(str(ARENA_SAMPLE)).select(range(6))
    for path in (tiny_gemma, tiny_llama):
        tokenizer = load_tokenizer(str(path))
        formatted = format_dataset(rows, tokenizer, 300)
        args = SFTConfig(output_dir=str(tmp_path), max_length=300, completion_only_loss=True, use_cpu=True,
                         report_to="none", gradient_checkpointing=False)
        trainer = SFTTrainer(model=str(path), args=args, train_dataset=formatted, processing_class=tokenizer)
        expected_tail = END_OF_ANSWER["gemma-2" if "gemma" in str(path) else "llama-3.1"]
        for record, fed in zip(formatted, trainer.train_dataset):
            ids = chat_token_ids(tokenizer, record)
            assert fed["input_ids"] == ids
            assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
            answer = [t for t, label in zip(fed["input_ids"], fed["labels"]) if label != -100]
            first = fed["labels"].index(answer[0])
            assert all(label == -100 for label in fed["labels"][:first])  # prompt fully masked
            assert answer[0] == letter_token_ids(tokenizer)[record_label(record)]
            assert tokenizer.decode(answer) == record["completion"][0]["content"] + expected_tail


def record_label(record):
    return "ABC".index(record["completion"][0]["content"])


def test_long_conversation_keeps_the_last_turns_within_budget(tokenizer):
    prompts = [f"question {i} " + "word " * 60 for i in range(6)]
    a = [f"answer a{i} " + "alpha " * 60 for i in range(6)]
    b = [f"answer b{i} " + "beta " * 60 for i in range(6)]
    for mode in ("train", "infer"):
        text = comparison_text(prompts, a, b, tokenizer, 700, mode)
        label = 0 if mode == "train" else None
        assert len(chat_token_ids(tokenizer, to_messages(text, label))) <= 700
        assert "question 5" in text and "answer b5" in text  # the most recent turn survives
        assert "question 0" not in text  # the oldest does not
        assert text.count("#Prompt") >= 2 and "#Prompt1\n" in text  # numbering restarts in the packed row


def test_single_overlong_turn_is_split_per_recipe(tokenizer):
    prompt, a, b = "p " * 3000, "a " * 3000, "b " * 3000
    text = comparison_text([prompt], [a], [b], tokenizer, 2200, "train")
    assert len(chat_token_ids(tokenizer, to_messages(text, 0))) <= 2200
    body = text.split("#Prompt1\n")[1]
    p_part, rest = body.split("\n#Response\n##Model A\n")
    a_part, b_part = rest.split("\n##Model B\n")
    b_part = b_part.split("\n###options")[0]
    p_len, a_len, b_len = (n_tokens(tokenizer, x) for x in (p_part, a_part, b_part))
    assert a_len == pytest.approx(b_len, abs=2)
    assert p_len == pytest.approx((p_len + a_len + b_len) / 5, rel=0.05)  # prompt gets a fifth
    assert p_len + a_len + b_len > 2200 - 200  # the budget is used, not wasted

    text = comparison_text([prompt], [a], [b], tokenizer, 4000, "infer")  # room for the full 300/800/800
    body = text.split("#Prompt1\n")[1]
    p_part, rest = body.split("\n#Response\n##Model A\n")
    a_part = rest.split("\n##Model B\n")[0]
    assert n_tokens(tokenizer, p_part) == pytest.approx(300, abs=2)
    assert n_tokens(tokenizer, a_part) == pytest.approx(800, abs=2)
    gemma_infer = comparison_text([prompt], [a], [b], tokenizer, 1900, "infer")  # 300/800/800 scaled to fit
    assert len(chat_token_ids(tokenizer, to_messages(gemma_infer))) <= 1900


def test_every_real_row_fits_its_budget(tokenizer):
    rows = load_arena(str(ARENA_SAMPLE))
    for mode, max_length in (("train", 512), ("infer", 400)):
        formatted = format_dataset(rows, tokenizer, max_length, mode)
        expected = ["id", "label", "prompt"] + (["completion"] if mode == "train" else [])
        assert sorted(formatted.column_names) == sorted(expected)
        lengths = [len(chat_token_ids(tokenizer, r)) for r in formatted]
        assert max(lengths) <= max_length and min(lengths) > 50
        if mode == "infer":
            assert chat_token_ids(tokenizer, formatted[0])[-3:] != chat_token_ids(tokenizer, to_messages("x", 0))[-3:]


def test_format_dataset_caches_and_parallelises(tmp_path):
    from lmsys_trl.model import load_tokenizer

    from conftest import TOKENIZERS

    tokenizer = load_tokenizer(str(TOKENIZERS / "llama-3.1"))
    rows = load_arena(str(ARENA_SAMPLE)).select(range(12))
    first = format_dataset(rows, tokenizer, 300, cache_dir=tmp_path)
    cached = list(tmp_path.glob("formatted-*.arrow"))
    assert len(cached) == 1
    again = format_dataset(rows, tokenizer, 300, cache_dir=tmp_path)
    assert again.cache_files and again.cache_files[0]["filename"] == str(cached[0])
    parallel = format_dataset(rows, tokenizer, 300, num_proc=2)
    assert first.to_list() == again.to_list() == parallel.to_list()
    other_budget = format_dataset(rows, tokenizer, 280, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("formatted-*.arrow"))) == 2 and other_budget.to_list() != first.to_list()


def test_training_needs_labels(tokenizer):
    from conftest import KAGGLE_TEST

    with pytest.raises(ValueError, match="training rows need labels"):
        format_dataset(load_arena(str(KAGGLE_TEST)), tokenizer, 512, "train")


# ------------------------------------------------------------------------------------------ issue 15, item 9


def _fixed(tokenizer, mode):
    """Tokens of the record without any turn (header, options, chat template, the answer in training)."""
    from lmsys_trl.formatting import render_text

    return len(chat_token_ids(tokenizer, to_messages(render_text([]), 0 if mode == "train" else None)))


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_budgets_at_the_edge_of_the_fixed_text_end_or_are_refused(tokenizer, mode, monkeypatch):
    """Every max_length from the fixed text up: the row fits (a head of every part kept), or a one-line refusal
    saying how many tokens a turn needs. Before the fix a few values past the fixed text never returned."""
    import lmsys_trl.formatting as formatting

    calls = []
    real = formatting._last_packed_row

    def counted(*args):
        calls.append(1)
        assert len(calls) < 500, "the budget loop does not end"
        return real(*args)

    monkeypatch.setattr(formatting, "_last_packed_row", counted)
    turn = (["long prompt " * 200], ["answer a " * 300], ["answer b " * 300])
    fixed = _fixed(tokenizer, mode)
    needed = None  # the smallest max_length that fits, walking down from one that surely does
    for max_length in range(fixed + 60, fixed - 3, -1):
        calls.clear()
        try:
            text = comparison_text(*turn, tokenizer, max_length, mode)
        except ValueError as err:
            message = str(err)
            assert isinstance(err, formatting.BudgetError) and "needs at least" in message, message
            assert f"max_length={max_length}" in message and "\n" not in message
            assert int(message.split("needs at least ")[1].split()[0]) > max_length
            needed = needed or max_length + 1
            continue
        assert needed is None, f"max_length={max_length} fits, but {needed - 1} was refused"
        assert len(chat_token_ids(tokenizer, to_messages(text, 0 if mode == "train" else None))) <= max_length
        body = text.split("#Prompt1\n")[1]
        assert not body.startswith("\n#Response") and "\n##Model B\n\n###options" not in body  # no part emptied
    assert needed is not None and needed <= fixed + 40  # small budgets still work; only the impossible is refused
    calls.clear()
    with pytest.raises(formatting.BudgetError, match=rf"needs at least {needed} "):
        comparison_text(*turn, tokenizer, needed - 1, mode)


@pytest.mark.slow
def test_checked_error_in_a_formatting_worker_is_one_line(capsys):
    """A TemplateError raised inside a `num_proc > 1` worker (here: a chat template that rejects one row's text)
    reaches the user as the same one-line error, not the worker's traceback."""
    from lmsys_trl.configs import run_main
    from lmsys_trl.model import load_tokenizer

    from conftest import TOKENIZERS

    tokenizer = load_tokenizer(str(TOKENIZERS / "llama-3.1"))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}{{ raise_exception('no FORBIDDEN here') }}"
        "{% endif %}{% endfor %}" + tokenizer.chat_template
    )
    rows = load_arena(str(ARENA_SAMPLE)).select(range(4)).to_list()
    rows[3]["response_a"] = ["FORBIDDEN"] * len(rows[3]["response_a"])
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    with pytest.raises(SystemExit) as exited:
        run_main(lambda argv: format_dataset(dataset, tokenizer, 400, "train", num_proc=2))
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr and len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    assert "its chat template cannot render" in errors[0] and "no FORBIDDEN here" in errors[0]
