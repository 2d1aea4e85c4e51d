"""Parity of the eval scoring path: batched, left-padded, last-position-only letter probabilities vs a plain
unbatched full forward of the same random weights, for gemma-2 and llama-3.1 shapes built from configs in code.

Usage:
    python scripts/parity.py --tokenizers ../shared/tokenizers --data ../shared/data/lmsys_arena_sample100.csv
    # GPU, real shapes (random gemma-2-9b / Llama-3.1-8B weights in bf16, ~18 GB each, one at a time):
    python scripts/parity.py --shapes real --tokenizers .device/tokenizers \
        --data .device/data/lmsys_arena_sample100.csv --max_length 1900 --out $OUT/parity.jsonl
Exits 1 when a family's max |p_batched - p_plain| exceeds --tolerance. Prints (and appends to --out) JSON lines.
"""

from dataclasses import dataclass, field


# Real shapes from the models' published config.json files; "tiny" keeps the family's code paths at toy size.
SHAPES = {
    ("gemma-2", "real"): dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=8192,
    ),
    ("llama-3.1", "real"): dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    ("gemma-2", "tiny"): dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=128, max_position_embeddings=4096,
    ),
    ("llama-3.1", "tiny"): dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
}


@dataclass
class ParityArguments:
    tokenizers: str = field(default="../shared/tokenizers", metadata={"help": "Folder with gemma-2/ and llama-3.1/."})
    data: str = field(default="../shared/data/lmsys_arena_sample100.csv", metadata={"help": "Arena rows to format."})
    families: list[str] = field(default_factory=lambda: ["gemma-2", "llama-3.1"], metadata={"help": "Model families."})
    shapes: str = field(default="tiny", metadata={"help": "tiny (CPU test) or real (gemma-2-9b / Llama-3.1-8B)."})
    rows: int = field(default=32, metadata={"help": "Rows to compare (varied lengths: the first N of --data)."})
    max_length: int = field(default=256, metadata={"help": "Inference max length of the formatted rows."})
    token_budget: int = field(default=4096, metadata={"help": "Padded tokens per batch on the batched path."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32."})
    tolerance: float = field(default=1e-3, metadata={"help": "Largest allowed |p_batched - p_plain|."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})
    out: str | None = field(default=None, metadata={"help": "Append the JSON lines to this file."})


def build_model(family: str, shapes: str, tokenizer, dtype, device):
    """A random-weight model of `family` at `shapes` size, eager attention for gemma-2 (softcapping)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    config_class = Gemma2Config if family == "gemma-2" else LlamaConfig
    config = config_class(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[(family, shapes)],
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="eager" if family == "gemma-2" else "sdpa"
        )
    return model.eval()


def main(argv=None) -> list[dict]:
    import gc
    import json
    import os

    import torch
    from transformers import HfArgumentParser

    from lmsys_trl.data import load_arena
    from lmsys_trl.score import load_scoring_tokenizer, parity_check

    (args,) = HfArgumentParser(ParityArguments).parse_args_into_dataclasses(args=argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    data = load_arena(args.data)
    data = data.select(range(min(args.rows, len(data))))
    results = []
    for family in args.families:
        torch.manual_seed(args.seed)
        tokenizer = load_scoring_tokenizer(os.path.join(args.tokenizers, family))
        model = build_model(family, args.shapes, tokenizer, dtype, device)
        result = parity_check(model, tokenizer, data, args.max_length, args.token_budget)
        result.update(
            family=family, shapes=args.shapes, dtype=str(dtype), tolerance=args.tolerance,
            device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
            ok=result["max_abs_prob_diff"] <= args.tolerance,
        )
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    raise SystemExit(0 if all(r["ok"] for r in main()) else 1)
