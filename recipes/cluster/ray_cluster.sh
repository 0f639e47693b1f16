#!/usr/bin/env bash
# Start or stop the Ray cluster the recipes run on: the head on one node, a worker on every other node.
#   bash recipes/cluster/ray_cluster.sh head                 # on the head node
#   bash recipes/cluster/ray_cluster.sh worker HEAD_IP[:PORT] # on every other node
#   bash recipes/cluster/ray_cluster.sh status               # on any node: nodes and GPUs seen
#   bash recipes/cluster/ray_cluster.sh stop                 # on every node (stops ALL Ray processes there)
# Then run a recipe on the head node with NNODES set to the node count, e.g.
#   NNODES=2 bash recipes/run.sh r1_distill_7b l2t
# (verl's ray.init() joins the running cluster: the one started on this node, or RAY_ADDRESS).
# Every node needs the same environment (the Docker image or .venv) and a shared file system for
# DATA_DIR, MODEL_PATH and the recipes' OUTPUT_DIR. DRY_RUN=1 prints the ray command instead.
#
# Every address and port is a variable, so that a node can be confined to one interface (or several
# "nodes" can share one machine, as tests/test_two_nodes.py does on 127.0.0.1). Unset port variables
# leave Ray's own choice.
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}                # the head's GCS port (what workers join)
NODE_IP=${NODE_IP:-}                      # this node's address (--node-ip-address); empty: Ray's guess
DASHBOARD_HOST=${DASHBOARD_HOST:-0.0.0.0} # where the head's dashboard listens; 127.0.0.1 keeps it local
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
TEMP_DIR=${TEMP_DIR:-}                    # Ray's session folder root (--temp-dir); empty: /tmp/ray
NODE_MANAGER_PORT=${NODE_MANAGER_PORT:-}
OBJECT_MANAGER_PORT=${OBJECT_MANAGER_PORT:-}
MIN_WORKER_PORT=${MIN_WORKER_PORT:-}
MAX_WORKER_PORT=${MAX_WORKER_PORT:-}
DASHBOARD_AGENT_LISTEN_PORT=${DASHBOARD_AGENT_LISTEN_PORT:-}
DASHBOARD_AGENT_GRPC_PORT=${DASHBOARD_AGENT_GRPC_PORT:-}
RUNTIME_ENV_AGENT_PORT=${RUNTIME_ENV_AGENT_PORT:-}
METRICS_EXPORT_PORT=${METRICS_EXPORT_PORT:-}
RAY_CLIENT_SERVER_PORT=${RAY_CLIENT_SERVER_PORT:-}
JOIN_TIMEOUT_S=${JOIN_TIMEOUT_S:-60}      # worker: how long the head may take to answer
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
NUM_CPUS=${NUM_CPUS:-$(nproc)}
BLOCK=${BLOCK:-0}   # 1: stay in the foreground (what a Slurm job step and the two-node test need)
RAY=${RAY:-ray}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

usage() {
  echo "usage: $0 head | worker HEAD_IP[:PORT] | status | stop" >&2
  exit 2
}

die() {
  echo "ray_cluster.sh: $*" >&2
  exit 1
}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "$*"
  else
    exec "$@"
  fi
}

# The options both node kinds share: address, ports, resources.
node_options() {
  local -n out=$1
  out=(--num-gpus="$NUM_GPUS" --num-cpus="$NUM_CPUS" --disable-usage-stats)
  [[ -n $NODE_IP ]] && out+=(--node-ip-address="$NODE_IP")
  local pair
  for pair in node-manager-port:NODE_MANAGER_PORT object-manager-port:OBJECT_MANAGER_PORT \
    min-worker-port:MIN_WORKER_PORT max-worker-port:MAX_WORKER_PORT \
    dashboard-agent-listen-port:DASHBOARD_AGENT_LISTEN_PORT \
    dashboard-agent-grpc-port:DASHBOARD_AGENT_GRPC_PORT runtime-env-agent-port:RUNTIME_ENV_AGENT_PORT \
    metrics-export-port:METRICS_EXPORT_PORT; do
    local var=${pair#*:}
    [[ -n ${!var} ]] && out+=("--${pair%%:*}=${!var}")
  done
  [[ $BLOCK == 1 ]] && out+=(--block)
  return 0
}

# A worker cannot join a head that does not answer; say so in one line instead of Ray's retry log.
wait_for_head() {
  local host=${1%:*} port=${1##*:}
  "$PYTHON" - "$host" "$port" "$JOIN_TIMEOUT_S" <<'EOF' || die "head $1 unreachable within ${JOIN_TIMEOUT_S}s (JOIN_TIMEOUT_S)"
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        socket.create_connection((host, port), timeout=2).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.5)
EOF
}

[[ $# -ge 1 ]] || usage
options=()
case "$1" in
  head)
    node_options options
    head_options=(--head --port="$RAY_PORT" --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT")
    [[ -n $TEMP_DIR ]] && head_options+=(--temp-dir="$TEMP_DIR")
    [[ -n $RAY_CLIENT_SERVER_PORT ]] && head_options+=(--ray-client-server-port="$RAY_CLIENT_SERVER_PORT")
    # What every other node runs to join (printed before a blocking start, so it is never lost).
    echo "[ray_cluster] join with: bash $0 worker ${NODE_IP:-THIS_NODE_IP}:$RAY_PORT" >&2
    run "$RAY" start "${head_options[@]}" "${options[@]}"
    ;;
  worker)
    [[ $# -eq 2 ]] || usage
    address=$2
    [[ $address == *:* ]] || address="$address:$RAY_PORT"
    node_options options
    # Several nodes on one machine need their own session folders (Ray accepts it on workers too).
    [[ -n $TEMP_DIR ]] && options+=(--temp-dir="$TEMP_DIR")
    [[ $DRY_RUN == 1 ]] || wait_for_head "$address"
    run "$RAY" start --address="$address" "${options[@]}"
    ;;
  status) run "$RAY" status ;;
  stop) run "$RAY" stop ;;
  *) usage ;;
esac
