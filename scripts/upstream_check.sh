#!/usr/bin/env bash
# Run nemo-occ's tests against the real upstream code on a CPU machine: megatron-core from a Megatron-LM
# checkout and NeMo-RL's driver side from a NeMo-RL checkout. No GPU, no Transformer Engine, no Bridge.
#
#   NEMO_RL_ROOT=/path/to/RL MEGATRON_LM_ROOT=/path/to/Megatron-LM scripts/upstream_check.sh
#
# Environments, built outside the repository and reused when present (delete one to rebuild it):
#   (a) megatron: Python 3.11 venv, torch + triton + nemo-occ's dependencies, megatron-core installed
#       editable from MEGATRON_LM_ROOT (`pip install --no-build-isolation --ignore-requires-python
#       --no-deps -e`; Megatron-LM asks for Python >= 3.12 but megatron/core runs on 3.11, where pip
#       does not pull a CUDA torch). Runs every megatron-layer test (incl. mcore_latest) there.
#   (b) nemo-rl: Python 3.13 venv with NeMo-RL's driver-side light dependencies and NeMo-RL on
#       PYTHONPATH (NeMo-RL's driver venv has no megatron). Runs the NeMo-RL tests there.
#   (c) worker: (b)'s interpreter with Megatron-LM on PYTHONPATH too, like NeMo-RL's Megatron worker
#       venv less TE and Bridge. Runs the tests that need NeMo-RL and megatron-core together.
#
# Settings (environment variables):
#   NEMO_RL_ROOT, MEGATRON_LM_ROOT  the checkouts (required; read, never written)
#   UPSTREAM_VENV_DIR  where the venvs are built (default ~/.cache/nemo-occ-upstream)
#   MCORE_VENV         venv (a) (default $UPSTREAM_VENV_DIR/mcore-py311); an existing one is reused
#   NEMO_RL_VENV       venv (b) (default $UPSTREAM_VENV_DIR/nemo-rl-py313); an existing one is reused
#   PYTHON311          interpreter for (a) (default: python3.11)
#   PYTHON313          interpreter for (b) (default: python3.13 with PYENV_VERSION=3.13.0)
#   TORCH_SPEC         torch requirement for both venvs (default torch==2.13.0)
#   UPSTREAM_LOG_DIR   where pytest logs and JUnit files go (default $UPSTREAM_VENV_DIR/logs/<time>)
#   UPSTREAM_ENVS      which test runs (default "megatron nemo-rl worker"); the summary says which ran
#   NEMO_RL_COMMIT, MEGATRON_LM_COMMIT  commits to report when a checkout has no .git
#
# The matrix: the NeMo-RL refs nemo-occ supports, each with the megatron-core it pins. Set UPSTREAM_REFS
# to some of them (e.g. UPSTREAM_REFS="v0.7.0 main") and the check runs once per ref, with the checkouts
# named below instead of NEMO_RL_ROOT/MEGATRON_LM_ROOT; the NeMo-RL venv (b) is shared (both refs pin the
# same driver dependencies), venv (a) is one per Megatron-LM checkout (installed editable):
#   main    NeMo-RL main (NEMO_RL_MAIN_ROOT) with megatron-core 0.20 (MEGATRON_LM_MAIN_ROOT, the
#           Megatron-LM commit NeMo-RL main pins)
#   v0.7.0  NeMo-RL v0.7.0 (NEMO_RL_RELEASE_ROOT) with megatron-core 0.19 (MEGATRON_LM_RELEASE_ROOT). The
#           Megatron-LM commit v0.7.0 pins (through Megatron-Bridge) is on a fork that cannot be fetched;
#           what runs is a reconstruction of it, Megatron-LM 00225507 plus a cherry-pick of #5715
#           (53a2dd56fe), and the summary says so.
# Each ref's checkouts are checked for the versions the ref means (megatron-core 0.20 / 0.19, NeMo-RL
# 0.7.0 for the release) before anything is built.
#
# Prints what ran: pass/skip/fail counts per environment and the NeMo-RL, Megatron-LM and torch
# versions. Exits 0 only when nothing failed, some test ran, and both checkouts are unchanged (with
# UPSTREAM_REFS: for every ref).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() {
  echo "upstream_check: $*" >&2
  exit 2
}

