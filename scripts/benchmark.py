"""Throughput benchmark on a random-weight model of a real shape over the real length mix (no downloads).

`train` mode runs the reference recipe (issue 5: batch 1 x 16, eager, full logits, no checkpointing) and the recipe's
own default (its fast-path keys) in one process, on the same rows, prints tokens/s, rows/s, peak GiB and the ratio,
and appends one JSON line per variant to benchmarks/results.jsonl. Further variants: `--variant NAME key=value ...`.

Usage (GPU, from the repo root):
    python scripts/benchmark.py train --shape gemma-2-9b --recipe recipes/gemma2_9b.yaml \
        --tokenizer ../shared/tokenizers/gemma-2 --data ../shared/data/lmsys_arena_sample100.csv
    python scripts/benchmark.py train --shape gemma-2-9b --recipe recipes/gemma2_9b.yaml ... \
        --variant full-ckpt checkpointed_layers=1.0 --variant no-liger use_liger_kernel=false
"""

import argparse
import json
import shlex
import sys

import yaml


def parse_variants(specs: list[list[str]]) -> dict:
    """[[name, key=value, ...], ...] -> {name: {key: yaml value}}."""
    variants = {}
    for name, *pairs in specs:
        if any("=" not in p for p in pairs):
            raise SystemExit(f"--variant {name}: overrides must be key=value, got {pairs}")
        variants[name] = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
    return variants


def train(args):
    from lmsys_trl.model import load_tokenizer
    from lmsys_trl.speed.train_bench import REFERENCE, append_result, describe_mix, length_mix, run_variant

    with open(args.recipe) as f:
        max_length = yaml.safe_load(f)["max_length"]
    tokenizer = load_tokenizer(args.tokenizer)
    records = length_mix(args.data, tokenizer, max_length)
    print(f"length mix: {describe_mix(records, tokenizer)} (max_length {max_length})", flush=True)
    variants = {"reference": dict(REFERENCE), "default": {}, **parse_variants(args.variant or [])}
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    measured = {}
    for name, overrides in variants.items():
        warmup = args.reference_warmup if name == "reference" else args.warmup
        steps = args.reference_steps if name == "reference" else args.steps
        try:
            result = run_variant(
                name, overrides, args.recipe, args.shape, tokenizer, records, warmup, steps, args.num_layers,
                profile=args.profile and name == "default",
            )
        except Exception as err:  # one failing variant must not lose the others' numbers
            import traceback

            traceback.print_exc()
            print(f"variant {name} failed: {type(err).__name__}: {err}", flush=True)
            continue
        if "profile" in result:
            print(f"profile of one step of {name}:\n{result['profile']}", flush=True)
            if args.profile_out:
                with open(args.profile_out, "w") as f:
                    f.write(result["profile"])
        line = append_result(args.results, args.shape, result, command)
        measured[name] = line
        print(json.dumps(line), flush=True)
    if "reference" in measured:
        base = measured["reference"]["tokens_per_s"]
        print(f"\n{'variant':<16}{'tokens/s':>10}{'rows/s':>9}{'peak GiB':>10}{'x ref':>8}")
        for name, line in measured.items():
            peak = line["peak_gib"] if line["peak_gib"] is not None else float("nan")
            print(
                f"{name:<16}{line['tokens_per_s']:>10.0f}{line['rows_per_s']:>9.2f}{peak:>10.1f}"
                f"{line['tokens_per_s'] / base:>8.2f}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("train", help="training tokens/s: reference vs the recipe's default (and --variant ...)")
    p.add_argument("--shape", required=True, help="gemma-2-9b, gemma-2-2b, llama-3.1-8b (lmsys_trl.shapes)")
    p.add_argument("--recipe", required=True, help="training recipe YAML whose keys are the 'default' variant")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder of the shape's family")
    p.add_argument("--data", required=True, help="arena file whose rows give the length mix")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), help="extra variant")
    p.add_argument("--only", nargs="+", help="run only these variants")
    p.add_argument("--warmup", type=int, default=4, help="untimed optimiser steps (compilation) per variant")
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps per variant")
    p.add_argument("--reference_warmup", type=int, default=1)
    p.add_argument("--reference_steps", type=int, default=2)
    p.add_argument("--num_layers", type=int, default=None, help="fewer layers than the real shape (CPU debugging)")
    p.add_argument("--profile", action="store_true", help="profile one extra step of the default variant")
    p.add_argument("--profile_out", default=None, help="write the profiler table to this file")
    p.add_argument("--results", default="benchmarks/results.jsonl")
    p.set_defaults(run=train)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
