#!/usr/bin/env bash
# The checks that need a GPU, in one run that fits a 10-minute window. For a machine with an NVIDIA GPU
# and Transformer Engine (the NeMo-RL container, or any CUDA torch + megatron-core + TE); CI never runs it.
#
#   scripts/gpu_check.sh [LOG_DIR]        (default: $OUT, else ./gpu-check-logs)
#
# Steps, each with its own time limit and log in LOG_DIR, all run even when one fails:
#   env         nvidia-smi, Python, torch/CUDA, megatron-core, Transformer Engine, APEX versions
#   marked      pytest -m gpu over tests/ except the real-kernel test (JUnit in marked.xml): chunked
#               log-probs in bf16 on CUDA
#   wgrad       the fused weight-gradient DDP test with megatron's real fused_weight_gradient_mlp_cuda
#               (-k real_kernel), after checking that megatron-core imported that kernel
#   bench-*     bench/bench_regime_step.py (the regimes on the unfused and the fused MTP path),
#               bench/bench_probe.py and bench/bench_chunked_logprobs.py (twice: V/H = 64 and GLM-4.5-Air's
#               V/TP = 9.25 H at TP4) with --device cuda (bf16), at small shapes
#               (a bench without a --device option is reported as not run)
# Prints one line per step and exits non-zero if any step failed or did not run.
#
# Settings: PYTHON (default python3); time limits GPU_CHECK_PYTEST_TIMEOUT (marked tests, default 120 s),
# GPU_CHECK_WGRAD_TIMEOUT (default 90 s), GPU_CHECK_BENCH_TIMEOUT (default 75 s per bench), 30 s for the
# environment report: 9 min at most in all.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_DIR=${1:-${OUT:-$REPO/gpu-check-logs}}
PYTHON=${PYTHON:-python3}
PYTEST_TIMEOUT=${GPU_CHECK_PYTEST_TIMEOUT:-120}
WGRAD_TIMEOUT=${GPU_CHECK_WGRAD_TIMEOUT:-90}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-75}
mkdir -p "$LOG_DIR" || {
  echo "gpu_check: cannot create $LOG_DIR" >&2
  exit 2
}
LOG_DIR=$(cd "$LOG_DIR" && pwd)
cd "$REPO" || exit 2
export PYTHONDONTWRITEBYTECODE=1
# The benches import nemo_occ from this checkout (the package need not be installed).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

results=()
record() { # step status detail
  results+=("$(printf '%-14s %-8s %s' "$1" "$2" "$3")")
  echo "[$1] $2 $3"
}

# -- env -------------------------------------------------------------------------------------------
{
  timeout 10 nvidia-smi || echo "nvidia-smi: not found or timed out"
  timeout 20 "$PYTHON" - <<'EOF'
import importlib, platform
print("Python", platform.python_version())
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for name in ("megatron.core", "transformer_engine", "apex"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "installed"))
    except Exception as err:
        print(name, "not importable:", type(err).__name__, err)
EOF
} >"$LOG_DIR/env.log" 2>&1
if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  record env ok "$(grep -m1 '^device' "$LOG_DIR/env.log")"
else
  record env FAILED "no CUDA device visible to torch (see env.log)"
fi

# -- marked tests ----------------------------------------------------------------------------------
junit_counts() { # junit.xml -> "N passed, N skipped, N failed"
  "$PYTHON" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
failed = int(suite.get("failures")) + int(suite.get("errors"))
print(f"{tests - skipped - failed} passed, {skipped} skipped, {failed} failed")
EOF
}
run_pytest() { # step junit-name time-limit pytest-args...
  local step=$1 name=$2 limit=$3 rc
  shift 3
  timeout "$limit" "$PYTHON" -m pytest -p no:cacheprovider -q -rs --junitxml="$LOG_DIR/$name.xml" \
    "$@" >"$LOG_DIR/$name.log" 2>&1
  rc=$?
  if ((rc == 124)); then
    record "$step" FAILED "timed out after ${limit}s (see $name.log)"
  elif ((rc == 5)); then
    record "$step" "NOT RUN" "no test selected (see $name.log)"
  elif [[ ! -f "$LOG_DIR/$name.xml" ]]; then
    record "$step" FAILED "pytest exit $rc, no JUnit file (see $name.log)"
  else
    record "$step" "$( ((rc == 0)) && echo ok || echo FAILED)" "$(junit_counts "$LOG_DIR/$name.xml")"
  fi
}
run_pytest marked marked "$PYTEST_TIMEOUT" -m gpu -k "not real_kernel" tests/

# -- fused weight-gradient accumulation with the real kernel -------------------------------------
kernel=$(timeout 30 "$PYTHON" -W ignore - 2>>"$LOG_DIR/wgrad.log" <<'EOF'
# megatron's ColumnParallelLinear uses APEX's/TE's fused_weight_gradient_mlp_cuda when it imports
from megatron.core.tensor_parallel import layers
print("fused_weight_gradient_mlp_cuda" if getattr(layers, "_grad_accum_fusion_available", False) else "")
EOF
)
if [[ -n "$kernel" ]]; then
  echo "kernel: $kernel" >>"$LOG_DIR/wgrad.log"
  run_pytest wgrad wgrad "$WGRAD_TIMEOUT" -m gpu -k real_kernel tests/megatron/test_megatron_wgrad_fusion.py
else
  record wgrad "NOT RUN" "megatron finds no fused wgrad kernel (APEX/TE fused_weight_gradient_mlp_cuda)"
fi

# -- benches on CUDA ------------------------------------------------------------------------------
run_bench() { # step script args...
  local step=$1 script=$2 rc
  shift 2
  if ! "$PYTHON" "$script" --help 2>/dev/null | grep -q -- '--device'; then
    record "$step" "NOT RUN" "$script has no --device option (CPU only)"
    return
  fi
  timeout "$BENCH_TIMEOUT" "$PYTHON" "$script" --device cuda "$@" >"$LOG_DIR/$step.log" 2>&1
  rc=$?
  if ((rc == 0)); then
    record "$step" ok "see $step.log"
  else
    record "$step" FAILED "exit $rc (124 = timed out after ${BENCH_TIMEOUT}s; see $step.log)"
  fi
}
# GLM-4.5-Air's shares of the forward FLOPs (docs/benchmarks.md): MTP layer ~3%, each head ~2.3 layers;
# the regimes on the unfused and the fused MTP log-prob path.
run_bench bench-regime bench/bench_regime_step.py --layers 32 --hidden 1024 --heads 16 --vocab 32768 \
  --tokens 1024 --batch 4 --rounds 5
run_bench bench-probe bench/bench_probe.py --layers 8 --hidden 1024 --heads 16 --vocab 32768 \
  --tokens 1024 --batch 8 --rounds 5
run_bench bench-logprobs bench/bench_chunked_logprobs.py --tokens 8192 --hidden 1024 --vocab 65536 \
  --chunk-sizes 512 2048 8192 --repeats 5
# GLM-4.5-Air's shard at TP4: V/TP = 151552 / 4 = 37888 = 9.25 H, H = 4096
run_bench bench-logprobs-glm bench/bench_chunked_logprobs.py --tokens 8192 --hidden 4096 --vocab 37888 \
  --chunk-sizes 512 2048 --repeats 5

echo
echo "== nemo-occ GPU check ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')), logs in $LOG_DIR"
printf '%s\n' "${results[@]}" | tee "$LOG_DIR/summary.txt"
if printf '%s\n' "${results[@]}" | grep -q -E '^\S+ +(FAILED|NOT RUN)'; then
  exit 1
fi
exit 0