# -- the matrix: one run of this script per ref ------------------------------------------------------
package_version() { # root package: MAJOR.MINOR.PATCH from <root>/<package>/package_info.py, else nothing
  sed -n -E "s/^(MAJOR|MINOR|PATCH) = ([0-9]+).*/\2/p" "$1/$2/package_info.py" 2>/dev/null | paste -sd.
}
if [[ -n "${UPSTREAM_REFS:-}" ]]; then
  MATRIX_LOG_DIR=${UPSTREAM_LOG_DIR:-${UPSTREAM_VENV_DIR:-$HOME/.cache/nemo-occ-upstream}/logs/$(date -u +%Y%m%dT%H%M%SZ)}
  mkdir -p "$MATRIX_LOG_DIR"
  matrix_status=0
  ran=()
  for ref in $UPSTREAM_REFS; do
    case "$ref" in
      main)
        nemo_rl=${NEMO_RL_MAIN_ROOT:-} megatron=${MEGATRON_LM_MAIN_ROOT:-} mcore=0.20 nemo_rl_version=
        ;;
      v0.7.0)
        nemo_rl=${NEMO_RL_RELEASE_ROOT:-} megatron=${MEGATRON_LM_RELEASE_ROOT:-} mcore=0.19 nemo_rl_version=0.7.0
        ;;
      *) die "UPSTREAM_REFS: unknown ref '$ref' (known: main v0.7.0)" ;;
    esac
    [[ -n "$nemo_rl" && -n "$megatron" ]] ||
      die "UPSTREAM_REFS=$ref needs $([[ $ref == main ]] && echo NEMO_RL_MAIN_ROOT and MEGATRON_LM_MAIN_ROOT || echo NEMO_RL_RELEASE_ROOT and MEGATRON_LM_RELEASE_ROOT)"
    found=$(package_version "$megatron" megatron/core)
    [[ "$found" == "$mcore".* ]] || die "$ref: $megatron is megatron-core ${found:-?}, not $mcore"
    if [[ -n "$nemo_rl_version" ]]; then
      found=$(package_version "$nemo_rl" nemo_rl)
      [[ "$found" == "$nemo_rl_version" ]] || die "$ref: $nemo_rl is NeMo-RL ${found:-?}, not $nemo_rl_version"
    fi
  done
  for ref in $UPSTREAM_REFS; do
    case "$ref" in
      main) nemo_rl=$NEMO_RL_MAIN_ROOT megatron=$MEGATRON_LM_MAIN_ROOT ;;
      v0.7.0) nemo_rl=$NEMO_RL_RELEASE_ROOT megatron=$MEGATRON_LM_RELEASE_ROOT ;;
    esac
    echo "== $ref"
    rc=0
    UPSTREAM_REFS='' UPSTREAM_REF=$ref NEMO_RL_ROOT=$nemo_rl MEGATRON_LM_ROOT=$megatron \
      MCORE_VENV=${UPSTREAM_VENV_DIR:-$HOME/.cache/nemo-occ-upstream}/mcore-$ref-py311 \
      UPSTREAM_LOG_DIR=$MATRIX_LOG_DIR/$ref NEMO_RL_COMMIT='' MEGATRON_LM_COMMIT='' \
      "${BASH_SOURCE[0]}" >"$MATRIX_LOG_DIR/$ref.out" 2>&1 || rc=$?
    sed -n '/^== nemo-occ upstream check/,$p' "$MATRIX_LOG_DIR/$ref.out"
    ((rc == 0)) || { matrix_status=1; echo "($ref exited $rc; its output: $MATRIX_LOG_DIR/$ref.out)"; }
    ran+=("$ref")
  done
  echo
  echo "== matrix: ${ran[*]}: $( ((matrix_status == 0)) && echo 'all passed' || echo 'FAILED')"
  exit "$matrix_status"
fi
case "${UPSTREAM_REF:-}" in
  main) REF_LABEL="main: NeMo-RL main with megatron-core 0.20" ;;
  v0.7.0) REF_LABEL="v0.7.0: NeMo-RL v0.7.0 with megatron-core 0.19, reconstructed (Megatron-LM 00225507 + cherry-pick of #5715; the pinned fork commit cannot be fetched)" ;;
  *) REF_LABEL="" ;;
esac

[[ -n "${NEMO_RL_ROOT:-}" && -d "${NEMO_RL_ROOT}/nemo_rl" ]] ||
  die "set NEMO_RL_ROOT to a NeMo-RL checkout (the folder that holds nemo_rl/)"
