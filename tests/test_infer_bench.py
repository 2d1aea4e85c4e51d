"""`benchmarks/benchmark.py infer --base_model`: the scoring benchmark on real (saved) weights + adapters, CPU."""

import json
import math
import runpy

import pytest
import torch

from conftest import PANDALM, REPO


@pytest.fixture(scope="module")
def benchmark_main():
    """`benchmarks/benchmark.py`'s main, with benchmarks/ on sys.path as when it runs as a script."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "benchmarks"))
        yield runpy.run_path(str(REPO / "benchmarks" / "benchmark.py"))["main"]


@pytest.mark.slow
def test_infer_on_a_saved_model_and_adapter(benchmark_main, tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(adapter)
    results = tmp_path / "results.jsonl"
    benchmark_main([
        "infer", "--base_model", str(tiny_llama), "--adapters", str(adapter), "--data", str(PANDALM),
        "--max_length", "256", "--rows", "6", "--parity_rows", "4", "--results", str(results), "--only", "packed",
        "--variant", "packed", "precision=fp32", "pack_rows=true", "attn_implementation=lmsys_flex",
        "token_budget=512",
    ])
    [line] = map(json.loads, results.read_text().splitlines())
    assert line["mode"] == "infer" and line["variant"] == "packed" and line["model"] == f"{tiny_llama} + {adapter}"
    assert line["settings"]["merge_adapters"] and line["settings"]["attn_implementation"] == "lmsys_flex"
    assert line["timed_rows"] == 6 and line["parity_rows"] == 4 and line["tokens_per_s"] > 0
    assert math.isfinite(line["max_abs_prob_diff"]) and line["max_abs_prob_diff"] <= 1e-4
    assert 0 <= line["mean_abs_prob_diff"] <= line["max_abs_prob_diff"]


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --shape --base_model is required"),
    (["--shape", "llama-3.1-tiny", "--base_model", "m"], "not allowed with argument"),
    (["--shape", "llama-3.1-tiny"], "--shape needs --tokenizer"),
    (["--base_model", "m", "--tokenizer", "t"], "--tokenizer and --num_layers go with --shape"),
])
def test_infer_needs_exactly_one_model_source(benchmark_main, args, message, capsys):
    with pytest.raises(SystemExit):
        benchmark_main(["infer", "--data", str(PANDALM), *args])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_fp8_variants_and_flex_options_are_per_variant(benchmark_main, tmp_path):
    """The benchmark-only keys: FP8 layers kept in bf16 by name or by calibration, and the flex tiles of a variant
    (restored afterwards)."""
    from lmsys_trl import kernels

    from conftest import ARENA_SAMPLE, TOKENIZERS

    before = dict(kernels.LARGE_HEAD_KERNEL_OPTIONS)
    results = tmp_path / "results.jsonl"
    benchmark_main([
        "infer", "--shape", "llama-3.1-tiny", "--tokenizer", str(TOKENIZERS / "llama-3.1"),
        "--data", str(ARENA_SAMPLE), "--max_length", "256", "--rows", "4", "--parity_rows", "2",
        "--results", str(results),
        "--only", "fp8", "keep-down", "calibrated", "tiles",
        "--variant", "fp8", "precision=fp8",
        "--variant", "keep-down", "precision=fp8", "fp8_keep=[down_proj]",
        "--variant", "calibrated", "precision=fp8", "fp8_keep_fraction=0.5",
        "--variant", "tiles", "flex_kernel_options={}",
    ])
    lines = {line["variant"]: line for line in map(json.loads, results.read_text().splitlines())}
    assert list(lines) == ["fp8", "keep-down", "calibrated", "tiles"]
    every = lines["fp8"]["fp8_layers"]
    assert every > 0 and lines["keep-down"]["fp8_layers"] == every * 6 // 7  # one of q k v o gate up down per layer
    assert lines["calibrated"]["fp8_layers"] == every - every // 2 and lines["tiles"]["fp8_layers"] == 0
    assert lines["tiles"]["overrides"] == {"flex_kernel_options": {}}
    assert kernels.LARGE_HEAD_KERNEL_OPTIONS == before
