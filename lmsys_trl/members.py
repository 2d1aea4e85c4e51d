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


def _file_stamp(path: str) -> list:
    """(name, size, mtime in ns) of a file: replaced or rewritten files change it (hashing GBs of weights would not
    be worth it)."""
    info = os.stat(path)  # follows links (the hub cache links snapshot files to blobs)
    return [os.path.basename(path), info.st_size, info.st_mtime_ns]


def model_stamp(path: str, keep=lambda name: True) -> list:
    """The files of a local model folder that the logits depend on (weights, configs, tokenizer files: all but hidden
    files and READMEs), stamped by size and mtime, so weights replaced at the same path invalidate the cache; a hub
    id stays as written."""
    if not os.path.isdir(path):
        return [path]
    names = sorted(
        f for f in os.listdir(path)
        if not f.startswith(".") and not f.lower().endswith(".md") and keep(f)
        and os.path.isfile(os.path.join(path, f))
    )
    return [_file_stamp(os.path.join(path, f)) for f in names]


def _adapter_stamp(adapter: str) -> list:
    """Size and mtime of a local adapter's files, so a retrained adapter invalidates its cache."""
    return model_stamp(adapter, keep=lambda name: name.startswith("adapter_"))


class MemberScorer:
    """Letter logits of one member on a dataset (and its swapped rows), cached in Parquet; the model loads lazily.
    `args`: the run's `evaluation.EvalArguments`."""

    def __init__(self, member: dict, args):
        self.member, self.args = member, args
        self.model = self.tokenizer = None
        self.device, self.settings = args.scoring()

    def cache_key(self, dataset, swapped: bool) -> str:
        """Digest of everything the member's logits on `dataset` depend on: the rows, the swap, the base model's and
        adapters' files (size and mtime of each), max length, precision, kernels and packing (see `SCORING_KEYS`;
        compiling does not change them) and the device type."""
        member = self.member
        return cache_key(
            {
                "rows": rows_digest(dataset),
                "swapped": swapped,
                **{k: member[k] for k in ("base_model", "adapters", "max_length")},
                "base_files": model_stamp(member["base_model"]),
                "adapter_files": [_adapter_stamp(a) for a in member["adapters"]],
                **{k: v for k, v in self.settings.items() if k != "compile_layers"},
                "device_type": self.device.split(":")[0],
            }
        )

    def logits(self, dataset, tag: str, swapped: bool) -> np.ndarray:
        from .model import process_state
        from .scoring import score_dataset

        args, member = self.args, self.member
        key = self.cache_key(dataset, swapped)
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