[[ -n "${MEGATRON_LM_ROOT:-}" && -d "${MEGATRON_LM_ROOT}/megatron/core" ]] ||
  die "set MEGATRON_LM_ROOT to a Megatron-LM checkout (the folder that holds megatron/core/)"
NEMO_RL_ROOT=$(cd "$NEMO_RL_ROOT" && pwd)
MEGATRON_LM_ROOT=$(cd "$MEGATRON_LM_ROOT" && pwd)
UPSTREAM_VENV_DIR=${UPSTREAM_VENV_DIR:-$HOME/.cache/nemo-occ-upstream}
MCORE_VENV=${MCORE_VENV:-$UPSTREAM_VENV_DIR/mcore-py311}
NEMO_RL_VENV=${NEMO_RL_VENV:-$UPSTREAM_VENV_DIR/nemo-rl-py313}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LOG_DIR=${UPSTREAM_LOG_DIR:-$UPSTREAM_VENV_DIR/logs/$(date -u +%Y%m%dT%H%M%SZ)}
UPSTREAM_ENVS=${UPSTREAM_ENVS:-megatron nemo-rl worker}
for name in $UPSTREAM_ENVS; do
  [[ "$name" == megatron || "$name" == nemo-rl || "$name" == worker ]] ||
    die "UPSTREAM_ENVS: unknown environment '$name' (megatron nemo-rl worker)"
done

