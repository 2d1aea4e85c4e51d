"""Tokenizer and model set-up shared by training and scoring: pad token, answer-letter ids, the fp32 letter head,
scoring-side loading (precision, adapters, FP8, compiled layers)."""

import os

import torch
from transformers import AutoTokenizer

from .data import LETTERS
from .formatting import TemplateError
from .kernels import attention_kwargs, compile_decoder_layers


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>")


def looks_like_a_path(name: str) -> bool:
    """Whether a model / adapter name is meant as a local folder rather than a hub id (`org/name`)."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or name.count("/") > 1 or "\\" in name


def check_local_model(name_or_path: str, what: str = "model") -> None:
    """A name that looks like a local path must be a folder: fail at once instead of ~50 s of Hub retries that end in
    "Repo id must be ..." (a hub id `org/name` is left to the Hub)."""
    if looks_like_a_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"{name_or_path}: no such {what} folder")


def load_tokenizer(name_or_path: str, revision: str = "main", trust_remote_code: bool = False):
    """Load a chat tokenizer; give it a pad token (never the end-of-turn token when an unused one exists)."""
    check_local_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise TemplateError(f"{name_or_path}: the tokenizer has no chat template; use a chat (instruct) model")
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((t for t in PAD_CANDIDATES if t in vocab), tokenizer.eos_token)
    return tokenizer


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of the answer letters A, B, C; each must be a single token."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            name = getattr(tokenizer, "name_or_path", "tokenizer")
            raise TemplateError(f"{name}: answer letter {letter!r} is {len(encoded)} tokens {encoded}; it must be one")
        ids.append(encoded[0])
    return ids


# ----------------------------------------------------------------------------------------------- the letter head


def causal_lm_of(model):
    """The transformers causal LM inside DDP / PEFT wrappers (the module whose `base_model` is the backbone)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def letter_logits_from_hidden(causal_lm, hidden: torch.Tensor, letter_ids: list[int],
                              fp32_head: bool = False) -> torch.Tensor:
    """(rows, 3) A/B/C logits from final hidden states (rows, hidden), final softcap included.

    Training calls the head module (its weight may be sharded outside forward: ZeRO-3). Scoring asks `fp32_head`: the
    head's three letter rows in fp32, exact and cheaper than the vocabulary, where the head itself rounds each logit
    to the model dtype (bf16: steps of 0.125 where |logit| is 16 to 32, up to ~3e-2 of probability)."""
    head = causal_lm.get_output_embeddings()
    if fp32_head and type(head) is torch.nn.Linear:  # an adapted or quantised head runs its own forward
        logits = hidden.float() @ head.weight[letter_ids].float().T
        if head.bias is not None:
            logits = logits + head.bias[letter_ids].float()
    else:
        logits = head(hidden)[:, letter_ids].float()
    cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


# ---- scoring-side loading


KBIT = ("8bit", "4bit")  # bitsandbytes bases: adapters stay unmerged
# from_pretrained dtype per scoring precision (fp8 loads in bf16 and is quantised by `prepare_for_scoring`)
LOAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def same_model(trained_on: str | None, base_model: str) -> bool:
    """Whether an adapter's recorded base model names `base_model`: equal ids, the same local path, or equal
    final path components (a hub id and a local copy of it, e.g. `google/gemma-2-9b-it` and `/models/gemma-2-9b-it`).
    """
    import os

    if not trained_on:
        return True  # nothing recorded: nothing to check
    a, b = trained_on.rstrip("/\\"), base_model.rstrip("/\\")
    if a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)):
        return True
    return os.path.basename(a).lower() == os.path.basename(b).lower()


def check_adapter_base(adapter: str, base_model: str, allow_mismatch: bool = False) -> None:
    """Raise a clear error when `adapter` was trained on another base model than `base_model`."""
    import logging

    from peft import PeftConfig

    check_local_model(adapter, "adapter")
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")) and not any(
            os.path.isfile(os.path.join(adapter, f)) for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"{adapter}: adapter_config.json but no adapter_model.safetensors (an adapter without "
                         "weights: was its training interrupted, or the copy incomplete?)")
    try:
        trained_on = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    except Exception as err:
        raise ValueError(
            f"{adapter}: not a LoRA adapter (no readable adapter_config.json): {type(err).__name__}: {err}"
        ) from None
    if same_model(trained_on, base_model):
        return
    message = f"adapter {adapter} was trained on base model '{trained_on}', but --base_model is '{base_model}'"
    if not allow_mismatch:
        raise ValueError(f"{message}; pass the matching --base_model, or --allow_base_mismatch true to use it anyway")
    logging.getLogger(__name__).warning("%s (allowed by --allow_base_mismatch)", message)


