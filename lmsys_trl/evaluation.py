"""`scripts/eval.py`'s arguments (`EvalArguments`, the scoring settings they resolve to) and its metrics.json."""

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8", "8bit", "4bit")
# Scoring settings (`EvalArguments` fields) and what `resolve_scoring` makes of their "auto" (None) values.
SCORING_KEYS = ("precision", "attn_implementation", "attn_softcapping", "token_budget", "max_batch_size", "pack_rows",
                "merge_adapters", "compile_layers")
PACKED_TOKEN_BUDGET, PADDED_TOKEN_BUDGET = 16384, 8192


def option(default, help: str):
    """A dataclass field for `TrlParser`: its default (a list default is copied per instance) and its help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EvalArguments:
    """Arguments of `scripts/eval.py`. List options take one entry per ensemble member (one entry: all members)."""

    data: list[str] = option([], "Arena files to score (.csv/.json/.jsonl/.parquet); unlabelled -> submission only.")
    out: str = option("eval_out", "Output directory (metrics.json, predictions.parquet, submission.csv, report.html).")
    base_model: list[str] = option([], "Base model per member: local path or hub id (one entry = all members).")
    adapters: list[str] = option(
        [], "LoRA adapter(s) per member: a dir or hub id; several stacked adapters joined with ','."
    )
    max_length: list[int] = option(
        [2048], "Inference max length per member (gemma-2-9b 1900, llama-3.1 2400, gemma-2-2b 2048)."
    )
    member_names: list[str] | None = option(None, "Member names (default: adapter dir names).")
    weights: list[float] | None = option(None, "Ensemble weights per member (normalised to sum 1; default equal).")
    fit_weights: bool = option(False, "Fit the ensemble weights on labelled rows (log loss).")
    temperature: float = option(1.0, "Softmax temperature T: softmax(logits / T) (recipe 1.03).")
    fit_temperature: bool = option(False, "Fit T on labelled rows by minimising log loss.")
    fit_data: list[str] | None = option(
        None, "Labelled files to fit T / weights on (default: the labelled rows of --data, in-sample)."
    )
    swap_tta: bool = option(False, "Also score each row with A and B swapped and average.")
    swap_weight: float = option(0.5, "Weight of the swapped pass in swap TTA.")
    post_process: bool = option(
        False, "Shift probability for empty responses (to the other side) and identical ones (to tie)."
    )
    empty_shift: float = option(0.5, "Share of an empty side's probability given to the other side.")
    identical_shift: float = option(0.5, "Share of P(A)+P(B) given to tie for identical responses.")
    precision: str = option("auto", f"Base weights: {', '.join(PRECISIONS)} (auto: bf16 on a GPU, log loss within "
                            "-0.004 / +0.006 of fp32 on two real adapters; fp32 on CPU. fp8: 1.5x bf16's speed, "
                            "opt-in, moves log loss by 0.03-0.04 against fp32 on real weights (+0.028, -0.042; H200, "
                            "docs/benchmarks.md); bf16 load, adapters merged, linear layers FP8 with per-row scales. "
                            "4bit (the reference): +0.074. k-bit: bitsandbytes, CUDA).")
    attn_implementation: str | None = option(None, "Attention kernel (default: on GPU with packed rows the compiled "
                                             "flex kernel lmsys_flex; otherwise eager for gemma-2, the library "
                                             "default for others).")
    attn_softcapping: bool = option(True, "false: gemma-2 without attention logit softcapping (for adapters trained "
                                    "with attn_softcapping false); opens SDPA.")
    device: str = option("auto", "Device: auto (cuda:0 if available), cpu, cuda:N.")
    pack_rows: bool | None = option(None, "Pack rows padding-free into flat sequences of token_budget tokens instead "
                                    "of length-sorted padded batches (default: on GPU).")
    token_budget: int | None = option(None, f"Tokens per forward: with pack_rows the fixed length of each packed "
                                      f"sequence (>= max_length; default {PACKED_TOKEN_BUDGET}), else padded tokens "
                                      f"per batch (default {PADDED_TOKEN_BUDGET}).")
    max_batch_size: int | None = option(None, "Rows per padded batch at most (default: budget only).")
    merge_adapters: bool = option(
        True, "Merge the LoRA adapters into the base weights before scoring (not for 4bit/8bit bases)."
    )
    compile_layers: bool | None = option(
        None, "torch.compile the decoder layers (default: on GPU with packed rows, one fixed shape)."
    )
    max_rows: int | None = option(None, "Score only the first N rows of --data (quick runs).")
    tokenize_workers: int | None = option(None, "Worker processes that format and tokenise the rows (and, with "
                                          "swap_tta, their swaps in the same pool while the first pass is scored); "
                                          "default: one per CPU, at most 16. 1: in this process. Under 400 rows "
                                          "they are always tokenised in this process.")
    overwrite: bool = option(False, "Replace results already in --out.")
    rescore: bool = option(False, "Ignore cached member logits in <out>/members and re-run the models.")
    resume: bool = option(False, "Continue an interrupted run in --out: reuse the member logits it cached (as every "
                          "run does unless --rescore) and replace any results it left.")
    allow_base_mismatch: bool = option(False, "Use an adapter even if its recorded base model differs from "
                                       "--base_model.")
    trust_remote_code: bool = option(False, "Allow custom model code from the hub.")
    report: bool = option(True, "Write report.html and its PNG plots (labelled data only).")

    def __post_init__(self):
        if not self.data:
            raise ValueError("data is required: arena files to score, e.g. ../shared/data/pandalm_test.csv")
        if not self.base_model:
            raise ValueError("base_model is required: a local model path or hub id (one per member, or one for all)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self._check_numbers()
        if self.pack_rows and self.max_batch_size is not None:
            raise ValueError("max_batch_size limits padded batches; pack_rows fills sequences of token_budget tokens")
        if self.pack_rows and self.token_budget is not None and self.token_budget < max(self.max_length):
            raise ValueError(
                f"pack_rows: token_budget ({self.token_budget}) must be >= max_length ({max(self.max_length)})"
            )
        if self.resume and self.rescore:
            raise ValueError("--resume reuses the cached member logits and --rescore discards them; give one")
        self.members()  # validates the per-member list lengths

    def _check_numbers(self) -> None:
        """Every numeric option finite and in range (NaN fails every comparison, so each check is written as what
        must hold)."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        for name in ("swap_weight", "empty_shift", "identical_shift"):
            value = getattr(self, name)
            if not 0 <= value <= 1:  # False for NaN
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.weights is not None and not (
            all(math.isfinite(w) and w >= 0 for w in self.weights) and 0 < sum(self.weights) < math.inf
        ):
            raise ValueError(f"weights must be finite and >= 0 with a positive sum, got {self.weights}")
        for name in ("max_rows", "token_budget", "max_batch_size", "tokenize_workers"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not all(length >= 1 for length in self.max_length):
            raise ValueError(f"max_length must be >= 1 for every member, got {self.max_length}")

    def scoring(self) -> tuple[str, dict]:
        """(device, scoring settings): this process's device and `resolve_scoring` of the `SCORING_KEYS`."""
        from .model import resolve_device

        device = resolve_device(self.device)
        return device, resolve_scoring({key: getattr(self, key) for key in SCORING_KEYS}, device)

    def members(self) -> list[dict]:
        """One dict per ensemble member: name, base_model, adapters, max_length, weight."""
        count = max(len(self.base_model), len(self.adapters), len(self.max_length), len(self.weights or []), 1)
        per_member = {"base_model": self.base_model, "adapters": self.adapters or [""], "max_length": self.max_length}
        if self.weights is not None:
            per_member["weights"] = self.weights
        if self.member_names is not None:
            per_member["member_names"] = self.member_names
        for name, values in per_member.items():
            if len(values) not in (1, count):
                raise ValueError(f"{name} has {len(values)} entries for {count} members; give 1 or {count}")
        expand = {name: values * count if len(values) == 1 else values for name, values in per_member.items()}
        weights = np.asarray(expand.get("weights", [1.0] * count), dtype=np.float64)
        members = []
        for i in range(count):
            adapters = [a for a in expand["adapters"][i].split(",") if a]
            default = os.path.basename(os.path.normpath(adapters[0] if adapters else expand["base_model"][i]))
            members.append(
                {
                    "name": expand["member_names"][i] if "member_names" in expand else default,
                    "base_model": expand["base_model"][i],
                    "adapters": adapters,
                    "max_length": int(expand["max_length"][i]),
                    "weight": float(weights[i] / weights.sum()),
                }
            )
        names = [m["name"] for m in members]
        for name in names:  # a member's name names its cache files <out>/members/<name>-<tag>.parquet
            if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
                raise ValueError(
                    f"member name {name!r} is not a plain name (empty, '.', '..' or with a path separator): give "
                    "--member_names plain names, one per member"
                )
        if len(set(names)) != len(names):
            for i, m in enumerate(members):
                m["name"] = f"{i}-{m['name']}"
        return members


def resolve_scoring(settings: dict, device: str) -> dict:
    """`SCORING_KEYS` settings with their automatic values settled for `device`: on a GPU rows are packed into
    sequences of `PACKED_TOKEN_BUDGET` tokens scored with the compiled flex kernel and compiled decoder layers at
    `auto_precision`'s precision (bf16 on a GPU); on the CPU, fp32 padded batches of `PADDED_TOKEN_BUDGET` tokens.
    Explicit values are kept, except that adapters are never merged into a k-bit base."""
    from .kernels import FLEX_ATTENTION
    from .model import KBIT, auto_precision

    resolved = {key: settings.get(key) for key in SCORING_KEYS}
    cuda = device.startswith("cuda")
    resolved["precision"] = auto_precision(resolved["precision"] or "auto", device)
    if resolved["pack_rows"] is None:
        resolved["pack_rows"] = cuda and resolved["max_batch_size"] is None
    if resolved["token_budget"] is None:
        resolved["token_budget"] = PACKED_TOKEN_BUDGET if resolved["pack_rows"] else PADDED_TOKEN_BUDGET
    if resolved["attn_implementation"] is None and cuda and resolved["pack_rows"]:
        resolved["attn_implementation"] = FLEX_ATTENTION
    if resolved["compile_layers"] is None:
        resolved["compile_layers"] = cuda and resolved["pack_rows"]  # one fixed shape: one compilation
    if resolved["attn_softcapping"] is None:
        resolved["attn_softcapping"] = True
    resolved["merge_adapters"] = resolved["merge_adapters"] is not False and resolved["precision"] not in KBIT
    return resolved


def load_data(args: EvalArguments) -> dict:
    """{"data": the rows to score (the first `max_rows`), "fit": the labelled `fit_data` rows when they are used}."""
    from .data import load_arena

    data = load_arena(args.data)
    datasets = {"data": data.select(range(min(args.max_rows, len(data)))) if args.max_rows else data}
    if args.fit_data and (args.fit_temperature or args.fit_weights):
        datasets["fit"] = load_arena(args.fit_data)
        if min(datasets["fit"]["label"]) < 0:
            raise ValueError(f"{', '.join(args.fit_data)}: fit_data must be labelled (winner columns)")
    return datasets


def labelled_metrics(args, members, data, member_logits, member_probs, probs, before, rules, calibration) -> dict:
    """metrics.json content for the labelled rows: the `evaluate` arena metric overall, per class / turn / member."""
    import evaluate

    from .arena_metric import PATH as METRIC_PATH
    from .metrics import log_loss
    from .scoring import letter_probs

    metric = evaluate.load(METRIC_PATH)
    labels = np.asarray(data["label"])
    labelled = labels >= 0
    y = labels[labelled]
    turns = [len(p) for p in data["prompt"]]
    metrics = metric.compute(
        predictions=probs[labelled].tolist(), references=y.tolist(), turns=np.asarray(turns)[labelled].tolist()
    )
    metrics["members"] = {}
    temperature, fitted_on = calibration["temperature"], calibration["fitted_on"]
    for member, weight in zip(members, calibration["weights"]):
        name = member["name"]
        member_metrics = metric.compute(predictions=member_probs[name][labelled].tolist(), references=y.tolist())
        del member_metrics["per_class"]
        no_tta = letter_probs(member_logits[name][0], temperature)
        metrics["members"][name] = {
            "weight": float(weight),
            **member_metrics,
            "log_loss_no_tta": log_loss(no_tta[labelled], y),
            **{k: member[k] for k in ("base_model", "adapters", "max_length")},
        }
    source = f"fitted on {fitted_on}" if args.fit_temperature else "given"
    metrics["temperature"] = {"value": temperature, "source": source}
    metrics["weights_source"] = f"fitted on {fitted_on}" if args.fit_weights and len(members) > 1 else "given"
    metrics["swap_tta"] = {"enabled": args.swap_tta, "swap_weight": args.swap_weight}
    if args.post_process:
        changed = labelled & np.array([bool(r) for r in rules])
        metrics["post_processing"] = {
            "empty_shift": args.empty_shift,
            "identical_shift": args.identical_shift,
            "rows_changed": {r: rules.count(r) for r in ("empty_a", "empty_b", "identical")},
            "log_loss_before": log_loss(before[labelled], y),
            "log_loss_after": metrics["log_loss"],
            "changed_rows_log_loss_before": log_loss(before[changed], labels[changed]) if changed.any() else None,
            "changed_rows_log_loss_after": log_loss(probs[changed], labels[changed]) if changed.any() else None,
        }
    metrics["data"] = list(args.data)
    metrics["unlabelled_rows"] = int((~labelled).sum())
    metrics["arguments"] = asdict(args)
    metrics["scoring"] = args.scoring()[1]  # what the automatic values became (precision, packing, ...)
    return metrics
