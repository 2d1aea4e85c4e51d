"""Shared fixtures: real tokenizers from ../shared, tiny random gemma-2 / llama models saved locally."""

import os
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMSYS_TRL_SHARED", REPO.parent / "shared"))
TOKENIZERS = SHARED / "tokenizers"
DATA = SHARED / "data"
ARENA_SAMPLE = DATA / "lmsys_arena_sample100.csv"
KAGGLE_TEST = DATA / "lmsys_kaggle_test_sample.csv"
PANDALM = DATA / "pandalm_test.csv"


def build_tiny_model(family: str, path: Path) -> Path:
    """Save a 2-layer random model of `family` with the real tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    from lmsys_trl.model import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZERS / family))
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Gemma2Config(**common, sliding_window=256) if family == "gemma-2" else LlamaConfig(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    return build_tiny_model("gemma-2", tmp_path_factory.mktemp("tiny-gemma2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model("llama-3.1", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", params=["gemma-2", "llama-3.1"])
def tokenizer(request):
    from lmsys_trl.model import load_tokenizer

    return load_tokenizer(str(TOKENIZERS / request.param))
