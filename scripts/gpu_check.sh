#!/usr/bin/env bash
# One command on one CUDA GPU, under 10 minutes, every stage with its own time-out:
#   1. environment  (nvidia-smi, torch/triton/xformers versions, python -m xformers.info)
#   2. CUDA test mode (TRANSKD_TEST_DEVICE=cuda: the op tests on the GPU, compiled kernels, no interpreter)
#   3. op benchmarks (triton.testing.do_bench; every backend vs SDPA flash/cuDNN/mem-efficient, xformers, eager)
#   4. first-call compile + autotune time at two image sizes
#   5. TransKD-Base step, fp32 and bf16 autocast, backend torch vs triton vs auto
# Writes benchmarks/results/cuda-<gpu-name>.{json,md}; commit them with the GPU named.
#
#   bash scripts/gpu_check.sh            # on the GPU machine (uses $PYTHON, else .venv/bin/python, else python3;
#                                        # installs nothing: the GPU image's torch/triton are used as they are)
#   bash scripts/gpu_check.sh --dry-run  # prints the plan and builds every benchmark case on the CPU (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then :; elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu_check_parts}

# stage name | time-out (s) | command
STAGES=(
  "env|30|nvidia-smi; $PYTHON -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; $PYTHON -m xformers.info 2>&1 | head -40 || echo 'xformers: not installed'"
  "tests|210|TRANSKD_TEST_DEVICE=cuda $PYTHON -m pytest -q -p no:cacheprovider -x tests/test_attention.py tests/test_selective_fusion.py tests/test_hcl.py tests/test_kl_div.py tests/test_weighted_mse.py tests/test_backend.py"
  "ops|150|$PYTHON benchmarks/gpu_check.py ops --out $OUT"
  "compile|60|$PYTHON benchmarks/gpu_check.py compile --out $OUT"
  "step|90|$PYTHON benchmarks/gpu_check.py step --out $OUT"
)

if [ "$DRY" = 1 ]; then
  total=0
  echo "gpu_check plan (python: $PYTHON, parts under $OUT, report benchmarks/results/cuda-<gpu>.{json,md}):"
  for s in "${STAGES[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    total=$((total + limit))
    printf '  %-8s %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  echo "  total time-outs: ${total}s (must stay under 600 s on one GPU)"
  [ "$total" -le 570 ] || { echo "gpu_check: stage time-outs exceed the 10-minute budget" >&2; exit 1; }
  exec $PYTHON benchmarks/gpu_check.py plan
fi

mkdir -p "$OUT"
status=0
for s in "${STAGES[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  echo "=== gpu_check: $name (time-out ${limit}s) ==="
  start=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | tee "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - start )) s ===" | tee -a "$OUT/$name.txt"
  [ "$rc" = 0 ] || status=1
done
$PYTHON benchmarks/gpu_check.py report --out "$OUT"
exit $status
