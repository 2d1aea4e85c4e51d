from pathlib import Path

import pytest

from lmsys_trl.configs import ArenaScriptArguments, parse

from conftest import REPO


RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TRAIN_RECIPES = [r for r in RECIPES if not r.name.startswith("eval")]
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


CPU = ["--use_cpu", "true"]  # GPU recipes ask for bf16, which SFTConfig refuses on a machine without a GPU


def sft_types():
    from trl import ModelConfig

    from lmsys_trl.trainer import ArenaSFTConfig  # what scripts/sft.py parses: SFTConfig + soft-label / swap keys

    return (ArenaScriptArguments, ArenaSFTConfig, ModelConfig)


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_every_training_recipe_parses_and_meets_the_invariants(recipe):
    script_args, training_args, model_args = parse(sft_types(), [str(recipe), *CPU])
    assert script_args.train_files and model_args.model_name_or_path
    # The traps of TRL/transformers defaults (float32, max_length 1024, checkpointing on): every recipe sets them.
    text = recipe.read_text()
    for key in ("max_length:", "activation_checkpointing:", "dtype:", "completion_only_loss:"):
        assert f"\n{key}" in text, f"{recipe.name} must set {key}"
    assert "gradient_checkpointing:" not in text  # the deprecated name
    assert training_args.completion_only_loss is True
    row_max_length = script_args.row_max_length or training_args.max_length
    if training_args.packing:  # the fast path: whole rows in sequences of one compiled shape
        assert training_args.packing_strategy == "bfd" and training_args.eval_packing is False
        assert training_args.pad_to_multiple_of == training_args.max_length >= row_max_length
        assert model_args.attn_implementation == "lmsys_flex"
    if model_args.load_in_4bit:
        assert model_args.dtype == "bfloat16" and training_args.bf16
    if "\nuse_cpu: true" in text:  # TRL's SFTConfig defaults bf16 to True: CPU bf16 autocast, ~9x slower than fp32
        assert "\nbf16: false" in text, f"{recipe.name}: a CPU recipe must set bf16: false (TRL's default is True)"
    for line in text.splitlines():  # every knob says why
        key = line.split(":")[0]
        if key in ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "save_steps", "max_length"):
            assert "#" in line, f"{recipe.name}: {key} needs a one-line why"


def test_unknown_recipe_keys_and_unused_trl_arguments_are_refused(tmp_path):
    import yaml

    keys = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({**keys, "learnig_rate": 1e-4}))
    with pytest.raises(ValueError, match=r"typo.yaml: Unknown arguments from config file: \['--learnig_rate'"):
        parse(sft_types(), [str(bad)])
    with pytest.raises(FileNotFoundError, match="no_such.yaml: no such recipe file"):
        parse(sft_types(), [str(tmp_path / "no_such.yaml")])
    with pytest.raises(ValueError, match="dataset_name .* is not read"):
        parse(sft_types(), [str(REPO / "recipes" / "demo_cpu.yaml"), "--dataset_name", "lmsys/arena"])
    with pytest.raises(ValueError, match="unknown option.*--learning_rat"):  # a prefix of a flag is not that flag
        parse(sft_types(), [str(REPO / "recipes" / "demo_cpu.yaml"), "--learning_rat", "1e-4"])


def test_command_line_overrides_yaml_and_yaml_overrides_defaults():
    recipe = str(REPO / "recipes" / "gemma2_9b.yaml")
    _, training_args, model_args = parse(sft_types(), [recipe, *CPU])
    yaml_lr = float(next(line for line in open(recipe) if line.startswith("learning_rate:")).split()[1])
    assert training_args.learning_rate == yaml_lr != 5e-5  # YAML beats SFTConfig's default
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
