#!/bin/bash
# Submit a nemo-occ recipe to Slurm through NeMo-RL's own ray.sub.
#
#   slurm/submit.sh [--dry-run] [--no-check] RECIPE NODES [OVERRIDE ...] [-- SBATCH_FLAG ...]
#
#   CONTAINER=<nemo-rl image> NEMO_RL_ROOT=<nemo-rl checkout> \
#     slurm/submit.sh recipes/grpo-occ-mimo-7b-rl-1n8g-h100-tp2-smoke.yaml 1 -- -A <account> -p <partition> -t 1:00:00
#
# Run it from the nemo-occ checkout on the login node. It checks the recipe with the overrides
# (`python -m nemo_occ.nemo_rl.run_grpo --check --strict`, no GPU), checks that the recipe's
# cluster.num_nodes equals NODES and cluster.gpus_per_node equals GPUS_PER_NODE, then runs
#
#   COMMAND=... CONTAINER=... MOUNTS=... GPUS_PER_NODE=... \
#     sbatch --nodes=NODES --gres=gpu:GPUS_PER_NODE --job-name=nemo-occ-<recipe> SBATCH_FLAG... ray.sub
#
# exactly as NeMo-RL's docs/cluster.md does. ray.sub brings up Ray in one named container per node,
# pins Ray's ports below the ephemeral range, raises `ulimit -n`, passes --gres to each step and writes
# <job id>-logs/ (the driver's output is <job id>-logs/ray-driver.log). Nothing of that is redone here.
# Flags after `--` go to sbatch unchanged: ray.sub's own header has placeholder --account/--partition
# and --time=1:0:0, so pass -A and -p (or set SBATCH_ACCOUNT / SBATCH_PARTITION) and a --time that
# fits the run. ray.sub also sets --dependency=singleton: jobs with the same name run one at a time.
#
#   --dry-run      print the environment and the sbatch command instead of submitting
#   --no-check     skip the recipe check (when the login node has no Python with nemo-occ's deps)
#
# Environment (CONTAINER is required):
#   CONTAINER      NeMo-RL container image (pyxis/enroot), as for ray.sub
#   MOUNTS         container mounts "src:dst[,...]" (default "$PWD:$PWD"); must make the checkout
#                  visible at the same path; add your Hugging Face cache and data here
#   NEMO_RL_ROOT   NeMo-RL checkout on the login node, at the container's commit: holds ray.sub and
#                  the base configs and config types the recipe check resolves and checks against
#                  (`nemo_rl:` parents, key names); needed for the check even when RAY_SUB is set
#   RAY_SUB        path of ray.sub (default: $NEMO_RL_ROOT/ray.sub)
#   GPUS_PER_NODE  GPUs per node (default 8, ray.sub's default); must equal cluster.gpus_per_node
#   GRES           sbatch --gres value (default gpu:$GPUS_PER_NODE; empty on clusters without GRES)
#   CONTAINER_NEMO_RL_ROOT
#                  NeMo-RL source tree inside the container (default /opt/nemo-rl)
#   PYTHON         interpreter for the recipe check on the login node (default python3)
#   SETUP_COMMAND, BASE_LOG_DIR, CPUS_PER_WORKER, ...: read by ray.sub itself (see its header)
set -euo pipefail

usage() {
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

DRY_RUN=0
CHECK=1
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-check) CHECK=0 ;;
    --help) usage ;;
    *) echo "error: unknown option $1" >&2 && usage ;;
  esac
  shift
