#!/usr/bin/env bash
# Run nemo-occ's export tests against the real Megatron-Bridge on a CPU machine: Bridge and megatron-core
# from their checkouts, transformers from the package registry, no GPU, no Transformer Engine.
#
#   MEGATRON_BRIDGE_ROOT=/path/to/Megatron-Bridge MEGATRON_LM_ROOT=/path/to/Megatron-LM scripts/bridge_check.sh
#
# The environment, built outside the repository and reused when present (delete it to rebuild it):
#   a Python 3.11 venv with torch, transformers and nemo-occ's dependencies; Megatron-LM and
#   Megatron-Bridge installed editable from the checkouts (`pip install --no-deps --no-build-isolation
#   --ignore-requires-python -e`; both ask for Python >= 3.12, their code runs on 3.11, where pip does not
#   pull a CUDA torch); nvidia-modelopt without its dependencies (Bridge's checkpointing imports it); and
#   two shims that exist only in this venv, never in nemo-occ: `typing.override` from typing_extensions
#   (Megatron-LM's training code imports it; it is new in 3.12), and an empty `transformer_engine`
#   module present only while Bridge's LoRA layers module executes (it imports TE at its top; nothing
#   there runs without TE, and megatron-core must keep seeing TE as absent everywhere else).
# Cold build: about 10 minutes and 3 GB.
#
# The tests (marker megatron_bridge, tests/export/test_export_*.py) build tiny GLM-4.5-Air- and MiMo-shaped
# checkpoints with MTP layers, load them into Megatron with Bridge (local spec), compare logits with
# Hugging Face's, then run `nemo-occ export` and `verify-export` at tensor-parallel sizes 1 and 2 (gloo).
#
# Settings (environment variables):
#   MEGATRON_BRIDGE_ROOT, MEGATRON_LM_ROOT  the checkouts (required; read, never written)
#   UPSTREAM_VENV_DIR  where the venv is built (default ~/.cache/nemo-occ-upstream)
#   BRIDGE_VENV        the venv (default $UPSTREAM_VENV_DIR/bridge-py311); an existing one is reused
#   PYTHON311          its interpreter (default: python3.11)
#   TORCH_SPEC         torch requirement (default torch==2.13.0)
#   TRANSFORMERS_SPEC  transformers requirement (default transformers==5.12.*, what Bridge 067f987 allows)
#   BRIDGE_LOG_DIR     where the pytest log and JUnit file go (default $UPSTREAM_VENV_DIR/logs/bridge-<time>)
#   MEGATRON_BRIDGE_COMMIT, MEGATRON_LM_COMMIT  commits to report when a checkout has no .git
#
# Prints what ran: pass/skip/fail counts, per model and tensor-parallel size the tensors exported and
# equal to the original, and the Megatron-Bridge, megatron-core, transformers and torch versions. Exits
# 0 only when nothing failed, some test ran, and both checkouts are unchanged.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() {
  echo "bridge_check: $*" >&2
  exit 2
}

[[ -n "${MEGATRON_BRIDGE_ROOT:-}" && -d "${MEGATRON_BRIDGE_ROOT}/src/megatron/bridge" ]] ||
  die "set MEGATRON_BRIDGE_ROOT to a Megatron-Bridge checkout (the folder that holds src/megatron/bridge/)"
[[ -n "${MEGATRON_LM_ROOT:-}" && -d "${MEGATRON_LM_ROOT}/megatron/core" ]] ||
  die "set MEGATRON_LM_ROOT to a Megatron-LM checkout (the folder that holds megatron/core/)"
MEGATRON_BRIDGE_ROOT=$(cd "$MEGATRON_BRIDGE_ROOT" && pwd)
MEGATRON_LM_ROOT=$(cd "$MEGATRON_LM_ROOT" && pwd)
UPSTREAM_VENV_DIR=${UPSTREAM_VENV_DIR:-$HOME/.cache/nemo-occ-upstream}
BRIDGE_VENV=${BRIDGE_VENV:-$UPSTREAM_VENV_DIR/bridge-py311}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRANSFORMERS_SPEC=${TRANSFORMERS_SPEC:-transformers==5.12.*}
LOG_DIR=${BRIDGE_LOG_DIR:-$UPSTREAM_VENV_DIR/logs/bridge-$(date -u +%Y%m%dT%H%M%SZ)}

