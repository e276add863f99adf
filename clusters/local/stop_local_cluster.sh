#!/usr/bin/env bash
# Stop a cluster started by start_local_cluster.sh: SIGTERM to each node's
# `ray start --block` process (which stops that node's Ray processes), workers first.
# Only the pids recorded in the cluster dir are signalled; other Ray clusters survive.
#   clusters/local/stop_local_cluster.sh <cluster dir>
set -uo pipefail
dir=${1:?usage: stop_local_cluster.sh <cluster dir>}
[ -d "$dir" ] || { echo "no such cluster dir: $dir" >&2; exit 2; }

stop_pid_file() {
  local f=$1 pid
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "node $(basename "$f" .pid) did not stop in 30 s; sending SIGKILL to its group" >&2
      kill -KILL -- "-$pid" 2>/dev/null
    fi
  fi
  rm -f "$f"
}

shopt -s nullglob
for f in "$dir"/worker*.pid; do stop_pid_file "$f"; done
for f in "$dir"/head.pid; do stop_pid_file "$f"; done
echo "stopped the Ray cluster in $dir"
