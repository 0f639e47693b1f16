#!/usr/bin/env bash
# Start or stop the Ray cluster the recipes run on: the head on one node, a worker on every other node.
#   bash recipes/cluster/ray_cluster.sh head                 # on the head node
#   bash recipes/cluster/ray_cluster.sh worker HEAD_IP[:PORT] # on every other node
#   bash recipes/cluster/ray_cluster.sh status               # on any node: nodes and GPUs seen
#   bash recipes/cluster/ray_cluster.sh stop                 # on every node
# Then run a recipe on the head node with NNODES set to the node count, e.g.
#   NNODES=2 bash recipes/run.sh r1_distill_7b l2t
# (verl's ray.init() joins the running cluster: the one started on this node, or RAY_ADDRESS).
# Every node needs the same environment (the Docker image or .venv) and a shared file system for
# DATA_DIR, MODEL_PATH and the recipes' OUTPUT_DIR. DRY_RUN=1 prints the ray command instead.
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
NUM_CPUS=${NUM_CPUS:-$(nproc)}
BLOCK=${BLOCK:-0}   # 1: stay in the foreground (what a Slurm job step needs)
RAY=${RAY:-ray}
DRY_RUN=${DRY_RUN:-0}

usage() {
  echo "usage: $0 head | worker HEAD_IP[:PORT] | status | stop" >&2
  exit 2
}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "$*"
  else
    exec "$@"
  fi
}

[[ $# -ge 1 ]] || usage
block=()
[[ $BLOCK == 1 ]] && block=(--block)
case "$1" in
  head)
    run "$RAY" start --head --port="$RAY_PORT" --dashboard-host=0.0.0.0 --dashboard-port="$DASHBOARD_PORT" \
      --num-gpus="$NUM_GPUS" --num-cpus="$NUM_CPUS" "${block[@]}"
    ;;
  worker)
    [[ $# -eq 2 ]] || usage
    address=$2
    [[ $address == *:* ]] || address="$address:$RAY_PORT"
    run "$RAY" start --address="$address" --num-gpus="$NUM_GPUS" --num-cpus="$NUM_CPUS" "${block[@]}"
    ;;
  status) run "$RAY" status ;;
  stop) run "$RAY" stop ;;
  *) usage ;;
esac
