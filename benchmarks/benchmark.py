"""Throughput benchmark on a random-weight model of a real shape over the real length mix (no downloads).

`train` mode runs the reference recipe (issue 5: batch 1 x 16, eager, full logits, no checkpointing) and the recipe's
own default (its fast-path keys) in one process, on the same rows, prints tokens/s, rows/s, peak GiB and the ratio,
and appends one JSON line per variant to benchmarks/results.jsonl. Further variants: `--variant NAME key=value ...`.
`infer` mode does the same for scoring (`benchmarks/infer_bench.py`): the reference (4-bit + LoRA, eager, batches
of 4 left-padded rows) vs `scripts/eval.py`'s defaults, plus `max_abs_prob_diff` against a plain unbatched forward;
on random weights of a real shape (`--shape`), or on real trained weights (`--base_model` [+ `--adapters`]: kernel
parity where rounding is not amplified by random weights).
`precision` mode scores a real model + adapters at several precisions on the same labelled rows: each one's log loss
and its paired difference to a baseline precision (`benchmarks/precision_study.py`; benchmarks/precision.jsonl).

Usage (GPU, from the repo root):
    python benchmarks/benchmark.py train --shape gemma-2-9b --recipe recipes/gemma2_9b.yaml \
        --tokenizer ../shared/tokenizers/gemma-2 --data ../shared/data/lmsys_arena_sample100.csv
    python benchmarks/benchmark.py train --shape gemma-2-9b --recipe recipes/gemma2_9b.yaml ... \
        --variant full-ckpt checkpointed_layers=1.0 --variant no-liger use_liger_kernel=false
    python benchmarks/benchmark.py infer --shape gemma-2-9b --max_length 1900 \
        --tokenizer ../shared/tokenizers/gemma-2 --data ../shared/data/lmsys_arena_sample100.csv \
        --variant fp8 precision=fp8 --variant default-tta swap_tta=true
    python benchmarks/benchmark.py infer --base_model models/smollm2-135m-instruct --adapters out/demo \
        --data ../shared/data/pandalm_test.csv --max_length 512 --variant bf16 precision=bf16 pack_rows=true ...
Variant keys: `EvalArguments` scoring keys (precision, pack_rows, token_budget, attn_implementation, merge_adapters,
compile_layers, ...) and `swap_tta=true` (every pass also scores the A/B-swapped rows; rows/s counts arena rows).
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


def command_line() -> str:
    """This run's command, as the JSON lines record it."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def run_variants(args, variants: dict, measure, mode: str, model: str | None = None) -> dict:
    """Measure each variant (`measure(name, overrides)` -> result), append its JSON line (its "model": `model`, by
    default `args.shape`), print the comparison."""
    from train_bench import append_result

    if args.only:  # in the order given
        variants = {k: variants[k] for k in args.only if k in variants}
    command = command_line()
    measured = {}
    for name, overrides in variants.items():
        try:
            result = measure(name, overrides)
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
        line = append_result(args.results, model or args.shape, result, command, mode)
        measured[name] = line
        print(json.dumps(line), flush=True)
    if "reference" in measured:
        base = measured["reference"]["tokens_per_s"]
        parity = mode == "infer"
        print(f"\n{'variant':<16}{'tokens/s':>10}{'rows/s':>9}{'peak GiB':>10}{'x ref':>8}" + ("  max|dp|" * parity))
        for name, line in measured.items():
            peak = line["peak_gib"] if line["peak_gib"] is not None else float("nan")
            print(
                f"{name:<16}{line['tokens_per_s']:>10.0f}{line['rows_per_s']:>9.2f}{peak:>10.1f}"
                f"{line['tokens_per_s'] / base:>8.2f}" + (f"  {line.get('max_abs_prob_diff', 0):.2e}" * parity)
            )
    return measured


