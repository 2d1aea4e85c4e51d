"""`ArenaSFTTrainer`: TRL's `SFTTrainer` plus what answering A / B / C needs, through TRL's extension points.

- validation metrics over the three letters (`AnswerMetrics`: log loss and accuracy of softmax(A/B/C logits));
- soft labels: `loss = (1 - soft_label_weight) * hard + soft_label_weight * CE(teacher, softmax(A/B/C logits))`, the
  letter logits read from the same forward (a hook on the backbone), every row weighted like its answer tokens in the
  hard loss, so gradient accumulation keeps the scale;
- swap-consistent training: `PairedSampler` keeps each row next to its A/B swap; `symmetry_weight` adds a symmetric
  KL between p(x) and the swapped row's probabilities mapped back to A/B (both rows in one batch);
- the FSDP adapter save (`_save`): PEFT 0.21 finds no adapter key under FSDP's nested wrappers.
Everything else (packing, padding-free batches, the LM head at the answer tokens, checkpointing, compilation,
DeepSpeed / FSDP) is TRL's, transformers' and accelerate's own, switched on by recipe keys.
"""

import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from .metrics import accuracy, log_loss, softmax
from .model import causal_lm_of, letter_logits_from_hidden, letter_token_ids
from .teachers import TEACHER_PROBS, PairedSampler, SoftLabelCollator


logger = logging.getLogger(__name__)
SWAP_BACK = [1, 0, 2]  # A/B/C probabilities of a swapped row, reordered to the original A/B


@dataclass
class ArenaSFTConfig(SFTConfig):
    """TRL's `SFTConfig` plus the soft-label and swap-pair keys of `lmsys_trl.trainer.ArenaSFTTrainer`."""

    soft_label_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the cross-entropy to the teacher's A/B/C probabilities (1 - it: the hard label "
                          "loss). Needs teacher columns in the data or --teacher_files."},
    )
    swap_pairs: bool = field(
        default=False,
        metadata={"help": "Train every row together with its A/B swap, in the same optimisation step (replaces "
                          "swap_augment; rows per step must be even)."},
    )
    symmetry_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of a symmetric KL between p(A,B,C|x) and p(B,A,C|swap(x)); needs swap_pairs and an "
                          "even per_device_train_batch_size (a pair shares a batch)."},
    )

    def __post_init__(self):
        if not 0.0 <= self.soft_label_weight <= 1.0:
            raise ValueError(f"soft_label_weight must be in [0, 1], got {self.soft_label_weight}")
        if self.symmetry_weight < 0:
            raise ValueError(f"symmetry_weight must be >= 0, got {self.symmetry_weight}")
        batch, steps = self.per_device_train_batch_size, self.gradient_accumulation_steps
        if self.swap_pairs and batch * steps % 2:
            raise ValueError(
                "swap_pairs needs an even number of rows per optimisation step (per_device_train_batch_size x "
                f"gradient_accumulation_steps = {batch} x {steps})"
            )
        if self.symmetry_weight > 0 and (not self.swap_pairs or batch % 2):
            raise ValueError("symmetry_weight needs swap_pairs: true and an even per_device_train_batch_size")
        if (self.swap_pairs or self.soft_label_weight) and self.packing:
            raise ValueError(
                "soft labels / swap pairs need whole rows in their batch, which dataset-level packing reorders: set "
                "packing false (padding_free true keeps padding-free batches)"
            )
        super().__post_init__()


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of each answer: the last prompt token, whose next token starts a completion. Works on padded
    batches (one answer per row) and on padding-free / packed ones (several rows flattened into one)."""
    starts = (labels[:, 1:] != -100) & (labels[:, :-1] == -100)
    return starts.nonzero(as_tuple=True)


class AnswerMetrics:
    """`preprocess_logits_for_metrics` + `compute_metrics` pair: log loss / accuracy over the A/B/C logits.

    `preprocess` keeps, for every answer of the batch, its three letter logits and the index of the true letter
    (rows, 4), so only that leaves the device, whatever the batch layout (padded or padding-free)."""

    def __init__(self, letter_ids: list[int]):
        self.letter_ids = letter_ids

    def preprocess(self, logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        rows, positions = answer_positions(labels)
        letters = torch.tensor(self.letter_ids, device=labels.device)
        target = (labels[rows, positions + 1][:, None] == letters).float().argmax(dim=1)
        return torch.cat([logits[rows, positions][:, self.letter_ids].float(), target[:, None].float()], dim=1)

    def __call__(self, eval_pred) -> dict:
        predictions = np.asarray(eval_pred.predictions).reshape(-1, 4)
        predictions = predictions[~np.isnan(predictions).any(axis=1)]  # padding of uneven shards, if any
        probs, targets = softmax(predictions[:, :3]), predictions[:, 3].astype(int)
        return {"log_loss": log_loss(probs, targets), "accuracy": accuracy(probs, targets)}


def soft_label_loss(letter_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy between target distributions (rows, 3) and softmax(letter logits) (rows, 3)."""
    return -(targets * F.log_softmax(letter_logits.float(), dim=-1)).sum(-1)


