"""lmsys_trl.model: names that look like local folders fail at once, adapters without weights are refused."""

import shutil

import pytest

from lmsys_trl.model import check_adapter_base, load_tokenizer, looks_like_a_path


def test_hub_ids_and_paths_are_told_apart():
    assert not looks_like_a_path("google/gemma-2-9b-it")
    for path in ("./models/x", "../x", "/abs/model", "models/smollm2/", "a/b/c", "~/m"):
        assert looks_like_a_path(path), path


def test_a_missing_local_model_folder_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no/such/model: no such model folder"):
        load_tokenizer(str(tmp_path / "no" / "such" / "model"))


def test_an_adapter_with_a_config_but_no_weights_is_refused(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2)).save_pretrained(adapter)
    check_adapter_base(str(adapter), str(tiny_llama))  # complete: accepted
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(adapter / "adapter_config.json", partial)
    with pytest.raises(ValueError, match="adapter_config.json but no adapter_model.safetensors"):
        check_adapter_base(str(partial), str(tiny_llama))
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        check_adapter_base(str(tmp_path / "gone" / "adapter"), str(tiny_llama))