def train(args):
    from lmsys_trl.model import load_tokenizer

    from train_bench import REFERENCE, describe_mix, length_mix, run_variant

    with open(args.recipe) as f:
        keys = yaml.safe_load(f)
    max_length = keys.get("row_max_length") or keys["max_length"]
    tokenizer = load_tokenizer(args.tokenizer)
    records = length_mix(args.data, tokenizer, max_length)
    print(f"length mix: {describe_mix(records, tokenizer)} (max_length {max_length})", flush=True)
    variants = {"reference": dict(REFERENCE), "default": {}, **parse_variants(args.variant or [])}

    def measure(name, overrides):
        reference = name == "reference"
        return run_variant(
            name, overrides, args.recipe, args.shape, tokenizer, records,
            args.reference_warmup if reference else args.warmup, args.reference_steps if reference else args.steps,
            args.num_layers, profile=args.profile and name == "default", model_dir=args.model_dir,
        )

    return run_variants(args, variants, measure, "train")


def infer(args):
    from functools import partial

    from lmsys_trl.data import load_arena
    from lmsys_trl.scoring import encode_rows, load_scoring_tokenizer

    from infer_bench import REFERENCE, build_scoring_model, load_trained_model, run_variant

    if args.base_model:  # real weights: the model's own tokenizer
        tokenizer = load_scoring_tokenizer(args.base_model)
        build_model = partial(load_trained_model, args.base_model, args.adapters)
        model_name = " + ".join([args.base_model, *args.adapters])
    else:
        tokenizer = load_scoring_tokenizer(args.tokenizer)
        build_model = partial(build_scoring_model, args.shape, tokenizer, num_layers=args.num_layers)
        model_name = args.shape
    data = load_arena([args.data])
    data = data.select(range(min(args.rows or len(data), len(data))))
    rows = encode_rows(data, tokenizer, args.max_length)
    swapped_rows = encode_rows(data, tokenizer, args.max_length, swapped=True)
    lengths = sorted(map(len, rows))
    print(f"length mix: {len(rows)} rows, median {lengths[len(lengths) // 2]}, max {lengths[-1]} tokens "
          f"(max_length {args.max_length})", flush=True)
    variants = {"reference": dict(REFERENCE), "default": {}, **parse_variants(args.variant or [])}

    def measure(name, overrides):
        return run_variant(
            name, overrides, build_model, tokenizer, rows, args.passes, args.warmup_passes, args.parity_rows,
            swapped_rows,
        )

    return run_variants(args, variants, measure, "infer", model_name)


def precision(args):
    from precision_study import compare_precisions
    from train_bench import append_result

    command = command_line()
    results = compare_precisions(args.base_model, args.adapters, args.data, args.max_length, args.precisions,
                                 args.baseline, args.rows, args.temperature, token_budget=args.token_budget,
                                 variants=parse_variants(args.variant or []), swap_tta=args.swap_tta)
    print(f"\n{'variant':<16}{'log loss':>10}{'accuracy':>10}  {'Δ vs ' + args.baseline:>18}{'mean|Δp|':>10}")
    for result in results:
        append_result(args.results, args.base_model, result, command, "precision")
        print(f"{result['variant']:<16}{result['log_loss']:>10.4f}{result['accuracy']:>10.3f}  "
              f"{result['delta_log_loss']:>+10.4f} ± {result['delta_log_loss_se']:.4f}"
              f"{result['mean_abs_prob_diff']:>10.4f}")
    return results


