"""Script arguments (dataclasses parsed by TRL's `TrlParser`), the positional-YAML convenience, one-line errors."""

import os
import sys
from dataclasses import dataclass, field

from trl import ScriptArguments, TrlParser


@dataclass
class ArenaScriptArguments(ScriptArguments):
    """Data arguments of `scripts/sft.py`: which arena files to train on and how to split/augment them."""

    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Arena files (.csv/.json/.jsonl/.parquet; Kaggle or arena-conversations schema), concatenated."
        },
    )
    val_files: list[str] | None = field(
        default=None, metadata={"help": "Explicit validation files; when unset, a grouped split of the train files."}
    )
    val_fraction: float = field(
        default=0.2, metadata={"help": "Validation share of the grouped split (0.2 = 5 folds)."}
    )
    fold: int = field(default=0, metadata={"help": "Which fold of round(1 / val_fraction) grouped folds validates."})
    swap_augment: float = field(
        default=0.0, metadata={"help": "A/B-swapped copies of training rows to add: a count, or a fraction if < 1."}
    )
    keep_rows_per_step: bool = field(
        default=True,
        metadata={"help": "Divide gradient_accumulation_steps by the number of processes, so that a multi-GPU run "
                          "takes the recipe's rows per optimiser step (the recipe is written for one GPU)."},
    )
    row_max_length: int | None = field(
        default=None,
        metadata={"help": "Token budget of one formatted row (comparison text, chat template and answer; the "
                          "reference's 2200). Default: max_length, which is the packed sequence length when packing."},
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_val_rows: int | None = field(default=None, metadata={"help": "Keep only the first N validation rows."})
    num_proc: int | None = field(default=None, metadata={"help": "Worker processes for the formatting `map`."})
    formatting_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache the formatted rows here (keyed by data, tokenizer and max_length)."}
    )
    teacher_files: list[str] | None = field(
        default=None,
        metadata={"help": "Soft labels: teacher probabilities per id (scripts/eval.py's predictions.parquet, or a "
                          "file with id, teacher_a, teacher_b, teacher_tie), joined onto the train files' rows."},
    )
    attn_softcapping: bool = field(
        default=True,
        metadata={"help": "false: load gemma-2 with attn_logit_softcapping None (no attention logit softcap; opens "
                          "SDPA). Score such an adapter with softcapping off too."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already holds an earlier run's adapter, metrics or "
                          "checkpoints (refused otherwise, unless resuming with --resume_from_checkpoint)."},
    )

    def __post_init__(self):
        if self.dataset_name:
            raise ValueError(f"dataset_name ({self.dataset_name}) is not read by scripts/sft.py: give --train_files")
        if not self.train_files:
            raise ValueError("train_files is required: one or more arena data files (e.g. data/train.csv)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.swap_augment < 0:
            raise ValueError(f"swap_augment must be >= 0 (a count or a fraction), got {self.swap_augment}")


def parse(dataclass_types, argv: list[str] | None = None):
    """Parse dataclasses with `TrlParser`; a YAML file as the first argument means `--config <file>`.

    Precedence: dataclass defaults < YAML < command line. Flags are never abbreviated (`--max_row` is not
    `--max_rows`); a missing recipe file or an unknown key in it is a checked error naming the file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv.insert(0, "--config")
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if config is not None and not os.path.isfile(config):
        raise FileNotFoundError(f"{config}: no such recipe file")
    try:
        return TrlParser(dataclass_types, allow_abbrev=False).parse_args_and_config(args=argv)
    except ValueError as err:  # an unknown key in the recipe, or an unknown / abbreviated flag
        if "Unknown arguments from config file" in str(err):
            raise ValueError(f"{config}: {err}") from None
        if "not used by the HfArgumentParser" in str(err):
            raise ValueError(f"unknown option(s) {str(err).split(': ', 1)[-1]}; see --help") from None
        raise


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
USER_ERRORS = (ValueError, OSError, RuntimeError)  # DataError / TemplateError are ValueErrors


def raised_by_lmsys_trl(err: BaseException) -> bool:
    """Whether `err` was raised by this package's own code (a checked error), not deep inside a library."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


def run_main(main, argv: list[str] | None = None) -> None:
    """Run a script's `main`; a checked error of this package (bad data, chat template, answer letters, options,
    output dir, adapter) prints as one line `error: <message>` and exits with status 2. Other exceptions, and every
    exception when LMSYS_TRL_TRACEBACK=1, keep their traceback.
    """
    try:
        main(argv)
    except USER_ERRORS as err:
        if os.environ.get("LMSYS_TRL_TRACEBACK") == "1" or not raised_by_lmsys_trl(err):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
