"""Training throughput of one recipe under named variants (reference vs the recipe's own fast path).

Each variant is the recipe YAML with some keys overridden, run through the project's trainer (`ArenaSFTTrainer`) on a
random-weight model of a real shape, over the real length mix (the recipe's prompt for the rows of an arena file).
With TRL's packing the rows per optimiser step vary a little, so every step's real (non-padding) tokens and rows are
counted from the batches the trainer actually ran. Steps after the warm-up that compiled nothing are timed.
"""

import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone

import torch
import yaml
from accelerate.utils.memory import clear_device_cache
from transformers import TrainerCallback

from lmsys_trl.trainer import ArenaSFTTrainer


# The 38th-place recipe as measured in issue 5: batch 1 x 16 accumulation, no checkpointing, no packing, the model's
# attention (eager for gemma-2), full-vocabulary logits at every position (`FullLogitsTrainer`).
REFERENCE = {
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 16, "activation_checkpointing": False,
    "packing": False, "padding_free": False, "pad_to_multiple_of": None, "use_liger_kernel": False,
    "torch_compile": False, "attn_implementation": "REFERENCE_ATTENTION", "max_length": "ROW_MAX_LENGTH",
}


def length_mix(data_file: str, tokenizer, max_length: int):
    """The recipe's training records for the rows of `data_file` (their token lengths are the real mix)."""
    from lmsys_trl.data import load_arena
    from lmsys_trl.formatting import format_dataset

    return format_dataset(load_arena([data_file]), tokenizer, max_length, "train")


def quantize_nf4(model, double_quant: bool = True, quant_type: str = "nf4", quant_storage=torch.uint8):
    """Replace the decoder's `nn.Linear` layers by bitsandbytes 4-bit ones in place, as `load_in_4bit` loading does."""
    import bitsandbytes as bnb

    for parent in list(model.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=False, compute_dtype=child.weight.dtype,
                compress_statistics=double_quant, quant_type=quant_type, device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
                quant_storage=quant_storage,
            )
            layer.weight = weight.to(child.weight.device)  # quantizes on the way to the GPU
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True
    return model


def build_model(shape: str, tokenizer, model_args, device: str, num_layers: int | None = None,
                model_dir: str | None = None):
    """A random-weight model of `shape` (configs in `benchmarks/shapes.py`), 4-bit when the recipe says
    `load_in_4bit`; with `model_dir` (a model saved by `benchmarks/random_model.py`) loaded as scripts/sft.py loads
    it (TRL's quantization config, `from_pretrained`): the only way under ZeRO-3, whose `zero.Init` partitions
    the weights while they load."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    from lmsys_trl.kernels import FLEX_ATTENTION, register_flex_attention

    from shapes import model_config

    if model_args.attn_implementation == FLEX_ATTENTION:
        register_flex_attention()
    if model_dir:
        from trl import get_quantization_config

        kwargs = {"quantization_config": get_quantization_config(model_args)}
        if not is_deepspeed_zero3_enabled():
            kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, model_args.dtype), attn_implementation=model_args.attn_implementation,
            **kwargs,
        )
    config = model_config(shape, tokenizer, num_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, model_args.dtype), attn_implementation=model_args.attn_implementation
        )
    if model_args.load_in_4bit:
        storage = getattr(torch, model_args.bnb_4bit_quant_storage or "uint8")  # bfloat16 under ZeRO-3 / FSDP
        quantize_nf4(model, model_args.use_bnb_nested_quant, model_args.bnb_4bit_quant_type, storage)
    return model


class FullLogitsTrainer(ArenaSFTTrainer):
    """The reference's loss: the model's own forward, logits over the whole vocabulary at every position."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class Counting:
    """Mixin: batches in dataset order, and the real tokens / rows of every micro-batch it trains on."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.counted.append(real_tokens_and_rows(inputs))
        return super().training_step(model, inputs, num_items_in_batch)


def real_tokens_and_rows(batch: dict) -> tuple[int, int]:
    """(non-padding tokens, rows) of a collated batch: padded (attention mask) or padding-free / packed (position ids
    restart at 0 for each row; the padding after the rows is a run of position 0s, none followed by a 1)."""
    if "attention_mask" in batch:
        mask = batch["attention_mask"]
        return int(mask.sum()), int(mask.shape[0])
    positions = batch["position_ids"].flatten()
    starts = int(((positions[:-1] == 0) & (positions[1:] == 1)).sum())
    return int((positions > 0).sum()) + starts, starts


def compiled_graphs() -> int:
    """How many graphs torch.compile has built so far in this process (a step that compiles is not steady state)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class StepClock(TrainerCallback):
    """Wall time at the end of each optimiser step (device synchronised), whether the step compiled anything, and an
    optional profiler over one late step."""

    def __init__(self, profile_step: int | None = None):
        self.ends, self.graphs, self.profile_step, self.profiler = [], [], profile_step, None

    def _now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends, self.graphs = [self._now()], [compiled_graphs()]

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_step is not None and state.global_step == self.profile_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())
        self.graphs.append(compiled_graphs())
        if self.profiler is not None and state.global_step == self.profile_step + 1:
            self.profiler.__exit__(None, None, None)


