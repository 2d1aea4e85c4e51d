"""QLoRA SFT with TRL's `SFTTrainer`: data -> conversational records -> completion-only loss on the answer letter."""

import json
import logging
import os
import re
import tempfile

import numpy as np
import torch

from .data import DataError, load_arena, split_train_val, swap_augment
from .distill import attach_teachers, pair_with_swaps, with_teacher_probs
from .formatting import format_dataset
from .metrics import accuracy, log_loss, softmax
from .model import attention_kwargs, letter_token_ids, load_tokenizer, resolve_dtype


logger = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def build_datasets(script_args, tokenizer, max_length: int, seed: int, swap_pairs: bool = False):
    """Load, split (grouped), swap-augment the training part, and format both parts for training.

    Teacher probabilities (file columns or `teacher_files`) become a `teacher_probs` column (lmsys_trl.distill);
    `swap_pairs` follows every training row by its A/B swap instead of `swap_augment`.
    """
    rows = load_arena(script_args.train_files)
    if getattr(script_args, "teacher_files", None):
        rows = attach_teachers(rows, script_args.teacher_files)
    if script_args.val_files:
        train, val = rows, load_arena(script_args.val_files)
    else:
        train, val = split_train_val(rows, script_args.val_fraction, seed=seed, fold=script_args.fold)
    if script_args.max_train_rows is not None:
        train = train.select(range(min(script_args.max_train_rows, len(train))))
    if script_args.max_val_rows is not None:
        val = val.select(range(min(script_args.max_val_rows, len(val))))
    if len(train) == 0:
        raise DataError(
            f"{', '.join(script_args.train_files)}: no training rows left after the validation split and "
            "--max_train_rows; give more rows, a smaller --val_fraction or a larger --max_train_rows"
        )
    if swap_pairs and script_args.swap_augment:
        raise ValueError("swap_pairs already trains every row with its A/B swap: set swap_augment to 0")
    train = pair_with_swaps(train) if swap_pairs else swap_augment(train, script_args.swap_augment, seed=seed)
    kwargs = dict(num_proc=script_args.num_proc, cache_dir=script_args.formatting_cache_dir)
    train = format_dataset(train, tokenizer, max_length, "train", **kwargs)
    val = format_dataset(val, tokenizer, max_length, "train", **kwargs) if len(val) else None
    return with_teacher_probs(train), with_teacher_probs(val)


class AnswerMetrics:
    """`preprocess_logits_for_metrics` + `compute_metrics` pair: log loss / accuracy over the A/B/C logits.

    The answer position is the one before the first completion label, so only 3 logits per row leave the GPU.
    """

    def __init__(self, letter_ids: list[int]):
        self.letter_ids = letter_ids

    def preprocess(self, logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        first = (labels != -100).int().argmax(dim=1)
        rows = torch.arange(labels.shape[0], device=labels.device)
        return logits[rows, first - 1][:, self.letter_ids].float()

    def __call__(self, eval_pred) -> dict:
        letter_logits, labels = eval_pred.predictions, eval_pred.label_ids
        first = (labels != -100).argmax(axis=1)
        answer_tokens = labels[np.arange(len(labels)), first]
        targets = np.array([self.letter_ids.index(t) for t in answer_tokens])
        probs = softmax(letter_logits)
        return {"log_loss": log_loss(probs, targets), "accuracy": accuracy(probs, targets)}


def write_model_card(output_dir: str, script_args, training_args, model_args, metrics: dict) -> str:
    """README.md for the adapter: base model, data, hyper-parameters and validation metrics."""
    hparams = {
        k: getattr(training_args, k)
        for k in (
            "learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "max_length", "seed", "optim",
        )
    }
    hparams.update({k: getattr(model_args, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "load_in_4bit")})
    hparams["lora_target_modules"] = model_args.lora_target_modules
    lines = [
        "---",
        f"base_model: {model_args.model_name_or_path}",
        "library_name: peft",
        "tags: [lmsys-trl, trl, sft, lora, lmsys-arena]",
        "---",
        f"# {os.path.basename(os.path.abspath(output_dir))}",
        "",
        f"LoRA adapter for `{model_args.model_name_or_path}` trained with lmsys-trl to predict which of two chatbot "
        "answers people prefer: the model answers `A`, `B` or `C` (tie) after the comparison prompt.",
        "",
        "## Data",
        f"- train files: {', '.join(script_args.train_files)}",
        f"- validation: {', '.join(script_args.val_files) if script_args.val_files else f'grouped split, fraction {script_args.val_fraction}, fold {script_args.fold}'}",  # noqa: E501
        f"- A/B swap augmentation: {script_args.swap_augment}",
        "",
        "## Hyper-parameters",
        "```json",
        json.dumps(hparams, indent=2, default=str),
        "```",
        "",
        "## Validation metrics",
        "```json",
        json.dumps(metrics, indent=2),
        "```",
        "",
    ]
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def push_adapter(output_dir: str, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Upload the adapter, tokenizer, model card and metrics of `output_dir` (never checkpoints) to the Hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "training_args.bin"],
            commit_message="Upload lmsys-trl adapter",
        )
    except Exception as err:
        raise RuntimeError(
            f"push to the Hub repo '{repo_id}' failed ({type(err).__name__}: {err}). The adapter is saved locally "
            f"in {output_dir}; retry with `hf upload {repo_id} {output_dir}` once the network/token is fixed."
        ) from err
    return getattr(commit, "commit_url", repo_id)


