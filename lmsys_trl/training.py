"""The training run's set-up around `ArenaSFTTrainer`: datasets, launch adaptation, output dir, checkpoints, push."""

import json
import logging
import os
import re
import shutil
import tempfile

from .data import DataError, load_arena, split_train_val, swap_augment
from .formatting import format_dataset
from .teachers import attach_teachers, pair_with_swaps, with_teacher_probs


logger = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def build_datasets(script_args, tokenizer, max_length: int, seed: int, swap_pairs: bool = False):
    """Load, split (grouped), swap-augment the training part, and format both parts for training.

    Teacher probabilities (file columns or `teacher_files`) become a `teacher_probs` column (lmsys_trl.teachers);
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


def adapt_to_launch(script_args, training_args, model_args) -> None:
    """Fit the recipe to how `accelerate launch` started us.

    - keeps the recipe's rows per optimiser step: gradient accumulation (else the per-device batch) is divided by
      the number of processes (packed: rounded, as a packed sequence holds a varying number of rows anyway);
    - ZeRO-3 / FSDP shard parameters, so 4-bit weights are stored as bf16 there and loaded without a device map;
    - `torch_compile` is switched off under ZeRO-3 and FSDP v1 (measured on gemma-2-9b, H200, docs/benchmarks.md):
      under ZeRO-3 dynamo recompiles every decoder layer around the gathered weights, hits its recompile limit and
      runs them eagerly (1.63 rows/s compiled vs 2.86 without); under FSDP v1 accelerate 1.15's `compile_regions`
      recurses without end in FSDP's `__getattr__`.
    (device maps are TRL's: the whole model on this process's device under DDP / DeepSpeed.)
    """
    state = training_args.distributed_state  # the Trainer's own state (honours use_cpu)
    world = state.num_processes
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
            if training_args.packing:  # packed sequences hold a varying number of rows: the nearest count will do
                steps = max(1, round(training_args.gradient_accumulation_steps / world))
                logger.warning("%d processes: gradient_accumulation_steps %d -> %d (packed: about %.0f%% of the "
                               "recipe's rows per optimiser step)", world, training_args.gradient_accumulation_steps,
                               steps, 100 * steps * world / training_args.gradient_accumulation_steps)
                training_args.gradient_accumulation_steps = steps
                return adapt_sharding(training_args, model_args, state)
            raise ValueError(
                f"{rows} rows per optimiser step do not split over {world} processes (neither "
                "gradient_accumulation_steps nor per_device_train_batch_size is a multiple of it); change one, or "
                f"pass --keep_rows_per_step false to train with {rows * world} rows per step"
            )
    adapt_sharding(training_args, model_args, state)


def adapt_sharding(training_args, model_args, state) -> None:
    """ZeRO-3 / FSDP: 4-bit storage the sharding can flatten, and no `torch_compile` (see `adapt_to_launch`)."""
    from accelerate.utils import DistributedType

    zero3 = getattr(training_args.deepspeed_plugin, "zero_stage", None) == 3
    fsdp = state.distributed_type == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in (
        "true", "1")
    sharded = zero3 or fsdp  # (a 1-process FSDP launch reports no distributed type, hence the launcher's variable)
    if sharded and model_args.load_in_4bit and model_args.bnb_4bit_quant_storage is None:
        model_args.bnb_4bit_quant_storage = "bfloat16"  # a float dtype the sharding can flatten
        logger.info("ZeRO-3/FSDP: bnb_4bit_quant_storage set to bfloat16")
    fsdp_v1 = fsdp and str(os.environ.get("FSDP_VERSION", "1")) == "1"
    if training_args.torch_compile and (zero3 or fsdp_v1):
        # TrainingArguments already exported its backend for accelerate's dynamo plugin: take it back too
        training_args.torch_compile, training_args.torch_compile_backend = False, "no"
        os.environ["ACCELERATE_DYNAMO_BACKEND"] = "NO"
        launcher = "ZeRO-3" if zero3 else "FSDP"
        logger.warning("%s: torch_compile off (lmsys_trl.training.adapt_to_launch says why)", launcher)


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


TRAINER_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


def resolve_resume(output_dir: str, resume, overwrite: bool) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names: `true` / `last` -> the last complete `checkpoint-*` of
    `output_dir` (None in a folder without any, to start from scratch), or a checkpoint folder's path. Checked errors:
    a path that is no checkpoint, and `true` on a folder that holds a finished adapter but no checkpoint (there is
    nothing to resume: the run ended or saved no checkpoints)."""
    if resume in (None, False) or (isinstance(resume, str) and resume.lower() in ("false", "")):
        return None
    if isinstance(resume, str) and resume.lower() not in ("true", "last"):
        if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume}: no checkpoint folder there (a `checkpoint-N` folder holding "
                "trainer_state.json); give one, or `true` for the last one in --output_dir"
            )
        return resume
    found = last_complete_checkpoint(output_dir)
    if found is None and os.path.isdir(output_dir) and not overwrite:
        finished = sorted(f for f in os.listdir(output_dir) if f in (*ADAPTER_FILES, "metrics.json"))
        if finished:
            raise FileNotFoundError(
                f"nothing to resume in {output_dir}: it holds a finished run ({', '.join(finished)}) and no "
                "checkpoint-*; pass --overwrite_output_dir true (without --resume_from_checkpoint) to train it again "
                "from scratch, or choose another --output_dir"
            )
    if found is None:
        logger.info("No checkpoint in %s: training from scratch", output_dir)
    return found


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Fail before any training if `output_dir` cannot be written, or holds an earlier run (adapter, metrics.json,
    checkpoints) that this run neither resumes nor is allowed to overwrite. A run that starts over
    (`--overwrite_output_dir true`, not resuming) clears the earlier run's `checkpoint-*` folders (written by the
    Trainer), so that a later `--resume_from_checkpoint true` can only take this run's own checkpoints."""
    if os.path.isdir(output_dir) and not (resuming or overwrite):
        results = (*ADAPTER_FILES, "metrics.json")
        earlier = sorted(f for f in os.listdir(output_dir) if f in results or CHECKPOINT.fullmatch(f))
        if earlier:
            raise FileExistsError(
                f"{output_dir} already holds an earlier run ({', '.join(earlier[:4])}); pass --resume_from_checkpoint "
                "true to continue it, --overwrite_output_dir true to train over it, or choose another --output_dir"
            )
    if os.path.isdir(output_dir) and overwrite and not resuming:
        for name in sorted(os.listdir(output_dir)):
            path = os.path.join(output_dir, name)
            if CHECKPOINT.fullmatch(name) and os.path.isdir(path) and (
                    set(os.listdir(path)) & set(TRAINER_CHECKPOINT_FILES) or not os.listdir(path)):
                shutil.rmtree(path)
                logger.warning("--overwrite_output_dir: removed the earlier run's %s", path)
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise PermissionError(
            f"{output_dir}: the output directory cannot be written ({err.strerror}); choose another --output_dir"
        ) from None