def symmetry_penalty(letter_logits: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric KL / 2 between p(row 2k) and p(row 2k+1) with its A and B exchanged back."""
    if len(letter_logits) % 2:
        raise ValueError(f"symmetry penalty needs whole swap pairs in a batch, got {len(letter_logits)} rows")
    log_p = F.log_softmax(letter_logits.float(), dim=-1)
    original, swapped = log_p[0::2], log_p[1::2][:, SWAP_BACK]
    return 0.5 * ((original.exp() - swapped.exp()) * (original - swapped)).sum(-1)


class ArenaSFTTrainer(SFTTrainer):
    """`SFTTrainer` with A/B/C metrics, soft labels and swap pairs; with none of them asked it trains as
    `SFTTrainer`."""

    _tag_names = ["trl", "sft", "lmsys-trl", "lmsys-arena"]  # the model card's tags (TRL's extension point)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.letter_ids = letter_token_ids(self.processing_class)
        soft = self.train_dataset is not None and TEACHER_PROBS in self.train_dataset.column_names
        if getattr(self.args, "soft_label_weight", 0.0) > 0 and not soft:
            raise ValueError(
                "soft_label_weight > 0 needs teacher probabilities: teacher_a/teacher_b/teacher_tie columns in the "
                "train files or --teacher_files (e.g. a predictions.parquet of scripts/eval.py)"
            )
        if soft:
            self.data_collator = SoftLabelCollator(self.data_collator)
        self.model_card_sections = ""  # Markdown appended to TRL's model card (data, validation metrics)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TEACHER_PROBS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TEACHER_PROBS]

    def _get_train_sampler(self, train_dataset=None):
        if not getattr(self.args, "swap_pairs", False):
            return super()._get_train_sampler(train_dataset)
        ids = self.train_dataset["id"]
        if len(ids) % 2 or ids[0::2] != ids[1::2]:
            raise ValueError("swap_pairs: the training rows are not (row, swapped row) pairs; build them with "
                             "lmsys_trl.teachers.pair_with_swaps (scripts/sft.py does when swap_pairs is true)")
        return PairedSampler(len(ids), self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss (answer letter + end of turn); plus the soft-label and symmetry terms when asked. Training also
        logs `answer_log_loss`: the log loss over the three letters alone, the number the task is scored on (TRL's
        `loss` averages the letter with the easy end-of-turn tokens: a logged 0.33 can be a letter loss of ~1.0)."""
        targets = inputs.pop(TEACHER_PROBS, None)
        symmetric = self.model.training and getattr(self.args, "symmetry_weight", 0.0) > 0
        causal_lm = causal_lm_of(self.accelerator.unwrap_model(model))
        hidden = []

        def keep_first(module, args, output):
            if not hidden:
                hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = causal_lm.base_model.register_forward_hook(keep_first)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        labels = inputs["labels"]
        rows, positions = answer_positions(labels)
        answers = labels[rows, positions + 1]
        letters = torch.tensor(self.letter_ids, device=answers.device)
        if not torch.isin(answers, letters).all():  # not an A/B/C task (a test's remapped vocabulary)
            if targets is not None or symmetric:
                raise RuntimeError(f"answer tokens {answers.tolist()} are not the letters A/B/C {self.letter_ids}")
            return result
        logits = letter_logits_from_hidden(causal_lm, hidden[0][rows, positions], self.letter_ids)
        mode = "train" if self.model.training else "eval"
        if mode == "train" and len(rows):  # (evaluation reports it as eval_log_loss through AnswerMetrics)
            truth = (answers[:, None] == letters).float().argmax(dim=1)
            self._metrics[mode]["answer_log_loss"].append(F.cross_entropy(logits.detach().float(), truth).item())
        if targets is None and not symmetric:
            return result
        # Each row counts like its answer tokens in the hard loss: sum over rows x tokens per row / all answer tokens.
        answer_tokens = (labels[:, 1:] != -100).sum()
        total = answer_tokens if num_items_in_batch is None else num_items_in_batch
        scale = answer_tokens / max(len(rows), 1) / torch.as_tensor(total).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = scale * (self.accelerator.num_processes // self.get_tp_size())
        if targets is not None:
            weight = getattr(self.args, "soft_label_weight", 0.0)
            soft = soft_label_loss(logits, targets[rows, positions].to(logits.device))
            loss = (1 - weight) * loss + weight * soft.sum() * scale
            self._metrics[mode]["soft_label_loss"].append(soft.mean().item())
        if symmetric:
            penalty = symmetry_penalty(logits)
            loss = loss + self.args.symmetry_weight * 2 * penalty.sum() * scale
            self._metrics[mode]["symmetry_penalty"].append(penalty.mean().item())
        return (loss, outputs) if return_outputs else loss

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, followed by this run's data and validation metrics (`model_card_sections`)."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and self.model_card_sections and os.path.isfile(path):
            with open(path, "a") as f:
                f.write("\n" + self.model_card_sections)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        """The Trainer's save; under FSDP the adapter is then rewritten from the gathered state dict
        (`save_sharded_adapter`: PEFT's own selection finds none of it there) in the 16-bit training dtype."""
        from peft import PeftModel

        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled and state_dict and self.args.should_save and isinstance(model, PeftModel):
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            save_sharded_adapter(model, state_dict, output_dir or self.args.output_dir, dtype)


def save_sharded_adapter(peft_model, state_dict: dict, output_dir: str, dtype: torch.dtype | None = None) -> None:
    """Write `adapter_model.safetensors` from the full state dict that FSDP gathered on this process, in `dtype` (FSDP
    trains the adapter upcast to fp32; the single-GPU and ZeRO runs save it in the 16-bit training dtype).

    PEFT 0.21 picks a model's adapter entries by its module names, which under FSDP's nested wrapping read
    `layers.0._fsdp_wrapped_module.self_attn...` and match none of the (clean) gathered keys: `save_pretrained` then
    writes an empty file. The LoRA entries are picked by key here and named as PEFT names them (adapter name dropped).
    """
    from safetensors.torch import save_file

    from .io import atomic_output

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
    with atomic_output(os.path.join(output_dir, "adapter_model.safetensors")) as tmp:
        save_file(weights, tmp, metadata={"format": "pt"})
