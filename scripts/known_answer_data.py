"""A known-answer preference set in Kaggle's schema: the label is a fixed function of the two responses.

Every response is a few filler words followed by a verdict, `Verdict: PASS.` or `Verdict: FAIL.` (drawn
independently, 50/50). The rule (`known_answer_label`): the response that passes beats the one that fails; when
both pass or both fail it is a tie. So the label needs both responses (A passing alone says "A or tie"), and all
three classes occur (about 25 % A, 25 % B, 50 % tie: the label prior's log loss is about 1.04, uniform's 1.0986).

A pipeline that learns must get this set nearly right within a few hundred rows; one with a letter / label / mask /
swap bug cannot. tests/test_learnability.py and scripts/demo.sh train on it.

Usage:
    python scripts/known_answer_data.py --rows 160 --seed 0 --out /tmp/known_train.csv
"""

import argparse
import json
import random


VERDICTS = ("PASS", "FAIL")
WORDS = ("apple river stone cloud green quick paper light north music table seven window garden silver "
         "yellow bridge summer little orange winter planet forest button candle").split()
QUESTIONS = ("Name a colour.", "Say something about rivers.", "Describe the weather.", "Pick a number.",
             "Write a short line.", "What is in the garden?", "Tell me a fact.", "Suggest a word.")
WINNER_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")


def verdict_of(response: str) -> str:
    """The verdict a response ends with (PASS or FAIL)."""
    word = response.rsplit("Verdict: ", 1)[-1].rstrip(".")
    if word not in VERDICTS:
        raise ValueError(f"no verdict in {response!r}")
    return word


def known_answer_label(response_a: str, response_b: str) -> int:
    """The rule: 0 (A wins) if only A passes, 1 (B wins) if only B passes, 2 (tie) if both pass or both fail."""
    a, b = verdict_of(response_a) == "PASS", verdict_of(response_b) == "PASS"
    return 2 if a == b else (0 if a else 1)


def _response(rng: random.Random) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    return f"{words.capitalize()}. Verdict: {rng.choice(VERDICTS)}."


def known_answer_rows(rows: int, seed: int = 0, id_prefix: str = "ka") -> list[dict]:
    """`rows` Kaggle-schema records (id, prompt, response_a, response_b as JSON lists of one turn, winner flags)."""
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        a, b = _response(rng), _response(rng)
        flags = [0, 0, 0]
        flags[known_answer_label(a, b)] = 1
        records.append({
            "id": f"{id_prefix}{seed}-{i}", "prompt": json.dumps([rng.choice(QUESTIONS)]),
            "response_a": json.dumps([a]), "response_b": json.dumps([b]), **dict(zip(WINNER_COLUMNS, flags)),
        })
    return records


def write_known_answer_csv(path: str, rows: int, seed: int = 0, id_prefix: str = "ka") -> str:
    """Write `known_answer_rows` to a CSV file; returns `path`."""
    import pandas as pd

    pd.DataFrame(known_answer_rows(rows, seed, id_prefix)).to_csv(path, index=False)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, required=True, help="Number of rows")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (train and held-out sets: different seeds)")
    parser.add_argument("--out", required=True, help="CSV file to write")
    args = parser.parse_args(argv)
    print(f"Wrote {args.rows} known-answer rows to {write_known_answer_csv(args.out, args.rows, args.seed)}")


if __name__ == "__main__":
    main()
