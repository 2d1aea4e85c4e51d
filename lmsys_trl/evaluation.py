"""`scripts/eval.py`: score members (cached), temperature / weights, post-processing, metrics, submission, report."""

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .data import WINNER_COLUMNS, load_arena
from .ensemble import (
    atomic_output,
    cache_key,
    combine,
    fit_temperature,
    fit_weights,
    load_logits,
    post_process,
    save_logits,
)
from .metrics import log_loss
from .score import (
    PACKED_TOKEN_BUDGET,
    PADDED_TOKEN_BUDGET,
    PRECISIONS,
    SCORING_KEYS,
    letter_probs,
    process_state,
    resolve_device,
    resolve_scoring,
)


logger = logging.getLogger(__name__)
RESULT_FILES = ("metrics.json", "predictions.parquet", "submission.csv", "report.html")


@dataclass
class EvalArguments:
    """Arguments of `scripts/eval.py`. List options take one entry per ensemble member (one entry: all members)."""

    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Arena files to score (.csv/.json/.jsonl/.parquet); unlabelled -> submission only."},
    )
    out: str = field(
        default="eval_out",
        metadata={"help": "Output directory (metrics.json, predictions.parquet, submission.csv, report.html)."},
    )
    base_model: list[str] = field(
        default_factory=list,
        metadata={"help": "Base model per member: local path or hub id (one entry = all members)."},
    )
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "LoRA adapter(s) per member: a dir or hub id; several stacked adapters joined with ','."},
    )
    max_length: list[int] = field(
        default_factory=lambda: [2048],
        metadata={"help": "Inference max length per member (gemma-2-9b 1900, llama-3.1 2400, gemma-2-2b 2048)."},
    )
    member_names: list[str] | None = field(
        default=None,
        metadata={"help": "Member names (default: adapter dir names)."},
    )
    weights: list[float] | None = field(
        default=None, metadata={"help": "Ensemble weights per member (normalised to sum 1; default equal)."}
    )
    fit_weights: bool = field(
        default=False,
        metadata={"help": "Fit the ensemble weights on labelled rows (log loss)."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature T: softmax(logits / T) (recipe 1.03)."},
    )
    fit_temperature: bool = field(default=False, metadata={"help": "Fit T on labelled rows by minimising log loss."})
    fit_data: list[str] | None = field(
        default=None,
        metadata={"help": "Labelled files to fit T / weights on (default: the labelled rows of --data, in-sample)."},
    )
    swap_tta: bool = field(default=False, metadata={"help": "Also score each row with A and B swapped and average."})
    swap_weight: float = field(default=0.5, metadata={"help": "Weight of the swapped pass in swap TTA."})
    post_process: bool = field(
        default=False,
        metadata={"help": "Shift probability for empty responses (to the other side) and identical ones (to tie)."},
    )
    empty_shift: float = field(
        default=0.5,
        metadata={"help": "Share of an empty side's probability given to the other side."},
    )
    identical_shift: float = field(
        default=0.5,
        metadata={"help": "Share of P(A)+P(B) given to tie for identical responses."},
    )
    precision: str = field(
        default="auto",
        metadata={"help": f"Base weights: {', '.join(PRECISIONS)} (auto: fp8 on GPUs with FP8 tensor cores such "
                          "as the H100, else bf16; fp32 on CPU. fp8: bf16 load, adapters merged, linear layers FP8 "
                          "with per-row scales. k-bit: bitsandbytes, CUDA)."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel (default: on GPU with packed rows the compiled flex kernel lmsys_flex; "
                          "otherwise eager for gemma-2, the library default for others)."},
    )
    attn_softcapping: bool = field(
        default=True,
        metadata={"help": "false: gemma-2 without attention logit softcapping (for adapters trained with "
                          "attn_softcapping false); opens SDPA."},
    )
    device: str = field(default="auto", metadata={"help": "Device: auto (cuda:0 if available), cpu, cuda:N."})
    pack_rows: bool | None = field(
        default=None,
        metadata={"help": "Pack rows padding-free into flat sequences of token_budget tokens instead of "
                          "length-sorted padded batches (default: on GPU)."},
    )
    token_budget: int | None = field(
        default=None,
        metadata={"help": f"Tokens per forward: with pack_rows the fixed length of each packed sequence "
                          f"(>= max_length; default {PACKED_TOKEN_BUDGET}), else padded tokens per batch "
                          f"(default {PADDED_TOKEN_BUDGET})."},
    )
    max_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per padded batch at most (default: budget only)."},
    )
    merge_adapters: bool = field(
        default=True,
        metadata={"help": "Merge the LoRA adapters into the base weights before scoring (not for 4bit/8bit bases)."},
    )
    compile_layers: bool | None = field(
        default=None,
        metadata={"help": "torch.compile the decoder layers (default: on GPU with packed rows, one fixed shape)."},
    )
    max_rows: int | None = field(
        default=None,
        metadata={"help": "Score only the first N rows of --data (quick runs)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace results already in --out."})
    rescore: bool = field(
        default=False,
        metadata={"help": "Ignore cached member logits in <out>/members and re-run the models."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue an interrupted run in --out: reuse the member logits it cached (as every run "
                          "does unless --rescore) and replace any results it left."},
    )
    allow_base_mismatch: bool = field(
        default=False, metadata={"help": "Use an adapter even if its recorded base model differs from --base_model."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    report: bool = field(default=True, metadata={"help": "Write report.html and its PNG plots (labelled data only)."})

    def __post_init__(self):
        if not self.data:
            raise ValueError("data is required: arena files to score, e.g. ../shared/data/pandalm_test.csv")
        if not self.base_model:
            raise ValueError("base_model is required: a local model path or hub id (one per member, or one for all)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.swap_weight <= 1:
            raise ValueError(f"swap_weight must be in [0, 1], got {self.swap_weight}")
        if self.weights is not None and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {self.weights}")
        if self.pack_rows and self.max_batch_size is not None:
            raise ValueError("max_batch_size limits padded batches; pack_rows fills sequences of token_budget tokens")
        if self.pack_rows and self.token_budget is not None and self.token_budget < max(self.max_length):
            raise ValueError(
                f"pack_rows: token_budget ({self.token_budget}) must be >= max_length ({max(self.max_length)})"
            )
        if self.resume and self.rescore:
            raise ValueError("--resume reuses the cached member logits and --rescore discards them; give one")
        self.members()  # validates the per-member list lengths

    def scoring(self) -> tuple[str, dict]:
        """(device, scoring settings): this process's device and `score.resolve_scoring` of the `SCORING_KEYS`."""
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
        if len(set(names)) != len(names):
            for i, m in enumerate(members):
                m["name"] = f"{i}-{m['name']}"
        return members


def check_output_dir(out: str, overwrite: bool) -> None:
    """Refuse an output dir that already holds results (unless `overwrite`) or cannot be written."""
    existing = [f for f in RESULT_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds results ({', '.join(existing)}); pass --overwrite true to replace them or choose "
            "another --out"
        )
    try:
        os.makedirs(os.path.join(out, "members"), exist_ok=True)
    except OSError as err:
        raise PermissionError(f"{out}: cannot create the output dir ({err.strerror}); use another --out") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: the output directory is not writable; choose another --out")


def rows_digest(dataset) -> str:
    """Digest of the rows' ids and texts (what the cached logits depend on)."""
    return cache_key({c: dataset[c] for c in ("id", "prompt", "response_a", "response_b")})


def _adapter_stamp(adapter: str) -> list:
    """Size and mtime of a local adapter's files, so a retrained adapter invalidates its cache."""
    if not os.path.isdir(adapter):
        return [adapter]
    return sorted(
        (f, os.path.getsize(os.path.join(adapter, f)), os.path.getmtime(os.path.join(adapter, f)))
        for f in os.listdir(adapter)
        if f.startswith("adapter_")
    )


class MemberScorer:
    """Letter logits of one member on a dataset (and its swapped rows), cached in Parquet; the model loads lazily."""

    def __init__(self, member: dict, args: EvalArguments):
        self.member, self.args = member, args
        self.model = self.tokenizer = None
        self.device, self.settings = args.scoring()

    def logits(self, dataset, tag: str, swapped: bool) -> np.ndarray:
        from .score import score_dataset

        args, member = self.args, self.member
        key = cache_key(
            {
                "rows": rows_digest(dataset),
                "swapped": swapped,
                **{k: member[k] for k in ("base_model", "adapters", "max_length")},
                "adapter_files": [_adapter_stamp(a) for a in member["adapters"]],
                **{k: v for k, v in self.settings.items() if k != "compile_layers"},  # what the logits depend on
            }
        )
        path = os.path.join(args.out, "members", f"{member['name']}-{tag}{'-swapped' if swapped else ''}.parquet")
        cached = None if args.rescore else load_logits(path, key, dataset["id"])
        if cached is not None:
            logger.info("Member %s: cached logits %s", member["name"], path)
            return cached
        state = process_state()
        shard = list(range(len(dataset)))
        if state.num_processes > 1:  # data-parallel under `accelerate launch`: a contiguous shard per process
            with state.split_between_processes(shard) as mine:
                shard = list(mine)
        self._load()
        logits = score_dataset(
            self.model, self.tokenizer, dataset.select(shard), member["max_length"], swapped,
            self.settings["token_budget"], self.settings["max_batch_size"], self.settings["pack_rows"],
        )
        if state.num_processes > 1:
            logits = gather_shards(len(dataset), shard, logits)
        if state.is_main_process:
            save_logits(path, key, dataset["id"], logits)
        return logits

    def _load(self):
        if self.model is not None:
            return
        from .score import load_model, load_scoring_tokenizer

        args, member = self.args, self.member
        self.tokenizer = load_scoring_tokenizer(member["base_model"], args.trust_remote_code)
        settings = self.settings
        self.model = load_model(
            member["base_model"], member["adapters"], settings["precision"], self.device,
            settings["attn_implementation"], args.allow_base_mismatch, args.trust_remote_code,
            settings["attn_softcapping"], settings["merge_adapters"], settings["compile_layers"],
        )

    def release(self):
        if self.model is not None:
            from .model import release_memory

            self.model = self.tokenizer = None
            release_memory()


def gather_shards(total: int, shard: list[int], logits: np.ndarray) -> np.ndarray:
    """Every process's (row indices, logits) gathered into one (total, 3) array in input order."""
    from accelerate.utils import gather_object

    out = np.full((total, 3), np.nan)
    for indices, part in gather_object([(shard, logits)]):
        out[indices] = part
    if np.isnan(out).any():
        raise RuntimeError("sharded scoring lost rows: some process returned no logits for its shard")
    return out


def score_members(args: EvalArguments, members: list[dict], datasets: dict) -> dict:
    """{tag: {member name: (logits, swapped logits or None)}} for every dataset tag; one model in memory at a time."""
    out = {tag: {} for tag in datasets}
    for member in members:
        scorer = MemberScorer(member, args)
        for tag, dataset in datasets.items():
            swapped = scorer.logits(dataset, tag, swapped=True) if args.swap_tta else None
            out[tag][member["name"]] = (scorer.logits(dataset, tag, swapped=False), swapped)
        scorer.release()
    return out


def ensemble_probs(member_logits: dict, weights, temperature: float, swap_weight: float, tta: bool = True):
    """(per-member probabilities, weighted ensemble) at `temperature`."""
    probs = {
        name: letter_probs(logits, temperature, swapped if tta else None, swap_weight)
        for name, (logits, swapped) in member_logits.items()
    }
    return probs, combine(list(probs.values()), weights)


def fit_calibration(args: EvalArguments, member_logits: dict, labels, weights) -> tuple[float, np.ndarray]:
    """Temperature and weights fitted on labelled rows as asked (alternating when both are fitted)."""
    temperature = args.temperature
    for _ in range(3 if args.fit_temperature and args.fit_weights else 1):
        if args.fit_temperature:
            temperature = fit_temperature(
                lambda t: ensemble_probs(member_logits, weights, t, args.swap_weight, args.swap_tta)[1], labels
            )
        if args.fit_weights and len(member_logits) > 1:
            probs, _ = ensemble_probs(member_logits, weights, temperature, args.swap_weight, args.swap_tta)
            weights = fit_weights(list(probs.values()), labels)
    return temperature, weights


def write_submission(path: str, ids, probs) -> None:
    """Kaggle submission: id, winner_model_a, winner_model_b, winner_tie (rows in input order, each summing to 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"id": list(ids), **{c: probs[:, i] for i, c in enumerate(WINNER_COLUMNS)}})
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_json(path: str, payload: dict) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)


def run_eval(args: EvalArguments) -> dict:
    """Score, calibrate, combine, post-process; write the outputs into `args.out`. Returns the metrics (or {})."""
    from .report import write_report

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir(args.out, args.overwrite or args.resume)
    members = args.members()
    data = load_arena(args.data)
    if args.max_rows:
        data = data.select(range(min(args.max_rows, len(data))))
    datasets = {"data": data}
    if args.fit_data and (args.fit_temperature or args.fit_weights):
        datasets["fit"] = load_arena(args.fit_data)
        if min(datasets["fit"]["label"]) < 0:
            raise ValueError(f"{', '.join(args.fit_data)}: fit_data must be labelled (winner columns)")
    logits = score_members(args, members, datasets)
    if not process_state().is_main_process:  # other processes only scored their shards
        return {}

    labels = np.asarray(data["label"])
    labelled = labels >= 0
    weights = np.array([m["weight"] for m in members])
    temperature, fitted_on = args.temperature, "given"
    if args.fit_temperature or args.fit_weights:
        fit_tag = "fit" if "fit" in datasets else "data"
        fit_labels = np.asarray(datasets[fit_tag]["label"])
        keep = fit_labels >= 0
        if not keep.any():
            raise ValueError("fitting temperature / weights needs labelled rows: give --fit_data or labelled --data")
        subset = {n: (lg[keep], None if sw is None else sw[keep]) for n, (lg, sw) in logits[fit_tag].items()}
        temperature, weights = fit_calibration(args, subset, fit_labels[keep], weights)
        fitted_on = "fit_data" if fit_tag == "fit" else "data (in-sample)"

    member_probs, probs = ensemble_probs(logits["data"], weights, temperature, args.swap_weight, args.swap_tta)
    rules, before = [""] * len(data), probs
    if args.post_process:
        shifts = (args.empty_shift, args.identical_shift)
        probs, rules = post_process(probs, data["response_a"], data["response_b"], *shifts)

    metrics = {}
    if labelled.any():
        calibration = {"temperature": temperature, "weights": weights, "fitted_on": fitted_on}
        metrics = labelled_metrics(
            args, members, data, logits["data"], member_probs, probs, before, rules, calibration
        )

    # ---- outputs: everything computed above, each file written atomically
    predictions = pd.DataFrame({"id": data["id"], "label": labels})
    for name, p in member_probs.items():
        for i, letter in enumerate("abc"):
            predictions[f"{name}_{letter}"] = p[:, i]
    for i, column in enumerate(WINNER_COLUMNS):
        predictions[column] = probs[:, i]
    predictions["post_process_rule"] = rules
    with atomic_output(os.path.join(args.out, "predictions.parquet")) as tmp:
        predictions.to_parquet(tmp, index=False)
    write_submission(os.path.join(args.out, "submission.csv"), data["id"], probs)
    print(f"Wrote {os.path.join(args.out, 'submission.csv')} ({len(data)} rows)")
    if not metrics:  # unlabelled: submission only; drop results of an earlier run that --overwrite replaces
        for stale in ("metrics.json", "report.html"):
            if os.path.exists(os.path.join(args.out, stale)):
                os.remove(os.path.join(args.out, stale))
        return metrics
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    if args.report:
        lengths = [sum(map(len, p + a + b)) for p, a, b in zip(data["prompt"], data["response_a"], data["response_b"])]
        write_report(args.out, metrics, probs[labelled], labels[labelled], np.asarray(lengths)[labelled])
    print(json.dumps({k: metrics[k] for k in ("rows", "log_loss", "accuracy", "ece")}, indent=2))
    return metrics


def labelled_metrics(args, members, data, member_logits, member_probs, probs, before, rules, calibration) -> dict:
    """metrics.json content for the labelled rows: the `evaluate` arena metric overall, per class / turn / member."""
    import evaluate

    from .arena_metric import PATH as METRIC_PATH

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
