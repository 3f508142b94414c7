#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, on loopback: a head and N workers, each a separate Ray node
# with its own resources, temp dir and loopback address (head 127.0.0.2, workers 127.0.0.3, ...).
#
#   infra/local-cluster.sh start [--workers N] [--head-cpus C] [--worker-cpus C] [--port P]
#                                [--dashboard-port D (default P + 5)] [--dir DIR]
#   infra/local-cluster.sh kill NODE [--dir DIR]     # SIGKILL one node's processes (head, worker-1, ...)
#   infra/local-cluster.sh stop [--dir DIR]          # stop exactly the nodes this script started
#
# Each node starts in a session of its own (setsid); Ray's processes and the workers they spawn stay in
# it, so stopping a node signals that session and nothing else on the machine (`ray stop` would end
# every Ray process of the user). DIR (default /tmp/cropclean-cluster) holds one temp dir and one
# `<node>.sid` file per node; keep it short, as Ray puts unix sockets under it.
# After `start`, submit with: ray job submit --address http://127.0.0.1:D --working-dir . -- python -m jobs.clean ...
set -euo pipefail

cmd=${1:-}
[ -n "$cmd" ] && shift
workers=1 head_cpus=2 worker_cpus=2 port=6390 dashboard_port= dir=/tmp/cropclean-cluster node=""
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --head-cpus) head_cpus=$2; shift 2 ;;
    --worker-cpus) worker_cpus=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dashboard-port) dashboard_port=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    -*) echo "local-cluster: unknown option $1" >&2; exit 2 ;;
    *) node=$1; shift ;;
  esac
done
RAY=${RAY:-$(command -v ray || echo "$(dirname "$0")/../.venv/bin/ray")}
# Job entrypoints run `python` from the nodes' PATH: the interpreter that has Ray (and the project).
PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
export PATH
# A busy machine (CI on 2 cores) can take longer than the dashboard's default 30 s to bring its modules up.
export RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT=${RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT:-180}
export RAY_DASHBOARD_STARTUP_TIMEOUT_S=${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-240}

# The Ray processes of one node: every process in the session recorded at its start.
node_pids() { ps -eo pid=,sid= | awk -v s="$1" '$2 == s { print $1 }'; }

signal_node() {  # signal_node NAME SIGNAL
  local f="$dir/$1.sid"
  [ -f "$f" ] || { echo "local-cluster: no node $1 under $dir" >&2; return 1; }
  local pids
  pids=$(node_pids "$(cat "$f")")
  [ -z "$pids" ] || kill "-$2" $pids 2>/dev/null || true
}

# Every port a node listens on, from its base: nodes on one machine must not share Ray's defaults
# (another Ray instance there already holds them). Node k's base is port + 10 k.
node_ports() {
  local b=$1
  echo "--node-manager-port $((b + 2)) --object-manager-port $((b + 3))" \
    "--dashboard-agent-listen-port $((b + 4)) --dashboard-agent-grpc-port $((b + 6))" \
    "--metrics-export-port $((b + 7)) --runtime-env-agent-port $((b + 8))"
}

running() {  # running NAME: the node was started here and its processes are alive
  [ -f "$dir/$1.sid" ] && [ -n "$(node_pids "$(cat "$dir/$1.sid")")" ]
}

start_node() {  # start_node NAME IP ARGS...: up to 3 tries (Ray gives a raylet 30 s to register)
  local name=$1 ip=$2 try
  shift 2
  mkdir -p "$dir/$name"
  for try in 1 2 3; do
    # setsid makes ray start (and all it spawns) a new session; its id is the first process's pid.
    setsid "$RAY" start --node-ip-address "$ip" --temp-dir "$dir/$name" --disable-usage-stats "$@" \
      > "$dir/$name.log" 2>&1 &
    echo $! > "$dir/$name.sid"
    wait $! && return 0
    echo "local-cluster: $name did not start (try $try); see $dir/$name.log" >&2
    tail -5 "$dir/$name.log" >&2
    signal_node "$name" KILL  # what it did start must not linger (a stale GCS keeps the port)
    rm -f "$dir/$name.sid"
    sleep 2
  done
  return 1
}

case "$cmd" in
  start)  # starts the nodes that are not running: after `kill worker-1`, `start` brings it back
    mkdir -p "$dir"
    dashboard_port=${dashboard_port:-$((port + 5))}
    running head || start_node head 127.0.0.2 --head --port "$port" --num-cpus "$head_cpus" \
      --num-gpus 0 --resources '{"head": 1}' --include-dashboard true --dashboard-host 127.0.0.1 \
      --dashboard-port "$dashboard_port" --ray-client-server-port $((port + 1)) $(node_ports "$port") \
      --min-worker-port $((port + 100)) --max-worker-port $((port + 399))
    for i in $(seq 1 "$workers"); do
      running "worker-$i" || start_node "worker-$i" "127.0.0.$((2 + i))" --address "127.0.0.2:$port" \
        --num-cpus "$worker_cpus" --num-gpus 0 --resources "{\"worker-$i\": 1}" \
        $(node_ports $((port + 10 * i))) \
        --min-worker-port $((port + 400 * i + 100)) --max-worker-port $((port + 400 * i + 399))
    done
    echo "RAY_ADDRESS=127.0.0.2:$port"
    echo "RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port"
    ;;
  kill)
    [ -n "$node" ] || { echo "local-cluster: kill which node? (head, worker-1, ...)" >&2; exit 2; }
    signal_node "$node" KILL
    rm -f "$dir/$node.sid"
    ;;
  stop)
    for f in "$dir"/*.sid; do
      [ -f "$f" ] || continue
      signal_node "$(basename "$f" .sid)" TERM
    done
    sleep 3
    for f in "$dir"/*.sid; do
      [ -f "$f" ] || continue
      signal_node "$(basename "$f" .sid)" KILL
      rm -f "$f"
    done
    ;;
  *)
    echo "usage: infra/local-cluster.sh start|kill NODE|stop [options] (see the header of this file)" >&2
    exit 2
    ;;
esac