HPARAMS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
           "packing", "max_length", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "optim")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit")


def model_card_sections(script_args, training_args, model_args, metrics: dict) -> str:
    """The model card's own sections after TRL's: base model, data, hyper-parameters, validation metrics."""
    validation = ", ".join(script_args.val_files) if script_args.val_files else (
        f"grouped split of the train files, fraction {script_args.val_fraction}, fold {script_args.fold}")
    hparams = {k: getattr(training_args, k) for k in HPARAMS} | {k: getattr(model_args, k) for k in LORA_KEYS}
    return "\n".join([
        "## Data", "", f"- base model: {model_args.model_name_or_path}",
        f"- train files: {', '.join(script_args.train_files)}", f"- validation: {validation}",
        f"- A/B swap augmentation: {script_args.swap_augment}", "", "## Hyper-parameters", "", "```json",
        json.dumps(hparams, indent=2, default=str), "```", "", "## Validation metrics", "", "```json",
        json.dumps(metrics, indent=2), "```", "",
    ])


FINAL_STAGING = ".lmsys-final"  # inside output_dir: the final files are written here first


def save_outputs(trainer, output_dir: str, metrics: dict, use_peft: bool) -> None:
    """Save the adapter, tokenizer, metrics.json and model card so that a reader never sees a partial set: everything
    is written into a staging folder inside `output_dir` (all processes save: ZeRO-3 / FSDP gather), the adapter is
    checked, then the files are moved into place one by one, the adapter weights last. A failed write (a full disk)
    leaves none of this run's final files in `output_dir` and is a one-line error."""
    from .io import write_json

    staging = os.path.join(output_dir, FINAL_STAGING)
    main = trainer.accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # this project's own leftover of a killed save
            os.makedirs(staging)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(staging)
        if main:
            if use_peft:
                check_adapter(staging, trainer.model)
            write_json(os.path.join(staging, "metrics.json"), metrics)
            final_dir, trainer.args.output_dir = trainer.args.output_dir, staging  # TRL writes the card there
            try:
                trainer.create_model_card(model_name=os.path.basename(os.path.abspath(output_dir)))
            finally:
                trainer.args.output_dir = final_dir
            for name in sorted(os.listdir(staging), key=lambda n: n == "adapter_model.safetensors"):
                os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    except OSError as err:
        raise OSError(
            f"{output_dir}: the trained adapter could not be saved ({err.strerror or err}); none of its final files "
            "were written there (free some space, or choose another --output_dir, and resume from the last checkpoint)"
        ) from None
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)


def push_to_hub(trainer, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """The Trainer's own `push_to_hub` of the output folder (never checkpoints); the token is passed to this call
    only (never stored in the arguments it pickles). A failure keeps the local adapter and says how to retry."""
    trainer.args.hub_model_id = repo_id
    try:
        commit = trainer.push_to_hub(commit_message="Upload lmsys-trl adapter", token=token, private=private)
    except Exception as err:
        out = trainer.args.output_dir
        raise RuntimeError(
            f"push to the Hub repo '{repo_id}' failed ({type(err).__name__}: {err}). The adapter is saved locally "
            f"in {out}; retry with `hf upload {repo_id} {out}` once the network/token is fixed."
        ) from err
    return getattr(commit, "commit_url", repo_id)
