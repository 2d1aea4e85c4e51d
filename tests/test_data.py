import json

import pandas as pd
import pytest

from lmsys_trl.data import DataError, group_key, load_arena, split_train_val, swap_augment

from conftest import ARENA_SAMPLE, KAGGLE_TEST, PANDALM


def kaggle_row(row_id, prompt=("Hi",), a=("Hello",), b=("Hey",), winner=(1, 0, 0)):
    return {
        "id": row_id,
        "model_a": "m1",
        "model_b": "m2",
        "prompt": json.dumps(list(prompt)),
        "response_a": json.dumps(list(a)),
        "response_b": json.dumps(list(b)),
        **dict(zip(("winner_model_a", "winner_model_b", "winner_tie"), winner)),
    }


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_real_files_load_with_labels_and_ids():
    arena = load_arena(str(ARENA_SAMPLE))
    assert len(arena) == 100 and arena.column_names == ["id", "prompt", "response_a", "response_b", "label"]
    assert sorted(set(arena["label"])) == [0, 1, 2]
    assert [arena["label"].count(k) for k in (0, 1, 2)] == [31, 33, 36]  # counts from the data README
    row = arena[0]
    assert len(row["prompt"]) == len(row["response_a"]) == len(row["response_b"])
    test = load_arena(str(KAGGLE_TEST))
    assert test["id"] == ["136060", "211333", "1233961"] and set(test["label"]) == {-1}
    assert len(test[2]["prompt"]) == 2


def test_pandalm_empty_responses_become_none_and_labels_match_readme():
    rows = load_arena(str(PANDALM))
    assert [rows["label"].count(k) for k in (0, 1, 2)] == [422, 472, 105]
    empties = sum(r == ["None"] for col in ("response_a", "response_b") for r in rows[col])
    assert empties >= 54  # the README's 54 empty strings (plus any literal "None")


def test_several_files_and_formats_concatenate(tmp_path):
    rows = [kaggle_row(1), kaggle_row(2, winner=(0, 0, 1))]
    csv = write_csv(tmp_path / "a.csv", rows[:1])
    pd.DataFrame(rows[1:]).to_parquet(tmp_path / "b.parquet")
    pd.DataFrame([kaggle_row(3, winner=(0, 1, 0))]).to_json(tmp_path / "c.jsonl", orient="records", lines=True)
    ds = load_arena([csv, str(tmp_path / "b.parquet"), str(tmp_path / "c.jsonl")])
    assert ds["id"] == ["1", "2", "3"] and ds["label"] == [0, 2, 1]


def test_null_turns_become_text_none(tmp_path):
    row = kaggle_row(7, prompt=("q1", "q2"), a=(None, "x"), b=("", "y"))
    ds = load_arena(write_csv(tmp_path / "t.csv", [row]))
    assert ds[0]["response_a"] == ["None", "x"] and ds[0]["response_b"] == ["None", "y"]


def test_extra_arena_schema_ties_and_dedup(tmp_path):
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    extra = [
        {"question_id": "q1", "model_a": "x", "model_b": "y", "winner": "tie (bothbad)",
         "conversation_a": conv("Q", "A1"), "conversation_b": conv("Q", "B1")},
        {"question_id": "q2", "model_a": "x", "model_b": "y", "winner": "model_b",
         "conversation_a": conv("Hi", "Hello"), "conversation_b": conv("Hi", "Hey")},  # repeats Kaggle row 1
        {"question_id": "q3", "model_a": "x", "model_b": "y", "winner": "tie",
         "conversation_a": conv("P", "a"), "conversation_b": conv("P", "b")},
    ]
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(extra))
    ds = load_arena([write_csv(tmp_path / "k.csv", [kaggle_row(1)]), str(path)])
    assert ds["id"] == ["1", "q1", "q3"]
    assert ds["label"] == [0, 2, 2]
    assert ds[1]["prompt"] == ["Q"] and ds[1]["response_b"] == ["B1"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(prompt="[not json"), "column 'prompt' is not valid JSON"),
        (lambda r: r.update(prompt=json.dumps(["a", "b"])), "unequal turn counts"),
        (lambda r: r.update(winner_model_a=0), "exactly one of"),
        (lambda r: r.update(winner_model_b=1), "exactly one of"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, mutate, message):
    good, bad = kaggle_row(10), kaggle_row(11)
    mutate(bad)
    path = write_csv(tmp_path / "bad.csv", [good, bad])
    with pytest.raises(DataError, match=message) as err:
        load_arena(path)
    assert "bad.csv" in str(err.value) and "row id 11" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_column_is_named(tmp_path):
    rows = [kaggle_row(1)]
    rows[0].pop("response_b")
    with pytest.raises(DataError, match=r"m.csv: missing required column\(s\) \['response_b'\]"):
        load_arena(write_csv(tmp_path / "m.csv", rows))


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_csv(tmp_path / "dup.csv", [kaggle_row(5), kaggle_row(5, prompt=("other",))])
    with pytest.raises(DataError, match=r"duplicate row id.*'5'"):
        load_arena(path)