for path in "$BRIDGE_VENV" "$LOG_DIR"; do
  case "$(realpath -m "$path")/" in
    "$REPO"/*) die "$path is inside the repository; build the environment elsewhere (UPSTREAM_VENV_DIR)" ;;
    "$MEGATRON_BRIDGE_ROOT"/* | "$MEGATRON_LM_ROOT"/*) die "$path is inside a checkout, which must stay unchanged" ;;
  esac
done
mkdir -p "$LOG_DIR"

# Nothing below may write into the checkouts or the repository: no byte code, no pytest cache.
export PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

# nemo-occ's own dependencies: the core's and every layer extra's, from pyproject.toml through
# scripts/occ_deps.py (less torch and megatron-core, which come their
# own way). Installed on every run, so a reused environment picks up a dependency added since.
mapfile -t OCC_DEPS < <("${PYTHON311:-python3.11}" "$REPO/scripts/occ_deps.py" "$REPO/pyproject.toml")
((${#OCC_DEPS[@]} > 0)) || die "could not read nemo-occ's dependencies from $REPO/pyproject.toml"
OCC_DEPS+=(pytest)
# What Bridge's conversion and checkpointing path imports, light enough for a CPU machine (its full
# dependency list pulls CUDA wheels: flashinfer, nvidia-resiliency-ext, ...).
BRIDGE_DEPS=("$TRANSFORMERS_SPEC" accelerate peft einops omegaconf rich regex six typing-extensions requests pulp
  datasets sentencepiece)

stamp=$(mktemp "${TMPDIR:-/tmp}/bridge-check.XXXXXX") # its time: the start, before any build
trap 'rm -f "$stamp"' EXIT
sleep 1 # find -newer compares whole seconds on some file systems
git_state() { # porcelain status (untracked and ignored files included) of a git checkout, else nothing
  if git -C "$1" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$1" status --porcelain --ignored --untracked-files=all
  fi
}
bridge_state_before=$(git_state "$MEGATRON_BRIDGE_ROOT")
megatron_state_before=$(git_state "$MEGATRON_LM_ROOT")

# The two shims, as a module the venv imports at start-up (a .pth line). Outside the repository.
write_shims() {
  local site
  site=$("$BRIDGE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cat >"$site/_nemo_occ_bridge_cpu_shims.py" <<'EOF'
"""CPU shims for Megatron-Bridge without Transformer Engine, written by nemo-occ's scripts/bridge_check.sh."""

import importlib.abc
import importlib.util
import sys
import types
import typing

if not hasattr(typing, "override"):  # Python 3.11: Megatron-LM's training code imports typing.override
    import typing_extensions

    typing.override = typing_extensions.override

_LORA_LAYERS = "megatron.bridge.peft.lora_layers"  # `import transformer_engine.pytorch as te` at its top


class _Placeholder(types.ModuleType):
    """Any attribute is another placeholder (class bodies there name e.g. te.ops.Sequential in annotations)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _TransformerEngineWhileLoRALayersImport(importlib.abc.MetaPathFinder):
    """An empty transformer_engine while Bridge's LoRA layers module executes, and only then."""

    def find_spec(self, name, path, target=None):
        if name != _LORA_LAYERS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            te = _Placeholder("transformer_engine")
            placeholders = {"transformer_engine": te, "transformer_engine.pytorch": te.pytorch}
            sys.modules.update(placeholders)
            try:
                original(module)
            finally:
                for key, value in placeholders.items():
                    if sys.modules.get(key) is value:
                        del sys.modules[key]

        spec.loader.exec_module = exec_module
        return spec


if importlib.util.find_spec("transformer_engine") is None:
    sys.meta_path.insert(0, _TransformerEngineWhileLoRALayersImport())
EOF
  echo "import _nemo_occ_bridge_cpu_shims" >"$site/_nemo_occ_bridge_cpu_shims.pth"
}

bridge_ok() { # Bridge, megatron-core and transformers import from the checkouts, Bridge's checkpointing too
  [[ -x "$BRIDGE_VENV/bin/python" ]] || return 1
  local where
  where=$("$BRIDGE_VENV/bin/python" -W ignore -c '
import logging; logging.disable(logging.CRITICAL)
import megatron.bridge, megatron.core, transformers, pytest
import megatron.bridge.training.model_load_save
print(megatron.bridge.__file__); print(megatron.core.__file__)' 2>/dev/null) || return 1
  [[ "$(sed -n 1p <<<"$where")" == "$MEGATRON_BRIDGE_ROOT/"* ]] ||
    die "$BRIDGE_VENV has Megatron-Bridge from elsewhere ($(sed -n 1p <<<"$where")); set BRIDGE_VENV"
  [[ "$(sed -n 2p <<<"$where")" == "$MEGATRON_LM_ROOT/"* ]] ||
    die "$BRIDGE_VENV has megatron-core from elsewhere ($(sed -n 2p <<<"$where")); set BRIDGE_VENV"
}
if [[ -x "$BRIDGE_VENV/bin/python" ]] && { write_shims && bridge_ok; }; then
  echo "reusing $BRIDGE_VENV"
  "$BRIDGE_VENV/bin/pip" install -q "${OCC_DEPS[@]}" >"$LOG_DIR/deps.log" 2>&1 ||
    die "installing nemo-occ's dependencies into $BRIDGE_VENV failed; see $LOG_DIR/deps.log"
else
  echo "building $BRIDGE_VENV (log: $LOG_DIR/build.log; about 10 minutes)"
  {
    [[ -x "$BRIDGE_VENV/bin/python" ]] || "${PYTHON311:-python3.11}" -m venv "$BRIDGE_VENV"
    "$BRIDGE_VENV/bin/pip" install "$TORCH_SPEC" triton packaging pybind11 setuptools wheel "${BRIDGE_DEPS[@]}" \
      "${OCC_DEPS[@]}"
    "$BRIDGE_VENV/bin/pip" install --no-deps nvidia-modelopt
    # CC=false: Megatron-LM's setup.py builds an optional C++ dataset helper in place, which would write
    # a .so into the checkout; setup continues without it, and nothing here uses Megatron's datasets.
    CC=false CXX=false "$BRIDGE_VENV/bin/pip" install --no-build-isolation --ignore-requires-python --no-deps \
      -e "$MEGATRON_LM_ROOT"
    "$BRIDGE_VENV/bin/pip" install --no-build-isolation --ignore-requires-python --no-deps -e "$MEGATRON_BRIDGE_ROOT"
  } >"$LOG_DIR/build.log" 2>&1 || die "building $BRIDGE_VENV failed; see $LOG_DIR/build.log"
  write_shims
  bridge_ok || die "Megatron-Bridge does not import in $BRIDGE_VENV after the build; see $LOG_DIR/build.log"
fi

# -- the tests --------------------------------------------------------------------------------------
cd "$REPO"
echo "running: pytest -m megatron_bridge tests/export/test_export_*.py (about 15 minutes on 2 cores)"
PYTHONPATH=$REPO "$BRIDGE_VENV/bin/python" -m pytest -p no:cacheprovider -q -rfEs -m megatron_bridge \
  -W ignore::DeprecationWarning --junitxml="$LOG_DIR/bridge.xml" tests/export/test_export_*.py >"$LOG_DIR/bridge.log" 2>&1 ||
  true
tail -n 1 "$LOG_DIR/bridge.log"

# -- what ran, against what -------------------------------------------------------------------------
commit_of() { # root fallback: the checkout's HEAD, else the given commit, else "unknown"
  git -C "$1" rev-parse HEAD 2>/dev/null || echo "${2:-unknown (no .git; set the *_COMMIT variable)}"
}
changed=()
for root in "$MEGATRON_BRIDGE_ROOT" "$MEGATRON_LM_ROOT"; do
  if [[ -n "$(find "$root" -newer "$stamp" -not -path '*/.git' -not -path '*/.git/*' -print -quit)" ]]; then
    changed+=("$root")
  fi
done
[[ "$(git_state "$MEGATRON_BRIDGE_ROOT")" == "$bridge_state_before" ]] || changed+=("$MEGATRON_BRIDGE_ROOT (git status)")
[[ "$(git_state "$MEGATRON_LM_ROOT")" == "$megatron_state_before" ]] || changed+=("$MEGATRON_LM_ROOT (git status)")

echo
echo "== nemo-occ Megatron-Bridge check ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
echo "Megatron-Bridge  $(commit_of "$MEGATRON_BRIDGE_ROOT" "${MEGATRON_BRIDGE_COMMIT:-}")  $MEGATRON_BRIDGE_ROOT"
echo "Megatron-LM      $(commit_of "$MEGATRON_LM_ROOT" "${MEGATRON_LM_COMMIT:-}")  $MEGATRON_LM_ROOT"
echo "versions: $("$BRIDGE_VENV/bin/python" -W ignore - <<'EOF' 2>/dev/null
import platform
from importlib import metadata
parts = [f"Python {platform.python_version()}"]
for dist in ("megatron-bridge", "megatron-core", "transformers", "torch"):
    try:
        parts.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        parts.append(f"{dist} absent")
print(", ".join(parts))
EOF
)"
summary=$("$BRIDGE_VENV/bin/python" - "$LOG_DIR/bridge.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

path = Path(sys.argv[1])
if not path.is_file():
    print(f"no result (pytest did not start; see {path.with_suffix('.log')})")
    print("STATUS failed")
    sys.exit()
suite = ET.parse(path).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
failed = int(suite.get("failures")) + int(suite.get("errors"))
passed = tests - skipped - failed
print(f"tests: {passed} passed, {skipped} skipped, {failed} failed")
for case in suite.iter("testcase"):
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    if not props:
        continue
    outcome = "FAILED" if case.find("failure") is not None or case.find("error") is not None else "passed"
    label = case.get("name").split("[", 1)[-1].rstrip("]")
    print(
        f"  {label:18s} {outcome}: {props['tensors_equal']}/{props['tensors']} tensors equal after "
        f"HF -> Megatron -> nemo-occ export ({props['mtp_tensors']} MTP, {props['rebuilt_by_nemo_occ']} "
        f"rebuilt by nemo-occ); |logits - HF| <= {props['logits_max_abs_diff']}"
    )
print(f"STATUS {'ok' if failed == 0 and passed > 0 else 'failed'}")
EOF
)
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
