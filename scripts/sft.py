"""Fine-tune a chat LLM (QLoRA + TRL SFTTrainer) to answer A / B / C for LMSYS arena comparisons.

Usage:
    accelerate launch scripts/sft.py recipes/gemma2_9b.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml scripts/sft.py recipes/llama31_8b.yaml
    accelerate launch scripts/sft.py recipes/gemma2_9b.yaml --learning_rate 1e-4 --push_to_hub true --hub_model_id me/x
"""


def main(argv=None):
    from trl import ModelConfig

    from lmsys_trl.configs import ArenaScriptArguments, parse
    from lmsys_trl.fast import FastSFTConfig
    from lmsys_trl.train import run_sft

    script_args, training_args, model_args = parse((ArenaScriptArguments, FastSFTConfig, ModelConfig), argv)
    return run_sft(script_args, training_args, model_args)


if __name__ == "__main__":
    from lmsys_trl.configs import run_main

    run_main(main)  # checked errors (bad data, template, options, output dir) as one line, exit status 2
