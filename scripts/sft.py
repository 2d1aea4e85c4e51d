"""Fine-tune a chat LLM (QLoRA + TRL's SFTTrainer) to answer A / B / C for LMSYS arena comparisons.

Usage:
    accelerate launch scripts/sft.py recipes/gemma2_9b.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml scripts/sft.py recipes/llama31_8b.yaml
    accelerate launch scripts/sft.py recipes/gemma2_9b.yaml --learning_rate 1e-4 --push_to_hub true --hub_model_id me/x
"""

import logging
import os


logger = logging.getLogger("lmsys_trl.sft")


def main(script_args, training_args, model_args):
    import torch
    from transformers import set_seed
    from trl import get_peft_config, get_quantization_config

    from lmsys_trl.kernels import attention_kwargs
    from lmsys_trl.model import letter_token_ids, load_tokenizer
    from lmsys_trl.trainer import AnswerMetrics, ArenaSFTTrainer
    from lmsys_trl.training import (
        adapt_to_launch,
        build_datasets,
        check_output_dir,
        model_card_sections,
        push_to_hub,
        resolve_resume,
        save_outputs,
    )

    ###############
    # Seed, logging
    ###############
    set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    ###################################################
    # Output dir: resume, refuse an earlier run, write
    ###################################################
    out = training_args.output_dir
    resume = resolve_resume(out, training_args.resume_from_checkpoint, script_args.overwrite_output_dir)
    check_output_dir(out, bool(resume), script_args.overwrite_output_dir)  # starting over clears old checkpoints
    if resume:
        print(f"Resuming from {resume}", flush=True)

    ######################
    # Tokenizer and data
    ######################
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
    )
    letter_ids = letter_token_ids(tokenizer)
    row_max_length = script_args.row_max_length or training_args.max_length
    train, val = build_datasets(script_args, tokenizer, row_max_length, training_args.seed, training_args.swap_pairs)
    logger.info("Rows: %d train, %d validation", len(train), len(val) if val is not None else 0)

    #######
    # Model
    #######
    adapt_to_launch(script_args, training_args, model_args)  # rows per step over N processes, ZeRO-3/FSDP storage
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        **attention_kwargs(model_args.model_name_or_path, model_args.attn_implementation, model_args.model_revision,
                           script_args.attn_softcapping),
        **(training_args.model_init_kwargs or {}),
    }
    # The Hub token is used for the push at the end only: the Trainer would pickle it into training_args.bin.
    push, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args.push_to_hub, training_args.hub_token = False, None

    #########
    # Trainer
    #########
    metrics_fn = AnswerMetrics(letter_ids)
    trainer = ArenaSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        compute_metrics=metrics_fn if val is not None else None,
        preprocess_logits_for_metrics=metrics_fn.preprocess if val is not None else None,
    )

    ###############
    # Training loop
    ###############
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    metrics = {k: train_result.metrics.get(k) for k in ("train_loss", "train_runtime", "train_steps_per_second")}
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    if tokens and metrics["train_runtime"]:
        metrics["train_tokens_per_second"] = round(tokens[-1] / metrics["train_runtime"], 1)  # all processes
    metrics["world_size"] = trainer.accelerator.num_processes
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if val is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        metrics.update({k: v for k, v in eval_metrics.items() if k in ("eval_log_loss", "eval_accuracy", "eval_loss")})

    ##########################################################
    # Save the adapter, tokenizer, metrics and card (atomic)
    ##########################################################
    trainer.model_card_sections = model_card_sections(script_args, training_args, model_args, metrics)
    save_outputs(trainer, out, metrics, model_args.use_peft)
    trainer.accelerator.print(f"Adapter saved to {os.path.abspath(out)}")

    #############
    # Push (once)
    #############
    if push:
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(out))
        url = push_to_hub(trainer, repo_id, hub_token, training_args.hub_private_repo)
        trainer.accelerator.print(f"Adapter pushed: {url}")
    trainer.accelerator.wait_for_everyone()
    return trainer, metrics


def parse_args(argv=None):
    from trl import ModelConfig

    from lmsys_trl.configs import ArenaScriptArguments, parse
    from lmsys_trl.trainer import ArenaSFTConfig

    return parse((ArenaScriptArguments, ArenaSFTConfig, ModelConfig), argv)


def cli(argv=None):
    """Parse the command line (a recipe YAML first, flags after it override it), then train."""
    return main(*parse_args(argv))


if __name__ == "__main__":
    from lmsys_trl.configs import run_main

    run_main(cli)  # checked errors (data, template, options, output dir) as one line `error: ...`, exit status 2
