#!/bin/bash
# nemo-occ: start a Ray cluster over the current Slurm allocation inside the NeMo-RL container and run
# a recipe on it (the conventions of NeMo-RL's ray.sub: CONTAINER, MOUNTS, COMMAND, SETUP_COMMAND).
# Called by the slurm/*.sbatch variants, which set the node count and the default RECIPE; runs on the
# first node of the allocation and uses pyxis (srun --container-image).
#
# Environment overrides (every one is optional except CONTAINER):
#   CONTAINER      NeMo-RL container image for srun --container-image (required)
#   MOUNTS         container mounts "src:dst[,src:dst...]"; must make NEMO_OCC_DIR visible at the same
#                  path (default: "$NEMO_OCC_DIR:$NEMO_OCC_DIR"); add your HF cache / data / results
#   NEMO_OCC_DIR   nemo-occ checkout (default: $SLURM_SUBMIT_DIR); put on PYTHONPATH in the container,
#                  which NeMo-RL forwards to its Ray workers
#   RECIPE         recipe path relative to NEMO_OCC_DIR (default: set by the .sbatch variant)
#   OVERRIDES      extra NeMo-RL overrides for the recipe, "key=value key=value"
#   COMMAND        run this on the head node instead of the training command (empty: train the recipe)
#   SETUP_COMMAND  run on every node before Ray starts (e.g. "pip install --no-deps -e $NEMO_OCC_DIR")
#   NEMO_RL_ROOT   NeMo-RL source tree inside the container (default: /opt/nemo-rl)
#   GPUS_PER_NODE  GPUs per node (default: 8); must equal the recipe's cluster.gpus_per_node
#   CPUS_PER_NODE  CPUs given to each node's Ray and driver step (default: $SLURM_CPUS_ON_NODE); without
#                  it an srun step with one task is bound to one CPU on clusters that constrain cores
#   RAY_PORT       port of the Ray head (default: 6379)
#   RAY_WAIT_S     seconds to wait for all nodes to join Ray (default: 600)
#   BASE_LOG_DIR   logs go to $BASE_LOG_DIR/<job id>-logs/ (default: $SLURM_SUBMIT_DIR)
set -euo pipefail

: "${CONTAINER:?set CONTAINER to the NeMo-RL container image}"
: "${SLURM_JOB_ID:?run this inside a Slurm allocation (sbatch slurm/<variant>.sbatch)}"
NEMO_OCC_DIR=${NEMO_OCC_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
MOUNTS=${MOUNTS:-"$NEMO_OCC_DIR:$NEMO_OCC_DIR"}
RECIPE=${RECIPE:?set RECIPE to a recipe under recipes/ (the .sbatch variants set a default)}
OVERRIDES=${OVERRIDES:-}
COMMAND=${COMMAND:-}
SETUP_COMMAND=${SETUP_COMMAND:-true}
NEMO_RL_ROOT=${NEMO_RL_ROOT:-/opt/nemo-rl}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}
RAY_PORT=${RAY_PORT:-6379}
RAY_WAIT_S=${RAY_WAIT_S:-600}
BASE_LOG_DIR=${BASE_LOG_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
LOG_DIR="$BASE_LOG_DIR/$SLURM_JOB_ID-logs"
mkdir -p "$LOG_DIR"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
NUM_NODES=${#NODES[@]}
ENV_SETUP="export PYTHONPATH=$NEMO_OCC_DIR:\${PYTHONPATH:-} NEMO_RL_ROOT=$NEMO_RL_ROOT; cd $NEMO_OCC_DIR"

# One container step on one node; extra srun flags first, then the shell command.
on_node() {
  local node=$1 cmd=$2
  shift 2
  srun --nodes=1 --ntasks=1 ${CPUS_PER_NODE:+--cpus-per-task=$CPUS_PER_NODE} --nodelist="$node" \
    --container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir="$NEMO_OCC_DIR" "$@" \
    bash -c "$ENV_SETUP; $cmd"
}

# The recipe's cluster block must describe this allocation.
read -r RECIPE_NODES RECIPE_GPUS < <(on_node "$HEAD" "python -m nemo_occ.nemo_rl.recipes nodes $RECIPE" --overlap)
if [[ "$RECIPE_NODES" != "$NUM_NODES" || "$RECIPE_GPUS" != "$GPUS_PER_NODE" ]]; then
  echo "error: $RECIPE wants cluster.num_nodes=$RECIPE_NODES x gpus_per_node=$RECIPE_GPUS but the job has" \
    "$NUM_NODES nodes x GPUS_PER_NODE=$GPUS_PER_NODE; change sbatch --nodes or the recipe" >&2
  exit 1
fi

echo "nemo-occ: $NUM_NODES nodes, head $HEAD, recipe $RECIPE, logs in $LOG_DIR"
on_node "$HEAD" "$SETUP_COMMAND && ray start --head --port=$RAY_PORT --num-gpus=$GPUS_PER_NODE --block" \
  --overlap >"$LOG_DIR/ray-head.log" 2>&1 &
for node in "${NODES[@]:1}"; do
  on_node "$node" "$SETUP_COMMAND && ray start --address=$HEAD:$RAY_PORT --num-gpus=$GPUS_PER_NODE --block" \
    --overlap >"$LOG_DIR/ray-worker-$node.log" 2>&1 &
done

# Wait until every node has joined.
count_nodes="python -c 'import ray; ray.init(address=\"auto\", logging_level=\"ERROR\"); print(sum(n[\"Alive\"] for n in ray.nodes()))'"
waited=0
until alive=$(on_node "$HEAD" "$count_nodes" --overlap 2>/dev/null | tail -n 1) && [[ "$alive" == "$NUM_NODES" ]]; do
  if ((waited >= RAY_WAIT_S)); then
    echo "error: only ${alive:-0} of $NUM_NODES nodes joined Ray after ${RAY_WAIT_S}s; see $LOG_DIR/ray-*.log" >&2
    exit 1
  fi
  sleep 10
  waited=$((waited + 10))
done

if [[ -z "$COMMAND" ]]; then
  COMMAND="python -m nemo_occ.nemo_rl.run_grpo --config $RECIPE $OVERRIDES"
fi
echo "nemo-occ: running on $HEAD: $COMMAND"
on_node "$HEAD" "export RAY_ADDRESS=$HEAD:$RAY_PORT; $COMMAND" --overlap 2>&1 | tee "$LOG_DIR/driver.log"
