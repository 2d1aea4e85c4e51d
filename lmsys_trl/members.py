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
        self._encodings = {}  # (tag, swapped) -> the scoring.RowEncoding tokenising that pass in the background

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

    def _path(self, tag: str, swapped: bool) -> str:
        name = f"{self.member['name']}-{tag}{'-swapped' if swapped else ''}.parquet"
        return os.path.join(self.args.out, "members", name)

    def cached(self, dataset, tag: str, swapped: bool) -> np.ndarray | None:
        """The pass's logits from the member cache (None when absent, stale or `--rescore`)."""
        if self.args.rescore:
            return None
        path = self._path(tag, swapped)
        cached = load_logits(path, self.cache_key(dataset, swapped), dataset["id"])
        if cached is not None:
            logger.info("Member %s: cached logits %s", self.member["name"], path)
        return cached

    def logits(self, dataset, tag: str, swapped: bool, also=()) -> np.ndarray:
        """The member's letter logits of one pass over `dataset` (cached, or scored and saved). `also`: passes
        (`swapped` values) that will be asked for next: their rows are tokenised in the same worker pool, in the
        background while this pass is scored (`scoring.RowEncoding`)."""
        from .model import process_state
        from .scoring import RowEncoding, score_dataset

        args, member = self.args, self.member
        cached = self.cached(dataset, tag, swapped)
        if cached is not None:
            return cached
        state = process_state()
        shard = list(range(len(dataset)))
        if state.num_processes > 1:  # data-parallel under `accelerate launch`: a contiguous shard per process
            with state.split_between_processes(shard) as mine:
                shard = list(mine)
        rows = dataset.select(shard)
        encoding = self._encodings.pop((tag, swapped), None)
        if encoding is None:  # tokenising starts before the model loads (a pool forks from the lighter process)
            passes = [swapped, *(p for p in also if p != swapped)]
            encoding = RowEncoding(rows, self._load_tokenizer(), member["max_length"], passes, args.tokenize_workers)
            self._encodings.update({(tag, p): encoding for p in passes[1:]})
        try:
            self._load()
            logits = score_dataset(
                self.model, self.tokenizer, rows, member["max_length"], swapped,
                self.settings["token_budget"], self.settings["max_batch_size"], self.settings["pack_rows"],
                rows=encoding.rows(swapped),
            )
        except BaseException:
            encoding.close()  # queued chunks cancelled: a failed load does not wait for the rows at exit
            raise
        if state.num_processes > 1:
            logits = gather_shards(len(dataset), shard, logits)
        if state.is_main_process:
            save_logits(self._path(tag, swapped), self.cache_key(dataset, swapped), dataset["id"], logits)
        return logits

    def _load_tokenizer(self):
        if self.tokenizer is None:
            from .scoring import load_scoring_tokenizer

            self.tokenizer = load_scoring_tokenizer(self.member["base_model"], self.args.trust_remote_code)
        return self.tokenizer

    def _load(self):
        if self.model is not None:
            return
        from .model import load_model

        args, member = self.args, self.member
        self._load_tokenizer()
        settings = self.settings
        self.model = load_model(
            member["base_model"], member["adapters"], settings["precision"], self.device,
            settings["attn_implementation"], args.allow_base_mismatch, args.trust_remote_code,
            settings["attn_softcapping"], settings["merge_adapters"], settings["compile_layers"],
        )

    def release(self):
        for encoding in self._encodings.values():
            encoding.close()
        self._encodings.clear()
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
    passes = [True, False] if args.swap_tta else [False]
    for member in members:
        scorer = MemberScorer(member, args)
        try:
            for tag, dataset in datasets.items():
                logits = {p: scorer.cached(dataset, tag, p) for p in passes}
                todo = [p for p in passes if logits[p] is None]  # tokenised together, in one pool
                for p in todo:
                    logits[p] = scorer.logits(dataset, tag, p, also=todo)
                out[tag][member["name"]] = (logits[False], logits[True] if args.swap_tta else None)
        finally:
            scorer.release()
    return out
