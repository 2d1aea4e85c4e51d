"""Real model shapes written in code (no downloads): random-weight stand-ins for benchmarks and GPU smoke runs."""

# From the published config.json of each model; `family` names the tokenizer folder in ../shared/tokenizers.
SHAPES = {
    "gemma-2-9b": dict(
        family="gemma-2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=8192,
    ),
    "gemma-2-2b": dict(
        family="gemma-2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=8192,
    ),
    "llama-3.1-8b": dict(
        family="llama-3.1", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "gemma-2-tiny": dict(
        family="gemma-2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=128, max_position_embeddings=4096,
    ),
    "llama-3.1-tiny": dict(
        family="llama-3.1", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    ),
}


def model_config(name: str, tokenizer, num_layers: int | None = None):
    """The transformers config of shape `name` with the tokenizer's vocabulary and special tokens."""
    from transformers import Gemma2Config, LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    shape = dict(SHAPES[name])
    family = shape.pop("family")
    if num_layers:
        shape["num_hidden_layers"] = num_layers
    config_class = Gemma2Config if family == "gemma-2" else LlamaConfig
    return config_class(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shape,
    )


def family_of(name: str) -> str:
    return SHAPES[name]["family"]


def save_random_model(name: str, tokenizer_dir: str, out_dir: str, num_layers: int | None = None, seed: int = 0):
    """Write a random-weight bf16 model of shape `name` plus its tokenizer to `out_dir` (a from_pretrained folder)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmsys_trl.model import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of billions: GPU is faster
        model = AutoModelForCausalLM.from_config(model_config(name, tokenizer, num_layers), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