def variant_config(recipe: str, overrides: dict, output_dir: str, max_steps: int):
    """(training_args, model_args) of `recipe` with `overrides` (None = back to the default) and benchmark settings."""
    from trl import ModelConfig

    from lmsys_trl.configs import ArenaScriptArguments, parse
    from lmsys_trl.trainer import ArenaSFTConfig
    from lmsys_trl.training import adapt_to_launch

    with open(recipe) as f:
        keys = yaml.safe_load(f)
    overrides = dict(overrides)
    if overrides.get("attn_implementation") == "REFERENCE_ATTENTION":  # the reference: eager gemma-2, sdpa llama
        overrides["attn_implementation"] = "eager" if "gemma" in keys["model_name_or_path"] else "sdpa"
    if overrides.get("max_length") == "ROW_MAX_LENGTH":  # unpacked rows: max_length is one row's budget
        overrides["max_length"] = keys.get("row_max_length") or keys["max_length"]
    overrides.pop("flex_kernel_options", None)  # not a recipe key: `run_variant` sets it on lmsys_trl.kernels
    keys.update(overrides)
    keys.update(
        output_dir=output_dir, max_steps=max_steps, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=1, push_to_hub=False, dataloader_num_workers=0,
    )
    keys = {k: v for k, v in keys.items() if v is not None}
    path = os.path.join(output_dir, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(keys, f)
    script_args, training_args, model_args = parse((ArenaScriptArguments, ArenaSFTConfig, ModelConfig), [path])
    adapt_to_launch(script_args, training_args, model_args)  # as scripts/sft.py: rows per step, ZeRO-3 storage
    return training_args, model_args


def run_variant(name, overrides, recipe, shape, tokenizer, records, warmup: int, steps: int, num_layers=None,
                profile: bool = False, model_dir: str | None = None) -> dict:
    """Train `warmup + steps` (+1 profiled) optimiser steps of one variant; returns its measured numbers."""
    from lmsys_trl import kernels

    flex_options = kernels.LARGE_HEAD_KERNEL_OPTIONS
    if "flex_kernel_options" in overrides:  # the flex kernel's tiles for head_dim 256 ({}: PyTorch's own choice)
        kernels.LARGE_HEAD_KERNEL_OPTIONS = overrides["flex_kernel_options"]
    try:
        return _run_variant(name, overrides, recipe, shape, tokenizer, records, warmup, steps, num_layers, profile,
                            model_dir)
    finally:
        kernels.LARGE_HEAD_KERNEL_OPTIONS = flex_options


def _run_variant(name, overrides, recipe, shape, tokenizer, records, warmup, steps, num_layers, profile, model_dir):
    from peft import LoraConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as out:
        total_steps = warmup + steps + (1 if profile else 0)
        training_args, model_args = variant_config(recipe, overrides, out, total_steps)
        if device == "cpu":
            training_args.use_cpu, training_args.bf16 = True, False
        micro_batches = training_args.gradient_accumulation_steps
        dataset = records.shuffle(seed=0)
        rows_needed = total_steps * training_args.per_device_train_batch_size * micro_batches * 12  # packed: ~8/seq
        while len(dataset) < rows_needed:
            from datasets import concatenate_datasets

            dataset = concatenate_datasets([dataset, records.shuffle(seed=len(dataset))])
        model = build_model(shape, tokenizer, model_args, device, num_layers, model_dir)
        lora = LoraConfig(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules, task_type=model_args.lora_task_type,
        )
        trainer_class = type(
            "BenchTrainer", (Counting, FullLogitsTrainer if name == "reference" else ArenaSFTTrainer), {}
        )
        clock = StepClock(warmup + steps if profile else None)
        trainer = trainer_class(
            model, training_args, train_dataset=dataset.select(range(rows_needed)), processing_class=tokenizer,
            peft_config=lora, callbacks=[clock],
        )
        trainer.counted = []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        durations = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
        compiled = [b != a for a, b in zip(clock.graphs, clock.graphs[1:])]
        # timed: the steps after the warm-up that compiled nothing (a shape first seen late compiles)
        timed = [k for k in range(warmup, warmup + steps) if not compiled[k]]
        if not timed:
            raise RuntimeError(f"every timed step of {name} compiled something: raise --warmup / --steps")
        per_step = [trainer.counted[k * micro_batches:(k + 1) * micro_batches] for k in range(len(durations))]
        seconds = sum(durations[k] for k in timed)
        tokens = sum(t for k in timed for t, _ in per_step[k])
        rows = sum(r for k in timed for _, r in per_step[k])
        result = {
            "variant": name,
            "tokens_per_s": round(tokens / seconds, 1),
            "rows_per_s": round(rows / seconds, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None,
            "step_seconds": [round(d, 3) for d in durations],
            "timed_steps": timed,
            "timed_tokens": tokens,
            "rows_per_step": round(rows / len(timed), 2),
            "world_size": trainer.accelerator.num_processes,
            "launcher": launcher_name(trainer.accelerator),
            "overrides": overrides,
        }
        if clock.profiler is not None:
            sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
            table = clock.profiler.key_averages().table
            result["profile"] = table(sort_by=sort, row_limit=30, max_name_column_width=60)
        del trainer, model
        clear_device_cache(garbage_collection=True)
    return result


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def append_result(path: str, shape: str, result: dict, command: str, mode: str = "train") -> dict:
    """One JSON line per measured variant in `path` (keys as in docs/benchmarks.md)."""
    line = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(), "model": shape,
        "mode": mode, **{k: v for k, v in result.items() if k != "profile"}, "command": command,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def describe_mix(records, tokenizer) -> str:
    """Median / p90 / max token length of the records (the chat template rendered as the trainer does)."""
    from lmsys_trl.formatting import chat_token_ids

    lengths = sorted(len(chat_token_ids(tokenizer, r)) for r in records)
    p90 = lengths[int(0.9 * (len(lengths) - 1))]
    return f"{len(lengths)} rows, median {statistics.median(lengths):.0f}, p90 {p90}, max {lengths[-1]} tokens"


def launcher_name(accelerator) -> str:
    """single / ddp / zero2 / zero3 / fsdp: how `accelerate launch` ran this process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"
