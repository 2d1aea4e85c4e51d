"""k-fold workflow (lmsys_trl.kfold): LoRA weight averaging, out-of-fold predictions, combining the fold adapters."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lmsys_trl.data import WINNER_COLUMNS, load_arena, split_train_val
from lmsys_trl.kfold import ADAPTER_WEIGHTS, average_adapters

from conftest import ARENA_SAMPLE, KAGGLE_TEST, REPO


MAX_LENGTH = 160


def make_adapter(base, path, seed, r=4):
    """A LoRA adapter of `base` with random lora_A and lora_B (as if trained), saved to `path`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return [make_adapter(tiny_llama, root / f"fold{k}", seed=k) for k in range(2)]


def test_averaging_identical_adapters_returns_the_same_adapter(adapters, tmp_path):
    out = average_adapters([adapters[0], adapters[0]], str(tmp_path / "avg"))
    original, averaged = load_file(f"{adapters[0]}/{ADAPTER_WEIGHTS}"), load_file(f"{out}/{ADAPTER_WEIGHTS}")
    assert original.keys() == averaged.keys()
    assert all(torch.equal(original[k], averaged[k]) for k in original)
    assert json.load(open(f"{out}/adapter_config.json")) == json.load(open(f"{adapters[0]}/adapter_config.json"))


def test_averaging_two_adapters_is_the_elementwise_mean_of_lora_a_and_b(adapters, tmp_path, tiny_llama):
    out = average_adapters(adapters, str(tmp_path / "avg"))
    a, b = (load_file(f"{p}/{ADAPTER_WEIGHTS}") for p in adapters)
    averaged = load_file(f"{out}/{ADAPTER_WEIGHTS}")
    assert any("lora_A" in k for k in averaged) and any("lora_B" in k for k in averaged)
    for key in averaged:
        assert not torch.equal(a[key], b[key])
        assert torch.allclose(averaged[key], (a[key] + b[key]) / 2)
    # the mean of A and of B, not of the updates B @ A: the averaged update differs from the mean update
    key = next(k for k in averaged if "lora_A" in k)
    mean_of_products = (a[key.replace("lora_A", "lora_B")] @ a[key] + b[key.replace("lora_A", "lora_B")] @ b[key]) / 2
    product_of_means = averaged[key.replace("lora_A", "lora_B")] @ averaged[key]
    assert not torch.allclose(mean_of_products, product_of_means)
    # it loads as a PEFT adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), out)
    with pytest.raises(FileExistsError):
        average_adapters(adapters, out)


def test_averaging_refuses_adapters_of_another_shape(adapters, tiny_llama, tmp_path):
    other = make_adapter(tiny_llama, tmp_path / "r8", seed=3, r=8)
    with pytest.raises(ValueError, match="differs .* in \\['r', 'lora_alpha'\\]"):
        average_adapters([adapters[0], other], str(tmp_path / "avg"))
    assert not (tmp_path / "avg").exists()


@pytest.mark.slow
@pytest.mark.parametrize("combine", ["average", "ensemble"])
def test_kfold_script_out_of_fold_predictions_cover_every_row_with_its_fold_adapter(
    adapters, tiny_llama, tmp_path, combine
):
    from lmsys_trl.model import load_model
    from lmsys_trl.scoring import letter_probs, load_scoring_tokenizer, score_dataset

    data = tmp_path / "train.csv"
    pd.read_csv(ARENA_SAMPLE, dtype=str, keep_default_na=False).head(8).to_csv(data, index=False)
    spec = importlib.util.spec_from_file_location("kfold_script", REPO / "scripts" / "kfold.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "kfold"
    metrics = script.main([
        "--data", str(data), "--base_model", str(tiny_llama), "--adapters", *adapters, "--max_length", str(MAX_LENGTH),
        "--val_fraction", "0.5", "--seed", "7", "--combine", combine, "--test_data", str(KAGGLE_TEST),
        "--out", str(out), "--report", "false",
    ])
    oof = pd.read_parquet(out / "oof_predictions.parquet")
    rows = load_arena(str(data))
    assert sorted(oof["id"]) == sorted(rows["id"])  # every row exactly once
    tokenizer = load_scoring_tokenizer(str(tiny_llama))
    for fold, adapter in enumerate(adapters):
        _, val = split_train_val(rows, 0.5, seed=7, fold=fold)
        part = oof[oof["fold"] == fold].set_index("id").loc[val["id"]]
        model = load_model(str(tiny_llama), [adapter], "fp32", "cpu")
        expected = letter_probs(score_dataset(model, tokenizer, val, MAX_LENGTH))
        assert np.allclose(part[list(WINNER_COLUMNS)].to_numpy(), expected, atol=1e-6)
        assert part["label"].tolist() == val["label"]
    assert metrics["rows"] == 8 and metrics["folds"] == 2 and 0 < metrics["oof_log_loss"] < 10
    submission = pd.read_csv(out / "test" / "submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == load_arena(str(KAGGLE_TEST))["id"]
    test_metrics_members = pd.read_parquet(out / "test" / "predictions.parquet").columns
    if combine == "average":
        assert (out / "averaged-adapter" / ADAPTER_WEIGHTS).exists()
        assert "averaged-adapter_a" in test_metrics_members
    else:
        assert not (out / "averaged-adapter").exists()
        assert {"fold0_a", "fold1_a"} <= set(test_metrics_members)
