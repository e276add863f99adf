#!/usr/bin/env bash
# Start a Ray cluster of one head and N worker nodes on this machine, all bound to
# 127.0.0.1: a multi-node cluster for trying `tripost submit`, rollout actor pools that
# span nodes, and node failures, without any cloud.
#
#   clusters/local/start_local_cluster.sh [N_WORKERS]     (default 2)
#   ... prints the GCS address, the job-server URL and the stop command ...
#   clusters/local/stop_local_cluster.sh <cluster dir>
#
# Settings (environment variables, all optional):
#   RAY_PORT=6390  DASHBOARD_PORT=8266        head GCS port, dashboard/job-server port
#   HEAD_CPUS=1    WORKER_CPUS=2  WORKER_GPUS=0 logical resources of each node
#   CLUSTER_DIR=<new temporary dir>            pid files, logs, one Ray temp dir per node
#   RAY_AUTH_MODE=disabled                     Ray 2.60 turns token auth on by default;
#       this local cluster turns it off (every port binds 127.0.0.1). Set
#       RAY_AUTH_MODE=token to keep it on: the token is RAY_AUTH_TOKEN if set, else a new
#       one written to $CLUSTER_DIR/auth_token (mode 600) and used through
#       RAY_AUTH_TOKEN_PATH by every node, by the stop script and by `tripost submit`.
#
# Every node runs `ray start --block` in the background, so stopping a node is one
# SIGTERM to its own process: the stop script never touches other Ray clusters on the
# machine (unlike `ray stop`, which stops every Ray process of the user).
# WORKER_GPUS declares logical GPUs only; it does not create devices.
set -euo pipefail

n_workers=${1:-2}
[[ "$n_workers" =~ ^[0-9]+$ ]] || { echo "N_WORKERS must be a number, got '$n_workers'" >&2; exit 2; }
RAY=${RAY:-ray}
PYTHON=${PYTHON:-python}
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-2}
WORKER_GPUS=${WORKER_GPUS:-0}
CLUSTER_DIR=${CLUSTER_DIR:-$(mktemp -d -t tripost-ray.XXXXXX)}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR=$(cd "$CLUSTER_DIR" && pwd)
here=$(cd "$(dirname "$0")" && pwd)

if [ "$RAY_AUTH_MODE" = "token" ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" > "$CLUSTER_DIR/auth_token")
  export RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
fi

address="127.0.0.1:$RAY_PORT"
dashboard="http://127.0.0.1:$DASHBOARD_PORT"

start_node() {  # start_node <name> <ray start args...>: background `ray start --block`
  local name=$1; shift
  mkdir -p "$CLUSTER_DIR/$name"
  setsid "$RAY" start --block --node-ip-address=127.0.0.1 \
    --temp-dir="$CLUSTER_DIR/$name" "$@" > "$CLUSTER_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$CLUSTER_DIR/$name.pid"
}

# Each node gets its own dashboard-agent port: the default one (52365) is per machine.
start_node head --head --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0 \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --dashboard-agent-listen-port=$((DASHBOARD_PORT + 1000))

# Wait for the head's GCS before workers try to join.
"$PYTHON" - "$RAY_PORT" <<'PY'
import socket, sys, time
deadline = time.time() + 120
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("the head did not open its GCS port within 120 s")
        time.sleep(0.5)
PY

for i in $(seq 1 "$n_workers"); do
  start_node "worker$i" --address="$address" --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS" \
    --dashboard-agent-listen-port=$((DASHBOARD_PORT + 1000 + i))
done

# Wait until every node is registered and alive (through the head's state API).
"$PYTHON" - "$dashboard" "$((n_workers + 1))" <<'PY'
import sys, time
from ray.util.state import list_nodes
url, want = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 180
alive = 0
while time.time() < deadline:
    try:
        alive = sum(1 for n in list_nodes(address=url) if n.state == "ALIVE")
    except Exception:  # the dashboard is still starting
        alive = 0
    if alive >= want:
        break
    time.sleep(1)
else:
    sys.exit(f"only {alive} of {want} nodes came up within 180 s")
PY

{
  echo "#!/usr/bin/env bash"
  echo "exec bash '$here/stop_local_cluster.sh' '$CLUSTER_DIR'"
} > "$CLUSTER_DIR/stop.sh"
chmod +x "$CLUSTER_DIR/stop.sh"

echo "Ray cluster: 1 head + $n_workers workers on 127.0.0.1 (auth mode: $RAY_AUTH_MODE)"
echo "  GCS address:  $address"
echo "  job server:   $dashboard"
echo "  submit:       RAY_AUTH_MODE=$RAY_AUTH_MODE${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH} tripost submit jobs/quickstart.yaml --address $dashboard"
echo "  stop:         bash $CLUSTER_DIR/stop.sh"
