#!/usr/bin/env bash
# One offline command for a GPU machine whose python3 already has torch, triton and transformers:
# installs cfg_triton without an index or dependencies, runs the GPU tests (Triton compiled), then
# bench/gpu.py: greedy parity, host cost, the op grid against its peers, end-to-end generation.
# Writes at most 8 files to OUT and prints a summary table as its last lines. Downloads nothing.
#   bench/gpu.sh OUT            full run, about 7 minutes on an H100
#   bench/gpu.sh OUT --quick    trimmed run, about 3 minutes
#   bench/gpu.sh OUT --smoke    the same steps on a CPU at tiny sizes (what CI runs)
# PYTHON selects the interpreter (default python3). Commit OUT/<machine>.json and .png under
# bench/results/, then `python bench/report.py bench/results/<machine>.json` writes the README table.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in ""|-h|--help) sed -n '2,10p' "$0"; exit 0 ;; esac
out=$1; shift
plan=full
for a in "$@"; do
  case "$a" in
    --quick) plan=quick ;;
    --smoke) plan=smoke ;;
    *) echo "bench/gpu.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Nothing may reach the network: no package index, no model hub.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

{
  started=$(date +%s)
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__)'
  # The interpreter's own torch/triton/transformers serve; only the project itself is installed.
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
    echo "pip could not install the project; importing it from a staged copy instead"
    stage=$(mktemp -d)
    cp -r cfg_triton "$stage/cfg_triton" && cp -r kernels "$stage/cfg_triton/kernels"
    export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c 'import cfg_triton, cfg_triton.kernels; print("cfg_triton from", cfg_triton.__file__)' || exit 1

  if [ "$plan" = smoke ]; then
    # CPU: the GPU test file's cases at CPU sizes, the kernels in Triton's interpreter.
    export TRITON_INTERPRET=1
    tests=(tests/test_cuda.py -k "poisoned or bitwise or fast_launch")
  else
    export TRITON_INTERPRET=0
    tests=(tests/test_cuda.py tests/test_compiled_decode.py)
  fi
  # Every selected test runs here, those the CPU suite marks slow included.
  "$PY" -m pytest "${tests[@]}" -m "slow or not slow" -q -rs -p no:cacheprovider --junitxml="$out/tests.xml" \
    >"$out/tests.log" 2>&1
  tail -n 30 "$out/tests.log"
  echo "tests took $(( $(date +%s) - started )) s"
  flags=()
  [ "$plan" = full ] || flags=(--$plan)
  "$PY" bench/gpu.py --out "$out" --tests "$out/tests.xml" "${flags[@]}"
  echo "bench/gpu.sh took $(( $(date +%s) - started )) s in all"
} 2>&1 | tee "$out/log.txt"
# The summary is the run's last lines; repeat it after the timing line.
cat "$out/summary.txt" 2>/dev/null