def check_infer_model_args(parser, args):
    """`infer`: --tokenizer and --num_layers go with --shape, --adapters with --base_model."""
    if args.shape and not args.tokenizer:
        parser.error("--shape needs --tokenizer (the tokenizer folder of the shape's family)")
    if args.shape and args.adapters:
        parser.error("--adapters go with --base_model (--shape uses a random LoRA adapter)")
    if args.base_model and (args.tokenizer or args.num_layers):
        parser.error("--tokenizer and --num_layers go with --shape (--base_model brings its own tokenizer and layers)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("train", help="training tokens/s: reference vs the recipe's default (and --variant ...)")
    p.add_argument("--shape", required=True, help="gemma-2-9b, gemma-2-2b, llama-3.1-8b (benchmarks/shapes.py)")
    p.add_argument("--recipe", required=True, help="training recipe YAML whose keys are the 'default' variant")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder of the shape's family")
    p.add_argument("--data", required=True, help="arena file whose rows give the length mix")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), help="extra variant")
    p.add_argument("--only", nargs="+", help="run only these variants, in this order")
    p.add_argument("--warmup", type=int, default=4, help="untimed optimiser steps (compilation) per variant")
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps per variant")
    p.add_argument("--reference_warmup", type=int, default=1)
    p.add_argument("--reference_steps", type=int, default=2)
    p.add_argument("--num_layers", type=int, default=None, help="fewer layers than the real shape (CPU debugging)")
    p.add_argument("--model_dir", default=None, help="load the --shape model saved here by benchmarks/random_model.py "
                   "through from_pretrained, as scripts/sft.py does (needed under ZeRO-3)")
    p.add_argument("--profile", action="store_true", help="profile one extra step of the default variant")
    p.add_argument("--profile_out", default=None, help="write the profiler table to this file")
    p.add_argument("--results", default="benchmarks/results.jsonl")
    p.set_defaults(run=train)
    p = modes.add_parser("infer", help="scoring tokens/s: reference vs scripts/eval.py's defaults (and --variant ...)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--shape", help="random weights: gemma-2-9b, llama-3.1-8b, ..., *-tiny (benchmarks/shapes.py)")
    model.add_argument("--base_model", help="real weights: local model folder, loaded as scripts/eval.py loads it")
    p.add_argument("--adapters", nargs="+", default=[], help="LoRA adapter folders of --base_model")
    p.add_argument("--tokenizer", help="tokenizer folder of the --shape's family (--base_model: its own tokenizer)")
    p.add_argument("--data", required=True, help="arena file whose rows give the length mix")
    p.add_argument("--max_length", type=int, default=1900, help="inference max length (llama-3.1: 2400)")
    p.add_argument("--rows", type=int, default=None, help="score only the first N rows of --data")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="extra variant: EvalArguments scoring keys or swap_tta, e.g. fp8 precision=fp8")
    p.add_argument("--only", nargs="+", help="run only these variants, in this order")
    p.add_argument("--warmup_passes", type=int, default=1, help="untimed passes over the rows (compilation)")
    p.add_argument("--passes", type=int, default=1, help="timed passes over the rows")
    p.add_argument("--parity_rows", type=int, default=32, help="rows checked against the plain unbatched forward")
    p.add_argument("--num_layers", type=int, default=None, help="fewer layers than the real shape (CPU debugging)")
    p.add_argument("--results", default="benchmarks/results.jsonl")
    p.set_defaults(run=infer, profile_out=None)
    infer_parser = p
    p = modes.add_parser("precision", help="log loss of a real model + adapters at several precisions, same rows")
    p.add_argument("--base_model", required=True, help="local model folder (or hub id)")
    p.add_argument("--adapters", nargs="*", default=[], help="LoRA adapter folders")
    p.add_argument("--data", required=True, help="labelled arena file")
    p.add_argument("--max_length", type=int, required=True, help="inference max length")
    p.add_argument("--precisions", nargs="*", default=["fp32", "bf16", "fp8"],
                   help="plain precisions (padded, uncompiled), e.g. fp32 bf16 fp8 4bit")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="scoring variant: eval's scoring keys (its defaults for the device), fp8_keep=[down_proj], "
                        "fp8_keep_fraction=0.1, fp8_fast_accum=false")
    p.add_argument("--swap_tta", action="store_true", help="also score the A/B-swapped rows and average (eval's TTA)")
    p.add_argument("--baseline", default="fp32", help="the precision the others are compared with")
    p.add_argument("--rows", type=int, default=None, help="the first N rows of --data")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--token_budget", type=int, default=8192, help="padded tokens per batch")
    p.add_argument("--results", default="benchmarks/precision.jsonl")
    p.set_defaults(run=precision)
    args = parser.parse_args(argv)
    if args.mode == "infer":
        check_infer_model_args(infer_parser, args)
    args.run(args)


if __name__ == "__main__":
    main()