done
[[ $# -ge 2 ]] || usage
RECIPE=$1
NODES=$2
shift 2
OVERRIDES=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  OVERRIDES+=("$1")
  shift
done
[[ $# -gt 0 ]] && shift # the "--"
SBATCH_FLAGS=("$@")

die() {
  echo "error: $*" >&2
  exit 2
}

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, got '$NODES'"
[[ -f "$RECIPE" ]] || die "recipe $RECIPE not found (give its path relative to the checkout, e.g. recipes/<name>.yaml)"
[[ -n "${CONTAINER:-}" ]] || die "set CONTAINER to the NeMo-RL container image"
CHECKOUT=$(pwd -P)
[[ -f "$CHECKOUT/nemo_occ/__init__.py" ]] || die "run this from the nemo-occ checkout (no nemo_occ/ in $CHECKOUT)"
MOUNTS=${MOUNTS:-"$CHECKOUT:$CHECKOUT"}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GRES=${GRES-gpu:$GPUS_PER_NODE}
CONTAINER_NEMO_RL_ROOT=${CONTAINER_NEMO_RL_ROOT:-/opt/nemo-rl}
PYTHON=${PYTHON:-python3}
if [[ -z "${RAY_SUB:-}" ]]; then
  [[ -n "${NEMO_RL_ROOT:-}" ]] || die "set NEMO_RL_ROOT to a NeMo-RL checkout (it holds ray.sub), or RAY_SUB to ray.sub itself"
  RAY_SUB=$NEMO_RL_ROOT/ray.sub
fi
[[ -f "$RAY_SUB" ]] || die "$RAY_SUB not found: NEMO_RL_ROOT must be a NeMo-RL checkout (or set RAY_SUB)"
if ! grep -q 'COMMAND' "$RAY_SUB" || ! grep -q 'CONTAINER' "$RAY_SUB"; then
  die "$RAY_SUB does not read COMMAND and CONTAINER: it is not NeMo-RL's ray.sub"
fi

# The checkout must be mounted at its own path: ray.sub starts the containers in the submit directory.
mounted=0
IFS=',' read -r -a mount_list <<<"$MOUNTS"
for mount in "${mount_list[@]}"; do
  src=${mount%%:*}
  rest=${mount#*:}
  dst=${rest%%:*}
  [[ "$src" == "$mount" ]] && dst=$src # "path" alone mounts it at the same path
  if [[ "$dst" == "$CHECKOUT" || "$CHECKOUT" == "$dst"/* ]]; then
    mounted=1
  fi
done
((mounted)) || die "MOUNTS='$MOUNTS' does not mount the checkout $CHECKOUT at the same path: add $CHECKOUT:$CHECKOUT"

has_flag() { # has_flag SHORT LONG: true when SBATCH_FLAGS sets the option
  local flag
  for flag in "${SBATCH_FLAGS[@]}"; do
    [[ "$flag" == "$1" || "$flag" == "$1"?* || "$flag" == "$2" || "$flag" == "$2="* ]] && return 0
  done
  return 1
}
has_flag -A --account || [[ -n "${SBATCH_ACCOUNT:-}" ]] \
  || die "pass the Slurm account after '--' (-- -A <account>) or set SBATCH_ACCOUNT: ray.sub's header holds a placeholder"
has_flag -p --partition || [[ -n "${SBATCH_PARTITION:-}" ]] \
  || die "pass the partition after '--' (-- -p <partition>) or set SBATCH_PARTITION: ray.sub's header holds a placeholder"
has_flag -t --time || [[ -n "${SBATCH_TIMELIMIT:-}" ]] \
  || echo "warning: no --time given: ray.sub's header asks for 1 hour (pass -- -t HH:MM:SS)" >&2
has_flag -N --nodes && die "give the node count as NODES, not as an sbatch flag"

RECIPE_NAME=$(basename "$RECIPE" .yaml)
JOB_NAME=()
has_flag -J --job-name || [[ -n "${SBATCH_JOB_NAME:-}" ]] || JOB_NAME=("--job-name=nemo-occ-$RECIPE_NAME")

# The recipe, with the overrides, exactly as the launch will parse them; then its cluster block.
if ((CHECK)); then
  PYTHONPATH="$CHECKOUT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m nemo_occ.nemo_rl.run_grpo \
    --config "$RECIPE" --check --strict "${OVERRIDES[@]}" >&2 \
    || die "the recipe check failed (see above); fix the recipe or overrides, or pass --no-check"
  read -r RECIPE_NODES RECIPE_GPUS < <(PYTHONPATH="$CHECKOUT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" \
    -m nemo_occ.nemo_rl.recipes nodes "$RECIPE" "${OVERRIDES[@]}")
  [[ "$RECIPE_NODES" == "$NODES" ]] \
    || die "$RECIPE has cluster.num_nodes=$RECIPE_NODES but NODES=$NODES: submit with $RECIPE_NODES nodes, or override cluster.num_nodes=$NODES (and check that the parallel layout still divides)"
  [[ "$RECIPE_GPUS" == "$GPUS_PER_NODE" ]] \
    || die "$RECIPE has cluster.gpus_per_node=$RECIPE_GPUS but GPUS_PER_NODE=$GPUS_PER_NODE"
fi

# The driver command ray.sub runs in the head container (in the submit directory = the checkout).
# cluster.num_nodes=NODES is repeated so the driver log shows the allocation it was started for.
printf -v quoted_overrides ' %q' "${OVERRIDES[@]}" "cluster.num_nodes=$NODES"
COMMAND="export PYTHONPATH=$(printf %q "$CHECKOUT")\${PYTHONPATH:+:\$PYTHONPATH} NEMO_RL_ROOT=$(printf %q "$CONTAINER_NEMO_RL_ROOT"); \
python -m nemo_occ.nemo_rl.run_grpo --config $(printf %q "$RECIPE")$quoted_overrides"

SBATCH=(sbatch "--nodes=$NODES" ${GRES:+"--gres=$GRES"} "${JOB_NAME[@]}" "${SBATCH_FLAGS[@]}" "$RAY_SUB")
export COMMAND CONTAINER MOUNTS GPUS_PER_NODE
if ((DRY_RUN)); then
  for name in COMMAND CONTAINER MOUNTS GPUS_PER_NODE; do
    printf '%s=%q\n' "$name" "${!name}"
  done
  printf '%q ' "${SBATCH[@]}"
  printf '\n'
  exit 0
fi
exec "${SBATCH[@]}"
