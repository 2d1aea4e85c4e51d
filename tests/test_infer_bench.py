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