def test_grouped_split_never_leaks_a_group():
    rows = load_arena([str(ARENA_SAMPLE), str(PANDALM)])  # PandaLM repeats prompt+responses across rows
    keys = [group_key(r) for r in rows]
    assert len(set(keys)) < len(keys)  # the data really has groups
    seen_val = set()
    for fold in range(5):
        train, val = split_train_val(rows, 0.2, seed=3, fold=fold)
        assert len(train) + len(val) == len(rows)
        train_keys, val_keys = {group_key(r) for r in train}, {group_key(r) for r in val}
        assert not train_keys & val_keys
        assert not seen_val & set(val["id"])  # folds are disjoint
        seen_val |= set(val["id"])
        assert 0.1 < len(val) / len(rows) < 0.3
    assert len(seen_val) == len(rows)  # every row validates exactly once over the folds


def test_swap_augment_adds_swapped_copies_only():
    train, _ = split_train_val(load_arena(str(ARENA_SAMPLE)), 0.2, seed=0)
    augmented = swap_augment(train, 0.25, seed=1)
    extra = augmented.select(range(len(train), len(augmented)))
    assert len(extra) == round(0.25 * len(train)) and augmented.select(range(len(train)))["id"] == train["id"]
    by_id = {r["id"]: r for r in train}
    for row in extra:
        original = by_id[row["id"]]
        assert row["response_a"] == original["response_b"] and row["response_b"] == original["response_a"]
        assert row["label"] == {0: 1, 1: 0, 2: 2}[original["label"]]
    assert len(swap_augment(train, 5)) == len(train) + 5
    assert len(swap_augment(train, 0)) == len(train)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    write_csv(path, [kaggle_row(1), kaggle_row(2, prompt=("café",))])
    path.write_bytes(path.read_bytes().replace(b"caf\\u00e9", "café".encode("latin-1")))  # a latin-1 é
    with pytest.raises(DataError, match=r"latin1.csv: not UTF-8 text at line 3 .*re-save the file as UTF-8"):
        load_arena(str(path))