def auto_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 on a GPU, fp32 on the CPU; other values unchanged. bf16 is the faithful GPU precision: on real
    weights (SmolLM2-135M + a QLoRA adapter, 1,392 held-out rows, H200) it scored 1.1241 against fp32's 1.1284, while
    plain FP8 cost +0.028 (1.1559) and the reference's 4-bit +0.074 (docs/benchmarks.md, "Precision and log loss");
    FP8 stays an explicit opt-in (`--precision fp8`)."""
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") else "fp32"


def load_kwargs(precision: str, device: str) -> dict:
    """`from_pretrained` kwargs: fp32 / bf16 / fp16 (fp8: bf16), or bitsandbytes 8-bit / 4-bit (nf4, double quant).

    The 4-bit config is written here rather than taken from TRL's `get_quantization_config`: that one lives in
    `trl.trainer.utils` (importing it loads TRL's trainer package, ~5 s) and reads a training `ModelConfig`."""
    precisions = ("auto", *LOAD_DTYPES, *KBIT)
    if precision not in precisions:
        raise ValueError(f"precision must be one of {precisions}, got {precision!r}")
    precision = auto_precision(precision, device)
    if precision in LOAD_DTYPES:
        return {"dtype": LOAD_DTYPES[precision]}
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"precision {precision} needs bitsandbytes (`pip install lmsys-trl[quantization]`, CUDA only); "
            "use --precision bf16 or fp32 on this machine"
        )
    from transformers import BitsAndBytesConfig

    if precision == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return {"dtype": torch.bfloat16, "quantization_config": quantization, "device_map": {"": device}}


def process_state():
    """accelerate's state of this process: several under `accelerate launch` (gloo on CPU, NCCL on GPUs)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_device(device: str = "auto") -> str:
    """'auto': this process's GPU (cuda:<local rank>) when there is one, else the CPU."""
    if device == "auto":
        return f"cuda:{process_state().local_process_index}" if torch.cuda.is_available() else "cpu"
    return device


def prepare_for_scoring(model, precision: str, merge_adapters: bool = True, compile_layers: bool = False,
                        fp8_keep: tuple[str, ...] = (), fp8_keep_fraction: float = 0.0, calibrate=None,
                        fp8_fast_accum: bool = True):
    """The model as it is scored: LoRA adapters merged into the base (always for fp8), linear layers in FP8 for
    `precision="fp8"`, decoder layers compiled in place (`compile_decoder_layers`, not accelerate's `compile_regions`:
    that returns a copy whose layers are `OptimizedModule` wrappers, which `scoring.plain_forward` cannot switch off
    for its parity reference); returns the (possibly unwrapped) model in eval mode.

    FP8 keeps in bf16 the linear layers whose name ends with an entry of `fp8_keep`, and with `fp8_keep_fraction` > 0
    that fraction of them with the largest FP8 output error on one calibration pass (`calibrate(model)` runs a
    forward of the bf16 model, e.g. `scoring.calibration_forward`; `fp8.fp8_output_errors` measures every layer)."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and (merge_adapters or precision == "fp8"):
        if precision in KBIT:
            raise ValueError(f"LoRA adapters cannot be merged into a {precision} base; score them unmerged")
        model = model.merge_and_unload()
    if precision == "fp8":
        from .fp8 import check_fp8_device, fp8_output_errors, most_sensitive, quantize_linear_layers

        check_fp8_device(next(model.parameters()).device)
        keep = ("lm_head", *fp8_keep)
        skip = []
        if fp8_keep_fraction > 0:
            if calibrate is None:
                raise ValueError("fp8_keep_fraction needs calibration rows (calibrate)")
            skip = most_sensitive(fp8_output_errors(model, lambda: calibrate(model), keep), fp8_keep_fraction)
        quantize_linear_layers(model, keep, skip, fp8_fast_accum)
    if compile_layers:
        compile_decoder_layers(model)
    return model.eval()


def load_model(base_model: str, adapters: list[str], precision: str = "auto", device: str = "auto",
               attn_implementation: str | None = None, allow_base_mismatch: bool = False,
               trust_remote_code: bool = False, attn_softcapping: bool = True, merge_adapters: bool = False,
               compile_layers: bool = False, **fp8_options):
    """Base model (local path or hub id) at `precision`, with LoRA adapters applied together, then
    `prepare_for_scoring` (merge, FP8 with `fp8_options`, compile); eval mode. Several adapters are stacked: all of
    them are active at once (their weight deltas add up)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    for adapter in adapters:
        check_adapter_base(adapter, base_model, allow_base_mismatch)
    kwargs = load_kwargs(precision, device)
    precision = auto_precision(precision, device)
    model = AutoModelForCausalLM.from_pretrained(
        base_model, **attention_kwargs(base_model, attn_implementation, softcapping=attn_softcapping),
        trust_remote_code=trust_remote_code, **kwargs,
    )
    if "device_map" not in kwargs:
        model.to(device)
    names = [f"adapter{i}" for i in range(len(adapters))]
    for i, (name, adapter) in enumerate(zip(names, adapters)):
        if i == 0:
            model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
        else:
            model.load_adapter(adapter, adapter_name=name)
    if len(adapters) > 1:
        model.base_model.set_adapter(names)
    return prepare_for_scoring(model, precision, merge_adapters, compile_layers, **fp8_options)