def adapt_to_launch(script_args, training_args, model_args) -> dict:
    """Fit the recipe to how `accelerate launch` started us; returns extra model-init kwargs.

    - keeps the recipe's rows per optimiser step: gradient accumulation (else the per-device batch) is divided by
      the number of processes;
    - under DeepSpeed the fast path's packed micro-batches become plain accumulation (DeepSpeed steps in backward);
    - ZeRO-3 / FSDP shard parameters, so 4-bit weights are stored as bf16 there and loaded without a device map;
    - elsewhere a k-bit base goes whole onto this process's GPU.
    """
    from accelerate.utils import DistributedType

    state = training_args.distributed_state  # the Trainer's own state (honours use_cpu)
    world = state.num_processes
    if getattr(training_args, "pack_token_budget", None) and training_args.deepspeed_plugin is not None:
        # DeepSpeed steps its optimiser inside the backward that ends a step, so the fast path's several backwards
        # per step (one per packed micro-batch) would step it several times: use plain accumulation instead.
        rows = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        training_args.pack_token_budget = None
        training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps = 1, rows
        logger.warning("DeepSpeed: packed micro-batches off; %d rows per step as batch 1 x %d accumulation", rows, rows)
    if script_args.keep_rows_per_step and world > 1:
        rows = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        for name in ("gradient_accumulation_steps", "per_device_train_batch_size"):
            value = getattr(training_args, name)
            if value % world == 0:
                setattr(training_args, name, value // world)
                logger.info("%d processes: %s %d -> %d (still %d rows per optimiser step)", world, name, value,
                            value // world, rows)
                break
        else:
            raise ValueError(
                f"{rows} rows per optimiser step do not split over {world} processes (neither "
                "gradient_accumulation_steps nor per_device_train_batch_size is a multiple of it); change one, or "
                f"pass --keep_rows_per_step false to train with {rows * world} rows per step"
            )
    zero3 = getattr(training_args.deepspeed_plugin, "zero_stage", None) == 3
    fsdp = state.distributed_type == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    sharded = zero3 or fsdp  # (a 1-process FSDP launch reports no distributed type, hence the launcher's variable)
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return {}
    if sharded:
        if model_args.load_in_4bit and model_args.bnb_4bit_quant_storage is None:
            model_args.bnb_4bit_quant_storage = "bfloat16"  # a float dtype the sharding can flatten
            logger.info("ZeRO-3/FSDP: bnb_4bit_quant_storage set to bfloat16")
        return {}
    return {"device_map": {"": state.local_process_index}}


def check_adapter(output_dir: str, model) -> None:
    """Fail loudly if the saved adapter lacks LoRA weights (ZeRO-3 has been seen to save an empty file)."""
    from safetensors import safe_open

    path = os.path.join(output_dir, "adapter_model.safetensors")
    expected = sum(1 for name, _ in model.named_modules() if name.endswith(("lora_A.default", "lora_B.default")))
    with safe_open(path, "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    if len(shapes) != expected or any(0 in shape or not shape for shape in shapes):
        raise RuntimeError(
            f"{path}: holds {len(shapes)} tensors (shapes {shapes[:4]}...), expected {expected} non-empty LoRA "
            "weights; under DeepSpeed ZeRO-3 set zero3_save_16bit_model: true in the accelerate config"
        )


def save_sharded_adapter(peft_model, state_dict: dict, output_dir: str, dtype: torch.dtype | None = None) -> None:
    """Write `adapter_model.safetensors` from the full state dict that FSDP gathered on this process, in `dtype` (FSDP
    trains the adapter upcast to fp32; the single-GPU and ZeRO runs save it in the 16-bit training dtype).

    PEFT 0.21 picks a model's adapter entries by its module names, which under FSDP's nested wrapping read
    `layers.0._fsdp_wrapped_module.self_attn...` and match none of the (clean) gathered keys: `save_pretrained` then
    writes an empty file. The LoRA entries are picked by key here and named as PEFT names them (adapter name dropped).
    """
    from safetensors.torch import save_file

    from .ensemble import atomic_output

    adapter = re.escape(peft_model.active_adapter)
    lora_key = re.compile(rf"(.*\.lora_[AB])\.{adapter}(\.weight)$")
    weights = {
        match.group(1) + match.group(2): tensor.detach().to(dtype or tensor.dtype).contiguous()
        for key, tensor in state_dict.items()
        if (match := lora_key.fullmatch(key))
    }
    if not weights:
        raise RuntimeError(
            f"the gathered FSDP state dict holds no LoRA weights of adapter {peft_model.active_adapter!r}"
        )
    path = os.path.join(output_dir, "adapter_model.safetensors")
    with atomic_output(path) as tmp:
        save_file(weights, tmp, metadata={"format": "pt"})


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` saved completely (the Trainer writes trainer_state.json last); one cut short by a
    kill while saving is skipped with a warning."""
    if not os.path.isdir(output_dir):
        return None
    found = [(int(m.group(1)), m.group(0)) for m in map(CHECKPOINT.fullmatch, os.listdir(output_dir)) if m]
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
        logger.warning("%s is incomplete (no trainer_state.json: cut short while saving); skipping it", path)
    return None


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Fail before any training if `output_dir` cannot be written, or holds an earlier run (adapter, metrics.json,
    checkpoints) that this run neither resumes nor is allowed to overwrite."""
    if os.path.isdir(output_dir) and not (resuming or overwrite):
        results = (*ADAPTER_FILES, "metrics.json")
        earlier = sorted(f for f in os.listdir(output_dir) if f in results or CHECKPOINT.fullmatch(f))
        if earlier:
            raise FileExistsError(
                f"{output_dir} already holds an earlier run ({', '.join(earlier[:4])}); pass --resume_from_checkpoint "
                "true to continue it, --overwrite_output_dir true to train over it, or choose another --output_dir"
            )
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise PermissionError(
            f"{output_dir}: the output directory cannot be written ({err.strerror}); choose another --output_dir"
        ) from None


def run_sft(script_args, training_args, model_args):
    """The whole training run: tokenizer -> data -> model -> SFTTrainer -> save (+ card, metrics, push)."""
    from transformers import set_seed
    from trl import get_peft_config, get_quantization_config

    from .evaluation import write_json
    from .fast import FastSFTTrainer

    set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = last_complete_checkpoint(training_args.output_dir)
        if resume is None:
            logger.info("No checkpoint in %s: training from scratch", training_args.output_dir)
    check_output_dir(training_args.output_dir, bool(resume), script_args.overwrite_output_dir)

    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code)
    letter_ids = letter_token_ids(tokenizer)
    pairs = getattr(training_args, "swap_pairs", False)
    train, val = build_datasets(script_args, tokenizer, training_args.max_length, training_args.seed, pairs)
    logger.info("Rows: %d train, %d validation", len(train), len(val) if val is not None else 0)

    launch_kwargs = adapt_to_launch(script_args, training_args, model_args)
    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": resolve_dtype(model_args.dtype),
        **attention_kwargs(model_args.model_name_or_path, model_args.attn_implementation, model_args.model_revision,
                           script_args.attn_softcapping),
        **launch_kwargs,
        **(training_args.model_init_kwargs or {}),
    }
    # The Trainer's own push (repo creation at init, pushes on every save) is replaced by one push at the end.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    metrics_fn = AnswerMetrics(letter_ids)
    trainer = FastSFTTrainer(  # SFTTrainer + the fast-path recipe keys (lmsys_trl.fast)
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
        compute_metrics=metrics_fn if val is not None else None,
        preprocess_logits_for_metrics=metrics_fn.preprocess if val is not None else None,
    )
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

    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        if model_args.use_peft:
            check_adapter(training_args.output_dir, trainer.model)
        write_json(os.path.join(training_args.output_dir, "metrics.json"), metrics)  # atomic, like eval's outputs
        write_model_card(training_args.output_dir, script_args, training_args, model_args, metrics)
        trainer.accelerator.print(f"Adapter saved to {os.path.abspath(training_args.output_dir)}")
        if push_to_hub:
            repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
            url = push_adapter(training_args.output_dir, repo_id, training_args.hub_token, training_args.hub_private_repo)
            trainer.accelerator.print(f"Adapter pushed: {url}")
    trainer.accelerator.wait_for_everyone()
    return trainer, metrics