@pytest.mark.parametrize("content", ["", "id,prompt,response_a,response_b\n"])
def test_empty_files_are_refused(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.csv: the file (is empty|has no rows)"):
        load_arena(str(path))


def test_cells_that_are_json_but_not_lists_are_refused(tmp_path):
    path = write_csv(tmp_path / "scalar.csv", [kaggle_row(1), {**kaggle_row(2), "response_a": "42"}])
    with pytest.raises(DataError, match=r"scalar.csv: row id 2: column 'response_a' must be a non-empty JSON list"):
        load_arena(path)


def test_one_character_responses_are_valid(tmp_path):
    ds = load_arena(write_csv(tmp_path / "short.csv", [kaggle_row(1, a=("A",), b=("?",))]))
    assert ds[0]["response_a"] == ["A"] and ds[0]["response_b"] == ["?"]


# ------------------------------------------------------------------------------------------ ids (issue 15, item 3)


def _write(path, rows):
    """Rows to .csv / .jsonl / .json / .parquet by the suffix, as a user's tool would write them."""
    df = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        df.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_integer_ids_stay_as_written_in_every_format(tmp_path, suffix):
    rows = [kaggle_row(136060), kaggle_row(211333, prompt=("x",)), kaggle_row(7, prompt=("y",))]
    ds = load_arena(_write(tmp_path / f"ids{suffix}", rows))
    assert ds["id"] == ["136060", "211333", "7"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("missing", ["null", "absent", "empty"])
def test_missing_or_empty_id_is_refused_naming_file_and_row(tmp_path, suffix, missing):
    rows = [kaggle_row(136060), kaggle_row(211333, prompt=("x",)), kaggle_row(7, prompt=("y",))]
    if missing == "null":
        rows[1]["id"] = None
    elif missing == "absent":
        del rows[1]["id"]
    else:
        for row in rows:
            row["id"] = str(row["id"])  # one id column type (Parquet)
        rows[1]["id"] = "  " if suffix != ".csv" else ""
    path = _write(tmp_path / f"ids{suffix}", rows)
    with pytest.raises(DataError, match=rf"ids{suffix}: row 2: the id is empty or missing") as err:
        load_arena(path)
    assert "nan" not in str(err.value) and "136060.0" not in str(err.value)


def test_parquet_integer_ids_with_a_null_are_refused_at_that_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [kaggle_row(136060), kaggle_row(None, prompt=("x",))]
    table = pa.Table.from_pylist(rows)
    assert table.schema.field("id").type == pa.int64()
    pq.write_table(table, tmp_path / "ids.parquet")
    with pytest.raises(DataError, match=r"ids.parquet: row 2: the id is empty or missing"):
        load_arena(str(tmp_path / "ids.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "one.parquet")
    assert load_arena(str(tmp_path / "one.parquet"))["id"] == ["136060"]


def test_missing_question_id_of_the_extra_schema_is_refused(tmp_path):
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rows = [{"question_id": q, "winner": "tie", "conversation_a": conv, "conversation_b": conv} for q in (5, None)]
    path = tmp_path / "extra.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"extra.jsonl: row 2: the id is empty or missing"):
        load_arena(str(path))


def test_bad_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(kaggle_row(1)) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_arena(str(path))


# ------------------------------------------------------------------------------------------ winners (item 7)


@pytest.mark.parametrize("winner", [(0.5, 0, 1), (1.5, 0, 0), (-0.5, 0, 1), (2, 0, 0), ("1.0001", 0, 0),
                                    ("yes", 0, 0), (1, 0, None)])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_winner_cells_other_than_0_or_1_are_refused_as_written(tmp_path, winner, suffix):
    path = _write(tmp_path / f"w{suffix}", [kaggle_row(1), kaggle_row(2, prompt=("x",), winner=winner)])
    with pytest.raises(DataError, match=r"row id 2: .*must be 0 or 1") as err:
        load_arena(path)
    bad = next(v for v in winner if v not in (0, 1))
    shown = "an empty cell" if bad is None else repr(str(bad) if suffix == ".csv" else bad)
    column = "winner_model_a" if winner[0] == bad else "winner_tie"
    assert f"{column} is {shown};" in str(err.value)


@pytest.mark.parametrize("winner", [(1, 0, 0), (True, False, False), ("1", "0", "0"), ("1.0", "0.0", "0.0"),
                                    ("True", "False", "False"), ("true", "false", "false")])
def test_winner_spellings_of_0_and_1_are_accepted(tmp_path, winner):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(kaggle_row(1, winner=winner)) + "\n")
    assert load_arena(str(path))["label"] == [0]
    pd.DataFrame([kaggle_row(1, winner=winner)]).to_parquet(tmp_path / "w.parquet")
    assert load_arena(str(tmp_path / "w.parquet"))["label"] == [0]


@pytest.mark.parametrize("winner", [["tie"], None, 1.0, "Tie"])
def test_extra_schema_winner_that_is_not_a_known_name_is_refused(tmp_path, winner):
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    path = tmp_path / "extra.json"
    path.write_text(json.dumps([{"question_id": "q1", "winner": winner, "conversation_a": conv,
                                 "conversation_b": conv}]))
    with pytest.raises(DataError, match=r"extra.json: row id q1: winner .* is not one of"):
        load_arena(str(path))


def test_a_folder_given_as_a_data_file_is_named(tmp_path):
    (tmp_path / "train.csv").mkdir()
    with pytest.raises(DataError, match=r"train.csv: is a directory; give a data file"):
        load_arena(str(tmp_path / "train.csv"))