for path in "$MCORE_VENV" "$NEMO_RL_VENV" "$LOG_DIR"; do
  case "$(realpath -m "$path")/" in
    "$REPO"/*) die "$path is inside the repository; build the environments elsewhere (UPSTREAM_VENV_DIR)" ;;
    "$NEMO_RL_ROOT"/* | "$MEGATRON_LM_ROOT"/*) die "$path is inside a checkout, which must stay unchanged" ;;
  esac
done
mkdir -p "$LOG_DIR"

# Nothing below may write into the checkouts: no byte code next to their sources, no pytest cache.
export PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

# nemo-occ's own dependencies: the core's and every layer extra's, from pyproject.toml through
# scripts/occ_deps.py (less torch and megatron-core, which each
# environment brings its own way), and the test runner. Installed on every run, so a reused environment
# picks up a dependency added since it was built.
mapfile -t OCC_DEPS < <("${PYTHON311:-python3.11}" "$REPO/scripts/occ_deps.py" "$REPO/pyproject.toml")
(( ${#OCC_DEPS[@]} > 0 )) || die "could not read nemo-occ's dependencies from $REPO/pyproject.toml"
OCC_DEPS+=(pytest)
# NeMo-RL's driver-side imports (its container's default venv), light enough for a CPU machine.
NEMO_RL_DEPS=("transformers>=5.5,<5.12" requests pillow ray pyzmq nvidia-ml-py uvicorn fastapi mlflow
  swanlab wandb prometheus_client rich hydra-core torchdata datasets math-verify accelerate nvtx colored
  tiktoken sentencepiece blobfile tensordict zstandard pybase64 plotly num2words soundfile)

stamp=$(mktemp "${TMPDIR:-/tmp}/upstream-check.XXXXXX") # its time: the start, before any build
trap 'rm -f "$stamp"' EXIT
sleep 1 # find -newer compares whole seconds on some file systems
git_state() { # porcelain status (untracked and ignored files included) of a git checkout, else nothing
  if git -C "$1" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$1" status --porcelain --ignored --untracked-files=all
  fi
}
nemo_rl_state_before=$(git_state "$NEMO_RL_ROOT")
megatron_state_before=$(git_state "$MEGATRON_LM_ROOT")

python313() { # the Python 3.13 interpreter for (b), as a command line
  if [[ -n "${PYTHON313:-}" ]]; then
    "$PYTHON313" "$@"
  else
    PYENV_VERSION=3.13.0 python3.13 "$@"
  fi
}

# -- (a) megatron-core from the checkout ------------------------------------------------------------
mcore_ok() { # megatron.core imports from MEGATRON_LM_ROOT together with torch, triton and pytest
  [[ -x "$MCORE_VENV/bin/python" ]] || return 1
  local where
  where=$("$MCORE_VENV/bin/python" -W ignore -c \
    'import megatron.core, torch, triton, pytest, pydantic, yaml; print(megatron.core.__file__)' 2>/dev/null) ||
    return 1
  [[ "$where" == "$MEGATRON_LM_ROOT/"* ]] ||
    die "$MCORE_VENV has megatron-core from ${where%/megatron/core/*}, not $MEGATRON_LM_ROOT; set MCORE_VENV"
}
if mcore_ok; then
  echo "(a) reusing $MCORE_VENV"
  "$MCORE_VENV/bin/pip" install -q "${OCC_DEPS[@]}" >"$LOG_DIR/deps-mcore.log" 2>&1 ||
    die "installing nemo-occ's dependencies into $MCORE_VENV failed; see $LOG_DIR/deps-mcore.log"
else
  echo "(a) building $MCORE_VENV (log: $LOG_DIR/build-mcore.log)"
  {
    [[ -x "$MCORE_VENV/bin/python" ]] || "${PYTHON311:-python3.11}" -m venv "$MCORE_VENV"
    "$MCORE_VENV/bin/pip" install "$TORCH_SPEC" triton einops packaging pybind11 setuptools wheel "${OCC_DEPS[@]}"
    # CC=false: Megatron-LM's setup.py builds an optional C++ dataset helper in place, which would
    # write a .so into the checkout; it is optional (setup continues without it) and nemo-occ never
    # uses Megatron's dataset code.
    CC=false CXX=false "$MCORE_VENV/bin/pip" install --no-build-isolation --ignore-requires-python --no-deps \
      -e "$MEGATRON_LM_ROOT"
  } >"$LOG_DIR/build-mcore.log" 2>&1 || die "building $MCORE_VENV failed; see $LOG_DIR/build-mcore.log"
  mcore_ok || die "$MCORE_VENV does not import megatron.core from $MEGATRON_LM_ROOT after the build"
fi

# -- (b) NeMo-RL's driver side ----------------------------------------------------------------------
nemo_rl_ok() {
  [[ -x "$NEMO_RL_VENV/bin/python" ]] &&
    PYTHONPATH=$NEMO_RL_ROOT "$NEMO_RL_VENV/bin/python" -W ignore -c \
      'import nemo_rl.algorithms.grpo, pytest, omegaconf' >/dev/null 2>&1
}
if nemo_rl_ok; then
  echo "(b) reusing $NEMO_RL_VENV"
  "$NEMO_RL_VENV/bin/pip" install -q "${OCC_DEPS[@]}" >"$LOG_DIR/deps-nemo-rl.log" 2>&1 ||
    die "installing nemo-occ's dependencies into $NEMO_RL_VENV failed; see $LOG_DIR/deps-nemo-rl.log"
else
  echo "(b) building $NEMO_RL_VENV (log: $LOG_DIR/build-nemo-rl.log)"
  {
    [[ -x "$NEMO_RL_VENV/bin/python" ]] || python313 -m venv "$NEMO_RL_VENV"
    "$NEMO_RL_VENV/bin/pip" install "$TORCH_SPEC" "${NEMO_RL_DEPS[@]}" "${OCC_DEPS[@]}"
  } >"$LOG_DIR/build-nemo-rl.log" 2>&1 || die "building $NEMO_RL_VENV failed; see $LOG_DIR/build-nemo-rl.log"
  nemo_rl_ok || die "NeMo-RL's grpo module does not import in $NEMO_RL_VENV; see $LOG_DIR/build-nemo-rl.log"
fi

# -- the tests --------------------------------------------------------------------------------------
cd "$REPO"
MCORE_TESTS=(tests/megatron/test_megatron_*.py tests/lab/test_lab_demo*.py tests/nemo_rl/test_nemo_rl_worker.py)
NEMO_RL_TESTS=(tests/nemo_rl/test_nemo_rl_*.py)
WORKER_TESTS=(tests/nemo_rl/test_nemo_rl_megatron_train.py tests/nemo_rl/test_nemo_rl_mtp_old_logprobs.py tests/nemo_rl/test_nemo_rl_worker_probes.py)

run_pytest() { # name python pythonpath tests...: run, keep the log and JUnit file, never abort the script
  local name=$1 python=$2 pythonpath=$3
  shift 3
  [[ " $UPSTREAM_ENVS " == *" $name "* ]] || return 0
  echo "running ($name): $*"
  PYTHONPATH=$pythonpath NEMO_RL_ROOT=$NEMO_RL_ROOT "$python" -m pytest -p no:cacheprovider -q -rfEs \
    --junitxml="$LOG_DIR/$name.xml" "$@" >"$LOG_DIR/$name.log" 2>&1 || true
  tail -n 1 "$LOG_DIR/$name.log"
}
run_pytest megatron "$MCORE_VENV/bin/python" "" "${MCORE_TESTS[@]}"
run_pytest nemo-rl "$NEMO_RL_VENV/bin/python" "$NEMO_RL_ROOT" "${NEMO_RL_TESTS[@]}"
run_pytest worker "$NEMO_RL_VENV/bin/python" "$NEMO_RL_ROOT:$MEGATRON_LM_ROOT" "${WORKER_TESTS[@]}"

# -- what ran, against what -------------------------------------------------------------------------
commit_of() { # root fallback: the checkout's HEAD, else the given commit, else "unknown"
  git -C "$1" rev-parse HEAD 2>/dev/null || echo "${2:-unknown (no .git; set the *_COMMIT variable)}"
}
versions() { # python pythonpath -> "Python x, torch y[, megatron-core z][, transformers t]"
  PYTHONPATH=$2 "$1" -W ignore - <<'EOF' 2>/dev/null
import importlib, platform
parts = [f"Python {platform.python_version()}"]
for mod, label in (("torch", "torch"), ("megatron.core", "megatron-core"), ("transformers", "transformers")):
    try:
        parts.append(f"{label} {importlib.import_module(mod).__version__}")
    except Exception:
        pass
print(", ".join(parts))
EOF
}
changed=()
for root in "$NEMO_RL_ROOT" "$MEGATRON_LM_ROOT"; do
  if [[ -n "$(find "$root" -newer "$stamp" -not -path '*/.git' -not -path '*/.git/*' -print -quit)" ]]; then
    changed+=("$root")
  fi
done
[[ "$(git_state "$NEMO_RL_ROOT")" == "$nemo_rl_state_before" ]] || changed+=("$NEMO_RL_ROOT (git status)")
[[ "$(git_state "$MEGATRON_LM_ROOT")" == "$megatron_state_before" ]] || changed+=("$MEGATRON_LM_ROOT (git status)")

echo
echo "== nemo-occ upstream check ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
[[ -z "$REF_LABEL" ]] || echo "ref          $REF_LABEL"
echo "NeMo-RL      $(commit_of "$NEMO_RL_ROOT" "${NEMO_RL_COMMIT:-}")  $NEMO_RL_ROOT"
echo "Megatron-LM  $(commit_of "$MEGATRON_LM_ROOT" "${MEGATRON_LM_COMMIT:-}")  $MEGATRON_LM_ROOT"
summary=$("$MCORE_VENV/bin/python" - "$LOG_DIR" "$UPSTREAM_ENVS" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

total_failed = total_run = 0
for name in ("megatron", "nemo-rl", "worker"):
    if name not in sys.argv[2].split():
        print(f"{name:9s} not run (UPSTREAM_ENVS)")
        continue
    path = Path(sys.argv[1]) / f"{name}.xml"
    if not path.is_file():
        print(f"{name:9s} no result (pytest did not start; see {path.with_suffix('.log')})")
        total_failed += 1
        continue
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    passed = tests - skipped - failed
    total_failed += failed
    total_run += passed + failed
    print(f"{name:9s} {passed} passed, {skipped} skipped, {failed} failed")
print(f"STATUS {'ok' if total_failed == 0 and total_run > 0 else 'failed'}")
EOF
)
echo "(a) megatron: $(versions "$MCORE_VENV/bin/python" "")"
echo "(b) nemo-rl:  $(versions "$NEMO_RL_VENV/bin/python" "$NEMO_RL_ROOT")"
echo "(c) worker:   $(versions "$NEMO_RL_VENV/bin/python" "$NEMO_RL_ROOT:$MEGATRON_LM_ROOT")"
grep -v '^STATUS' <<<"$summary"
echo "logs: $LOG_DIR"
status=0
if ((${#changed[@]})); then
  echo "CHECKOUT CHANGED: ${changed[*]}"
  status=1
else
  echo "checkouts unchanged"
fi
[[ "$summary" == *"STATUS ok"* ]] || status=1
exit "$status"
