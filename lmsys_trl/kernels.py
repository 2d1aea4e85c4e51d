"""Attention kernels and compilation shared by training and scoring: the kernel a model family needs (eager for
gemma-2's softcap), transformers' flex attention with gemma-2's tile sizes, SDPA for gemma-2 without softcapping,
and per-layer `torch.compile`."""

import torch
from transformers import AutoConfig


# Families whose attention needs logit softcapping: eager is the safe default kernel.
SOFTCAP_MODEL_TYPES = ("gemma2",)


def default_attn_implementation(name_or_path: str, requested: str | None, revision: str = "main") -> str | None:
    """The requested kernel, or eager for families with attention softcapping (gemma-2)."""
    if requested:
        return requested
    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    return "eager" if config.model_type in SOFTCAP_MODEL_TYPES else None


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (under PEFT / DDP wrappers too), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """`torch.compile` each decoder layer in place with fixed shapes (fuses its norms, activations and residuals; the
    layers share one graph per layer kind). Returns the count.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers (GradientCheckpointingLayer) to compile")
    # one graph per sequence shape and layer kind (gemma-2 alternates sliding / global layers)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(backend=backend, dynamic=False)
    return len(layers)


FLEX_ATTENTION = "lmsys_flex"
# Triton tiles of the flex forward for head_dim 256 (gemma-2), proven in bf16 and fp32 on H100 / H200; the backward
# keeps PyTorch's own tiles. Measured on an H200 (gemma-2-9b training, one process, docs/benchmarks.md "Training
# fast path, round 2"): these 10,588 tokens/s, 32 x 32 tiles for forward and backward (the earlier setting) 9,810,
# PyTorch's tiles for both 10,040. Scoring (forward only) 30,042 tokens/s here, 31,004 with PyTorch's forward tiles.
LARGE_HEAD_KERNEL_OPTIONS = {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32, "fwd_num_stages": 1}


def flex_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' own `flex_attention_forward` (softcap `score_mod`, the packed-row `BlockMask` it builds from
    `position_ids`), with the Triton tile sizes that gemma-2's head_dim 256 needs on CUDA (`kernel_options`: the
    model's forward cannot pass them from a Trainer's batch)."""
    from transformers.integrations.flex_attention import flex_attention_forward as library_forward

    if query.shape[-1] > 128 and query.is_cuda and "kernel_options" not in kwargs and LARGE_HEAD_KERNEL_OPTIONS:
        kwargs["kernel_options"] = dict(LARGE_HEAD_KERNEL_OPTIONS)
    return library_forward(module, query, key, value, attention_mask, **kwargs)


def register_flex_attention() -> str:
    """Register `flex_attention_forward` and transformers' flex `BlockMask` builder under `FLEX_ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(FLEX_ATTENTION, flex_attention_forward)
    AttentionMaskInterface.register(FLEX_ATTENTION, flex_attention_mask)
    # evaluation batches (padded, not packed) bring a few more shapes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return FLEX_ATTENTION


DOT_PRODUCT_ATTENTION = "lmsys_dot_product"  # SDPA for gemma-2 without softcapping (a name without "sdpa" in it)


def attention_kwargs(name_or_path: str, requested: str | None = None, revision: str = "main",
                     softcapping: bool = True) -> dict:
    """Model-init kwargs for attention: the kernel (eager for gemma-2) and, with `softcapping` off, the config override
    `attn_logit_softcapping=None`; a model that then needs no softcap gets SDPA unless a kernel was requested.
    Training and scoring both load through it, so an adapter is scored with the attention it was trained with."""
    if requested == FLEX_ATTENTION:
        register_flex_attention()
    kwargs = {"attn_implementation": default_attn_implementation(name_or_path, requested, revision)}
    if softcapping:
        return kwargs
    if getattr(AutoConfig.from_pretrained(name_or_path, revision=revision), "attn_logit_softcapping", None) is None:
        return kwargs  # no attention softcap to switch off (llama, ...)
    kwargs["attn_logit_softcapping"] = None
    if not requested:
        kwargs["attn_implementation"] = register_dot_product_attention()
    return kwargs


def register_dot_product_attention() -> str:
    """PyTorch SDPA under a name transformers does not refuse for gemma-2 (it refuses "sdpa" for the whole family,
    as its softcap needs another kernel); the SDPA function still raises if a softcap reaches it."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DOT_PRODUCT_ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(DOT_PRODUCT_ATTENTION, sdpa_mask)
    return DOT_PRODUCT_ATTENTION
