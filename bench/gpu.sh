#!/usr/bin/env bash
# One command for a GPU run on a bare CUDA machine: install, run the test suite on the GPU (Triton
# compiled, not interpreted), run the whole benchmark grid with the copy-bandwidth roofline, and
# write bench/results/cuda-<gpu>.json and .png plus the README's GPU table, ready to commit.
#   bench/gpu.sh [--skip-tests] [--only guidance|generation]
set -euo pipefail
cd "$(dirname "$0")/.."
skip_tests=0
args=()
for a in "$@"; do
  case "$a" in
    --skip-tests) skip_tests=1 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
scripts/install.sh
PY=.venv/bin/python
"$PY" - <<'PYEOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: torch sees no CUDA GPU (torch %s)" % torch.__version__)
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF
mkdir -p bench/results
if [ "$skip_tests" = 0 ]; then
  # TRITON_INTERPRET=0: kernels are compiled; test_cuda.py runs them, CPU tests take the torch path.
  TRITON_INTERPRET=0 "$PY" -m pytest -q -rs 2>&1 | tee bench/results/gpu-tests.log
fi
"$PY" bench/run.py --merge "${args[@]}"
