"""The fast training path: padding-free packing under a token budget, compiled flex attention, selective checkpointing.

Everything plugs into TRL / transformers extension points, switched on by recipe keys of `FastSFTConfig`:
- `pack_token_budget`: the rows of a batch are packed first-fit-decreasing into micro-batches of at most this many
  tokens (flat, with `position_ids` restarting at each row, no attention mask); `FastSFTTrainer.training_step` runs the
  micro-batches of one batch one after another, so the optimiser step still covers exactly the batch's rows and the loss
  is the mean over all their answer tokens, as in the padded path.
- `flex_attention`: `torch.compile`d `flex_attention` registered through transformers' `AttentionInterface`, with a
  logit-softcapping `score_mod` (gemma-2) and its `BlockMask` built by transformers from `position_ids`, so packed rows
  never attend to each other.
- `checkpointed_layers`: with gradient checkpointing on, only this fraction of the decoder layers is recomputed.
The LM head runs only at the answer positions already: TRL's `SFTTrainer.compute_loss` uses its fused LM head.
"""

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from .distill import TEACHER_PROBS, DistillConfig, DistillTrainerMixin
from .model import compile_decoder_layers, decoder_layers


logger = logging.getLogger(__name__)
FLEX_ATTENTION = "lmsys_flex"
# Triton tiles for head_dim 256 (gemma-2): the default ones exceed the H100's shared memory.
LARGE_HEAD_KERNEL_OPTIONS = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1}


@dataclass
class FastSFTConfig(DistillConfig, SFTConfig):
    """`SFTConfig` plus the fast-path switches (all off by default: then it is TRL's padded path) and the
    soft-label / swap-pair keys of `lmsys_trl.distill.DistillConfig`."""

    pack_token_budget: int | None = field(
        default=None,
        metadata={
            "help": "Pack the rows of each batch padding-free into micro-batches of at most this many tokens (each "
            "padded to a multiple of `pad_to_multiple_of`, else to the budget). Must be >= max_length."
        },
    )
    flex_attention: bool = field(
        default=False,
        metadata={"help": "Compiled flex attention (softcap score_mod, packed-row block mask) instead of the model's."},
    )
    compile_layers: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer (fixed shapes: best with pad_to_multiple_of = "
                          "pack_token_budget, one micro-batch length)."},
    )
    checkpointed_layers: float = field(
        default=1.0,
        metadata={"help": "With gradient_checkpointing: fraction of decoder layers recomputed in backward (spread)."},
    )

    def __post_init__(self):
        if self.pack_token_budget is not None:
            if self.max_length is None or self.pack_token_budget < self.max_length:
                raise ValueError(
                    f"pack_token_budget ({self.pack_token_budget}) must be >= max_length ({self.max_length}): "
                    "a row must fit one micro-batch"
                )
            if self.packing or self.padding_free:
                raise ValueError("pack_token_budget replaces TRL's packing/padding_free: set both to false")
            if isinstance(self.pad_to_multiple_of, int) and self.pack_token_budget % self.pad_to_multiple_of:
                raise ValueError(
                    f"pack_token_budget ({self.pack_token_budget}) must be a multiple of pad_to_multiple_of "
                    f"({self.pad_to_multiple_of})"
                )
        if not 0.0 <= self.checkpointed_layers <= 1.0:
            raise ValueError(f"checkpointed_layers must be a fraction in [0, 1], got {self.checkpointed_layers}")
        super().__post_init__()


def pack_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: indices of `lengths` grouped into bins whose sums stay <= `budget`."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > budget:
            raise ValueError(f"row {i} has {lengths[i]} tokens, more than the packing budget of {budget}")
        target = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if target is None:
            bins.append([])
            room.append(budget)
            target = len(bins) - 1
        bins[target].append(i)
        room[target] -= lengths[i]
    return bins


