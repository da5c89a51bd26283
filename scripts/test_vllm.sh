#!/usr/bin/env bash
# The vLLM integration's tests (tests/test_vllm.py) in vLLM's environment: run
# `scripts/install.sh --vllm` first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# One OpenMP thread per process: on a few shared cores vLLM's CPU forwards are about 10x slower
# otherwise. The sampler's CPU path is torch's (no Triton interpreter).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TRITON_INTERPRET=0
exec .venv-vllm/bin/python -m pytest tests/test_vllm.py -p no:cacheprovider "$@"
