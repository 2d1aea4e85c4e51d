from pathlib import Path

import pytest
from conftest import REPO

from lmsys_trl.configs import ArenaScriptArguments, parse


RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TRAIN_RECIPES = [r for r in RECIPES if not r.name.startswith("eval")]
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


CPU = ["--use_cpu", "true"]  # GPU recipes ask for bf16, which SFTConfig refuses on a machine without a GPU


def sft_types():
    from trl import ModelConfig

    from lmsys_trl.fast import FastSFTConfig  # what scripts/sft.py parses: SFTConfig + the fast-path keys

    return (ArenaScriptArguments, FastSFTConfig, ModelConfig)


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_every_training_recipe_parses(recipe):
    script_args, training_args, model_args = parse(sft_types(), [str(recipe), *CPU])
    assert script_args.train_files and model_args.model_name_or_path
    # The traps of TRL/transformers defaults: every recipe states these explicitly.
    text = recipe.read_text()
    for key in ("max_length:", "gradient_checkpointing:", "dtype:", "completion_only_loss:"):
        assert f"\n{key}" in text, f"{recipe.name} must set {key}"
    assert training_args.completion_only_loss is True
    if model_args.load_in_4bit:
        assert model_args.dtype == "bfloat16" and model_args.bnb_4bit_quant_type == "nf4"
        assert model_args.use_bnb_nested_quant and training_args.bf16
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 16
        assert model_args.lora_r == 32 and model_args.lora_alpha == 64
        assert sorted(model_args.lora_target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_reference_hyper_parameters_per_model():
    expected = {"gemma2_9b": (1.5e-4, 2200), "llama31_8b": (1e-4, 2200), "gemma2_2b": (2e-4, 2048)}
    for name, (lr, max_length) in expected.items():
        _, training_args, model_args = parse(sft_types(), [str(REPO / "recipes" / f"{name}.yaml"), *CPU])
        assert (training_args.learning_rate, training_args.max_length) == (lr, max_length)
        assert (model_args.attn_implementation == "eager") == name.startswith("gemma")


def test_command_line_overrides_yaml_and_yaml_overrides_defaults():
    recipe = str(REPO / "recipes" / "gemma2_9b.yaml")
    _, training_args, model_args = parse(sft_types(), [recipe, *CPU])
    assert training_args.learning_rate == 1.5e-4 and training_args.weight_decay == 1e-5  # YAML beats defaults
    script_args, training_args, model_args = parse(
        sft_types(), [recipe, "--learning_rate", "1e-4", "--lora_r", "8", "--fold", "3", "--push_to_hub", "true", *CPU]
    )
    assert training_args.learning_rate == 1e-4 and model_args.lora_r == 8 and script_args.fold == 3
    assert training_args.push_to_hub is True
    _, explicit, _ = parse(sft_types(), ["--config", recipe, "--learning_rate", "3e-5", *CPU])
    assert explicit.learning_rate == 3e-5  # the --config form works too


def test_script_arguments_validate():
    with pytest.raises(ValueError, match="train_files is required"):
        ArenaScriptArguments()
    with pytest.raises(ValueError, match="val_fraction"):
        ArenaScriptArguments(train_files=["x.csv"], val_fraction=1.5)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1 and loaded.mixed_precision == "bf16"
    if "zero3" in config.name:
        assert loaded.deepspeed_config["zero_stage"] == 3 and loaded.deepspeed_config["zero3_init_flag"] is True
    if "zero2" in config.name:
        assert loaded.deepspeed_config["zero_stage"] == 2
    assert Path(config).read_text().startswith("#")  # each config says what it is for