@dataclass
class PackingCollator:
    """Tokenized rows (`input_ids`, `labels`) -> one flat sequence of packed micro-batches.

    Returns `input_ids`, `labels`, `position_ids` of shape (1, total) and `micro_batch_lengths` (a list summing to
    total). Each micro-batch holds whole rows (positions restart at 0 for each) and ends with padding up to a multiple
    of `pad_to_multiple_of` (or the budget): the padding is a separate pseudo-row with labels -100, so compiled kernels
    see few distinct shapes and no real token attends to it.
    """

    pad_token_id: int
    token_budget: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        multiple = self.pad_to_multiple_of or self.token_budget
        ids, labels, positions, micro_lengths, teacher = [], [], [], [], []
        soft = TEACHER_PROBS in examples[0]  # per-row soft labels (lmsys_trl.distill) travel per token
        for rows in pack_rows(lengths, self.token_budget):
            used = sum(lengths[i] for i in rows)
            size = min(-(-used // multiple) * multiple, self.token_budget)
            for i in rows:
                ids += examples[i]["input_ids"]
                labels += examples[i].get("labels", examples[i]["input_ids"])
                positions += range(lengths[i])
                teacher += [examples[i][TEACHER_PROBS]] * lengths[i] if soft else []
            ids += [self.pad_token_id] * (size - used)
            teacher += [[0.0] * 3] * (size - used) if soft else []
            labels += [-100] * (size - used)
            positions += range(size - used)
            micro_lengths.append(size)
        as_row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
        batch = {
            "input_ids": as_row(ids),
            "labels": as_row(labels),
            "position_ids": as_row(positions),
            "micro_batch_lengths": micro_lengths,
        }
        if soft:
            batch[TEACHER_PROBS] = torch.tensor(teacher, dtype=torch.float32)[None]
        return batch


_COMPILED_FLEX = {}
_SOFTCAP_MODS = {}


def _flex_kernel(device_type: str):
    """`flex_attention`, compiled once per device type with fixed shapes (left eager on CPU, where it only runs tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if device_type not in _COMPILED_FLEX:
        _COMPILED_FLEX[device_type] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX[device_type]


def _softcap_mod(softcap: float):
    """Gemma-2's attention logit softcapping as a flex `score_mod` (one function per value: no recompiles)."""
    if softcap not in _SOFTCAP_MODS:

        def score_mod(score, batch, head, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

        _SOFTCAP_MODS[softcap] = score_mod
    return _SOFTCAP_MODS[softcap]


def flex_attention_forward(module, query, key, value, attention_mask, scaling=None, softcap=None, dropout=0.0, **_):
    """transformers attention function: (batch, heads, seq, dim) tensors and a `BlockMask` -> (batch, seq, heads, dim)."""
    if dropout:
        raise ValueError(f"{FLEX_ATTENTION} has no attention dropout; set the model's attention_dropout to 0")
    output = _flex_kernel(query.device.type)(
        query,
        key,
        value,
        score_mod=_softcap_mod(softcap) if softcap else None,
        block_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        kernel_options=LARGE_HEAD_KERNEL_OPTIONS if query.shape[-1] > 128 and query.is_cuda else None,
    )
    return output.transpose(1, 2).contiguous(), None


def register_flex_attention() -> str:
    """Register the compiled flex kernel and transformers' flex `BlockMask` builder under `FLEX_ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(FLEX_ATTENTION, flex_attention_forward)
    AttentionMaskInterface.register(FLEX_ATTENTION, flex_attention_mask)
    # evaluation batches (padded, not packed) bring a few more shapes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return FLEX_ATTENTION


def limit_checkpointed_layers(model, fraction: float) -> int:
    """Keep gradient checkpointing on `round(fraction * layers)` evenly spread decoder layers; returns that count."""
    layers = decoder_layers(model)
    keep = round(fraction * len(layers))
    chosen = {int(i * len(layers) / keep) for i in range(keep)} if keep else set()
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and index in chosen
    return sum(layer.gradient_checkpointing for layer in layers)


class SelectiveCheckpointing(TrainerCallback):
    """Applies `limit_checkpointed_layers` once the Trainer has switched gradient checkpointing on."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        limit_checkpointed_layers(model, self.fraction)


class FastSFTTrainer(DistillTrainerMixin, SFTTrainer):
    """`SFTTrainer` that honours the `FastSFTConfig` keys; with them all off it is exactly `SFTTrainer`."""

    def __init__(self, model, args: FastSFTConfig, *pargs, **kwargs):
        if getattr(args, "flex_attention", False):
            register_flex_attention()
            if isinstance(model, str):
                args.model_init_kwargs = {**(args.model_init_kwargs or {}), "attn_implementation": FLEX_ATTENTION}
            else:
                model.set_attn_implementation(FLEX_ATTENTION)
        super().__init__(model, args, *pargs, **kwargs)
        if args.gradient_checkpointing and getattr(args, "checkpointed_layers", 1.0) < 1.0:
            self.add_callback(SelectiveCheckpointing(args.checkpointed_layers))
        if getattr(args, "compile_layers", False):
            compile_decoder_layers(self.model)
        self.padded_steps = 0  # steps where this process ran padding micro-batches (see `training_step`)
        budget = getattr(args, "pack_token_budget", None)
        multiple = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None  # TRL's "auto"
        self.packing_collator = (
            PackingCollator(self._tokenizer.pad_token_id, budget, multiple) if budget else None
        )

    def get_train_dataloader(self):
        """Training batches go through the packing collator; evaluation keeps padded rows (per-row metrics)."""
        if self.packing_collator is None:
            return super().get_train_dataloader()
        padded, self.data_collator = self.data_collator, self.packing_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = padded

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward + backward of each packed micro-batch in turn (gradients accumulate; DDP syncs on the last).

        Every process runs as many micro-batches (padding-only ones first where it has fewer): TRL's `compute_loss`
        gathers its metrics across processes once per call, so unequal counts would hang the collectives."""
        lengths = inputs.pop("micro_batch_lengths", None)
        if lengths is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:  # every micro-batch must be normalised by the whole batch's answer tokens
            num_items_in_batch = int((inputs["labels"] != -100).sum())
        parts = [dict(zip(inputs, values)) for values in zip(*(inputs[k].split(lengths, dim=1) for k in inputs))]
        missing = self._most_micro_batches(len(parts)) - len(parts)
        if missing:
            if not self.padded_steps:
                logger.info("step %d: %d padding micro-batch(es) keep this process in step with the others "
                            "(its rows packed into fewer)", self.state.global_step, missing)
            self.padded_steps += 1
            parts = [padding_micro_batch(min(parts, key=lambda p: p["input_ids"].shape[1]))] * missing + parts
        if len(parts) == 1:
            return super().training_step(model, parts[0], num_items_in_batch)
        total = 0.0
        for i, part in enumerate(parts):
            with self.accelerator.no_sync(model) if i < len(parts) - 1 else nullcontext():
                total = total + super().training_step(model, part, num_items_in_batch)
        return total

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        """The Trainer's save; under FSDP the adapter weights are then rewritten from the gathered state dict
        (`train.save_sharded_adapter`: PEFT's own selection finds none of them there) in the 16-bit training dtype."""
        from peft import PeftModel

        from .train import save_sharded_adapter

        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled and state_dict and self.args.should_save and isinstance(model, PeftModel):
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            save_sharded_adapter(model, state_dict, output_dir or self.args.output_dir, dtype)

    def _most_micro_batches(self, count: int) -> int:
        """The largest micro-batch count of this step over all processes."""
        if self.accelerator.num_processes == 1:
            return count
        counts = self.accelerator.gather(torch.tensor([count], device=self.accelerator.device))
        return int(counts.max())


def padding_micro_batch(part: dict) -> dict:
    """A micro-batch shaped like `part` that trains nothing: labels -100, positions from 0, everything else zero."""
    dummy = {key: torch.zeros_like(value) for key, value in part.items()}
    dummy["labels"] = torch.full_like(part["labels"], -100)
    dummy["position_ids"] = torch.arange(part["position_ids"].shape[1], device=part["position_ids"].device)[None]
    return dummy
