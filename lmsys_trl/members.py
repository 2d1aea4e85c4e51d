"""Ensemble members scored: letter logits of each member on each dataset, cached in Parquet per member and pass,
sharded across processes under `accelerate launch` and gathered in input order; one model in memory at a time."""

import logging
import os

import numpy as np

from .io import cache_key, load_logits, save_logits


logger = logging.getLogger(__name__)


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
    """Letter logits of one member on a dataset (and its swapped rows), cached in Parquet; the model loads lazily.
    `args`: the run's `evaluation.EvalArguments`."""

    def __init__(self, member: dict, args):
        self.member, self.args = member, args
        self.model = self.tokenizer = None
        self.device, self.settings = args.scoring()

    def logits(self, dataset, tag: str, swapped: bool) -> np.ndarray:
        from .model import process_state
        from .scoring import score_dataset

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
        from .model import load_model
        from .scoring import load_scoring_tokenizer

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
            from accelerate.utils.memory import clear_device_cache

            self.model = self.tokenizer = None
            clear_device_cache(garbage_collection=True)


def gather_shards(total: int, shard: list[int], logits: np.ndarray) -> np.ndarray:
    """Every process's (row indices, logits) gathered into one (total, 3) array in input order."""
    from accelerate.utils import gather_object

    out = np.full((total, 3), np.nan)
    for indices, part in gather_object([(shard, logits)]):
        out[indices] = part
    if np.isnan(out).any():
        raise RuntimeError("sharded scoring lost rows: some process returned no logits for its shard")
    return out


def score_members(args, members: list[dict], datasets: dict) -> dict:
    """{tag: {member name: (logits, swapped logits or None)}} for every dataset tag; one model in memory at a time."""
    out = {tag: {} for tag in datasets}
    for member in members:
        scorer = MemberScorer(member, args)
        for tag, dataset in datasets.items():
            swapped = scorer.logits(dataset, tag, swapped=True) if args.swap_tta else None
            out[tag][member["name"]] = (scorer.logits(dataset, tag, swapped=False), swapped)
        scorer.release()
    return out
