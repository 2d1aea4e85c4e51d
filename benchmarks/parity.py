"""Parity of the eval scoring path: batched, left-padded, last-position-only letter probabilities vs a plain
unbatched full forward of the same random weights, for gemma-2 and llama-3.1 shapes built from configs in code.

Usage:
    python benchmarks/parity.py --tokenizers ../shared/tokenizers --data ../shared/data/lmsys_arena_sample100.csv
    # GPU, real shapes (random gemma-2-9b / Llama-3.1-8B weights in bf16, ~18 GB each, one at a time):
    python benchmarks/parity.py --shapes gemma-2-9b llama-3.1-8b --tokenizers .device/tokenizers \
        --data .device/data/lmsys_arena_sample100.csv --max_length 1900 --out $OUT/parity.jsonl
Exits 1 when a shape's max |p_batched - p_plain| exceeds --tolerance. Prints (and appends to --out) JSON lines.
"""

from dataclasses import dataclass, field


@dataclass
class ParityArguments:
    tokenizers: str = field(default="../shared/tokenizers", metadata={"help": "Folder with gemma-2/ and llama-3.1/."})
    data: str = field(default="../shared/data/lmsys_arena_sample100.csv", metadata={"help": "Arena rows to format."})
    shapes: list[str] = field(
        default_factory=lambda: ["gemma-2-tiny", "llama-3.1-tiny"],
        metadata={"help": "Shapes of benchmarks/shapes.py, e.g. gemma-2-9b llama-3.1-8b (GPU) or the tiny ones."},
    )
    rows: int = field(default=32, metadata={"help": "Rows to compare (varied lengths: the first N of --data)."})
    max_length: int = field(default=256, metadata={"help": "Inference max length of the formatted rows."})
    token_budget: int = field(default=4096, metadata={"help": "Padded tokens per batch on the batched path."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32."})
    tolerance: float = field(default=1e-3, metadata={"help": "Largest allowed |p_batched - p_plain|."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})
    out: str | None = field(default=None, metadata={"help": "Append the JSON lines to this file."})


def build_model(shape: str, tokenizer, dtype, device):
    """A random-weight model of `shape` (benchmarks/shapes.py), eager attention for gemma-2 (softcapping)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shapes import family_of, model_config

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            model_config(shape, tokenizer), dtype=dtype,
            attn_implementation="eager" if family_of(shape) == "gemma-2" else "sdpa",
        )
    return model.eval()


def main(argv=None) -> list[dict]:
    import json
    import os

    import torch
    from accelerate.utils.memory import clear_device_cache
    from transformers import HfArgumentParser

    from lmsys_trl.data import load_arena
    from lmsys_trl.scoring import load_scoring_tokenizer, parity_check

    from shapes import family_of

    (args,) = HfArgumentParser(ParityArguments).parse_args_into_dataclasses(args=argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    data = load_arena(args.data)
    data = data.select(range(min(args.rows, len(data))))
    results = []
    for shape in args.shapes:
        torch.manual_seed(args.seed)
        tokenizer = load_scoring_tokenizer(os.path.join(args.tokenizers, family_of(shape)))
        model = build_model(shape, tokenizer, dtype, device)
        result = parity_check(model, tokenizer, data, args.max_length, args.token_budget)
        result.update(
            shape=shape, dtype=str(dtype), tolerance=args.tolerance,
            device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
            ok=result["max_abs_prob_diff"] <= args.tolerance,
        )
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
        del model
        clear_device_cache(garbage_collection=True)
    return results


if __name__ == "__main__":
    raise SystemExit(0 if all(r["ok"] for r in main()) else 1)
