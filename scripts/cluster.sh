#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside the default node (which
# it never touches), for failover and partition tests.
#
#   scripts/cluster.sh up          start three nodes and join them into one cluster
#   scripts/cluster.sh down        stop them and remove everything `up` made
#   scripts/cluster.sh status      each node: running or stopped, and what it sees
#   scripts/cluster.sh urls        the comma-separated AMQP URLs (nodes 1, 2, 3), for AMQP_URL
#   scripts/cluster.sh kill N      SIGKILL node N (the Erlang VM; its data stays)
#   scripts/cluster.sh start N     start node N again (it rejoins the cluster)
#   scripts/cluster.sh stop N      stop node N gracefully
#   scripts/cluster.sh partition N cut node N off from the other two (a network cut)
#   scripts/cluster.sh heal        undo every cut
#   scripts/cluster.sh ctl N ARGS  node N's rabbitmqctl
#   scripts/cluster.sh node N      node N's Erlang node name
#   scripts/cluster.sh ci [ARGS]   for CI: a fresh cluster, tests/cluster (pytest ARGS), then down,
#                                  also on failure or interruption; bounded by AMQPKIT_CLUSTER_CI_TIMEOUT (900 s)
#
# How: each node runs in a network namespace of its own (amqpkit-cl1..3), made
# here with `ip netns`. A fourth namespace (amqpkit-clhub) holds a bridge; each
# node's namespace has a veth pair to it, with the address 10.213.77.N/24 (a
# private range that exists only inside these namespaces). The nodes are
# rabbit@amqpkit-cN, found through /etc/netns/amqpkit-clN/hosts, each with its
# own epmd, distribution port 25672 and AMQP on 5672, all inside its namespace.
# Clients on the host reach node N on 127.0.0.1:<port N> (5681, 5682, 5683):
# socat on the host's loopback passes each connection over a unix socket to a
# socat inside the namespace, which connects to the node's 127.0.0.1:5672. So
# the client path never crosses the bridge, and `partition N` (the node's veth
# taken down on the bridge side) cuts only node-to-node traffic: a client still
# reaches the cut-off node, as a client in its network segment would.
# Nothing listens on or sends to any address outside loopback and these
# namespaces. Without namespaces (no `ip netns`, not root) `up` refuses; there
# is no port-blocking fallback in this script.
#
# Node settings: cluster_partition_handling = pause_minority (a cut-off node
# pauses and closes its clients' connections), net_ticktime 10 s (a cut is
# noticed within 10-15 s instead of 60-75 s).
#
# Settings, from the environment:
#   AMQPKIT_CLUSTER_DIR    where the nodes' data and logs live (/var/tmp/amqpkit-cluster)
#   AMQPKIT_CLUSTER_PORTS  the host ports of nodes 1-3 ("5681 5682 5683")
#   AMQPKIT_CLUSTER_TIMEOUT seconds to wait for a node to start (120)
set -euo pipefail

BASE="${AMQPKIT_CLUSTER_DIR:-/var/tmp/amqpkit-cluster}"
read -r -a PORTS <<<"${AMQPKIT_CLUSTER_PORTS:-5681 5682 5683}"
TIMEOUT="${AMQPKIT_CLUSTER_TIMEOUT:-120}"
HUB=amqpkit-clhub
NET=10.213.77
RABBIT_BIN=/usr/lib/rabbitmq/bin
COOKIE_HOME=/var/lib/rabbitmq  # the default node's cookie, so rabbitmqctl can reach every node

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

ns() { printf 'amqpkit-cl%s' "$1"; }
host() { printf 'amqpkit-c%s' "$1"; }
node() { printf 'rabbit@%s' "$(host "$1")"; }
dir() { printf '%s/n%s' "$BASE" "$1"; }

check_n() { [[ "${1:-}" =~ ^[123]$ ]] || die "node number 1, 2 or 3 expected, got '${1:-}'"; }

in_ns() { local n="$1"; shift; ip netns exec "$(ns "$n")" "$@"; }

ctl() {
  local n="$1"; shift
  in_ns "$n" env HOME="$COOKIE_HOME" ERL_CRASH_DUMP=/dev/null RABBITMQ_CONF_ENV_FILE="$(dir "$n")/rabbitmq-env.conf" \
    "$RABBIT_BIN/rabbitmqctl" -n "$(node "$n")" "$@"
}

beam_pid() {
  local f
  f="$(dir "$1")/node.pid"
  [ -s "$f" ] || return 1
  local pid
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null || return 1
  printf '%s\n' "$pid"
}

# ---------------------------------------------------------------- network

make_net() {
  command -v ip >/dev/null || die "needs iproute2 (ip netns)"
  command -v socat >/dev/null || die "needs socat"
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  ip netns add "$HUB" || die "cannot make network namespaces here (ip netns add failed)"
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  local n
  for n in 1 2 3; do
    ip netns add "$(ns "$n")"
    ip -n "$(ns "$n")" link set lo up
    # Both ends are made inside the namespaces: no interface appears on the host.
    ip -n "$HUB" link add "v$n" type veth peer name eth0 netns "$(ns "$n")"
    ip -n "$HUB" link set "v$n" master br0
    ip -n "$HUB" link set "v$n" up
    ip -n "$(ns "$n")" addr add "$NET.$n/24" dev eth0
    ip -n "$(ns "$n")" link set eth0 up
    mkdir -p "/etc/netns/$(ns "$n")"
    {
      printf '127.0.0.1 localhost\n'
      printf '%s.1 %s\n%s.2 %s\n%s.3 %s\n' "$NET" "$(host 1)" "$NET" "$(host 2)" "$NET" "$(host 3)"
    } >"/etc/netns/$(ns "$n")/hosts"
  done
}

start_forwarders() {
  local n d
  for n in 1 2 3; do
    d="$(dir "$n")"
    rm -f "$d/amqp.sock"
    # nodelay on both TCP ends: without it, AMQP's small frames wait for the peer's delayed ACK
    # (Nagle), which put ~40 ms on a tenth of all sequential RPC calls through the relay.
    in_ns "$n" setsid socat "UNIX-LISTEN:$d/amqp.sock,fork,unlink-early,mode=600" TCP:127.0.0.1:5672,nodelay \
      </dev/null >/dev/null 2>"$d/log/socat-in.log" &
    setsid socat "TCP-LISTEN:${PORTS[$((n - 1))]},bind=127.0.0.1,fork,reuseaddr,nodelay" "UNIX-CONNECT:$d/amqp.sock" \
      </dev/null >/dev/null 2>"$d/log/socat-host.log" &
    echo $! >"$d/forwarder.pid"
  done
}

# ---------------------------------------------------------------- nodes

write_config() {
  local d
  d="$(dir "$1")"
  mkdir -p "$d/mnesia" "$d/log"
  cat >"$d/node.conf" <<EOF
listeners.tcp.default = 5672
cluster_partition_handling = pause_minority
EOF
  printf '[{kernel, [{net_ticktime, 10}]}].\n' >"$d/advanced.config"
  printf '[].\n' >"$d/enabled_plugins"
  # In place of the host's /etc/rabbitmq/rabbitmq-env.conf, which pins epmd and the
  # distribution to 127.0.0.1 (for the default node): here they must be on the bridge too.
  printf 'ERL_EPMD_ADDRESS=127.0.0.1,%s.%s\n' "$NET" "$1" >"$d/rabbitmq-env.conf"
}

launch() {
  local n="$1" d
  d="$(dir "$n")"
  (
    cd "$d"
    in_ns "$n" env HOME="$COOKIE_HOME" \
      RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
      RABBITMQ_NODENAME="$(node "$n")" \
      RABBITMQ_CONFIG_FILE="$d/node.conf" \
      RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
      RABBITMQ_MNESIA_BASE="$d/mnesia" \
      RABBITMQ_LOG_BASE="$d/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
      RABBITMQ_PID_FILE="$d/node.pid" \
      ERL_CRASH_DUMP="$d/erl_crash.dump" \
      "$RABBIT_BIN/rabbitmq-server" -detached
  )
}

await_node() {
  local n="$1" deadline=$((SECONDS + TIMEOUT))
  until ctl "$n" await_startup --timeout 30 >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$(dir "$n")"/log/*.log >&2 || true
      die "node $n ($(node "$n")) did not start within ${TIMEOUT} s"
    fi
    sleep 1  # await_startup returned at once: the node is not registered with its epmd yet
  done
}

cmd_up() {
  if ip netns list | grep -q "^$HUB\b"; then
    die "a cluster is already up (scripts/cluster.sh down first)"
  fi
  rm -rf "$BASE"
  mkdir -p "$BASE"
  make_net
  local n
  for n in 1 2 3; do write_config "$n"; done
  start_forwarders
  for n in 1 2 3; do launch "$n"; done
  for n in 1 2 3; do await_node "$n"; done
  for n in 2 3; do
    ctl "$n" stop_app >/dev/null
    ctl "$n" join_cluster "$(node 1)" >/dev/null
    ctl "$n" start_app >/dev/null
  done
  for n in 1 2 3; do await_node "$n"; done
  log "up: $(cmd_urls | sed 's/guest:guest@//g')"
}

cmd_down() {
  local n pid
  for n in 1 2 3; do
    if [ -f "$(dir "$n")/forwarder.pid" ]; then
      pid="$(cat "$(dir "$n")/forwarder.pid")"
      kill -- "$pid" 2>/dev/null || true
      pkill -P "$pid" 2>/dev/null || true  # its per-connection children
    fi
  done
  for n in 1 2 3 hub; do
    local name
    if [ "$n" = hub ]; then name="$HUB"; else name="$(ns "$n")"; fi
    ip netns list | grep -q "^$name\b" || continue
    # Everything running in the namespace is ours: the node, its epmd, socat.
    for pid in $(ip netns pids "$name"); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$name"
    rm -rf "/etc/netns/$name"
  done
  rmdir /etc/netns 2>/dev/null || true  # made by `up` when it was not there; kept if others use it
  rm -rf "$BASE"
  log "down"
}

cmd_urls() {
  local out="" n
  for n in 1 2 3; do
    out+="${out:+,}amqp://guest:guest@127.0.0.1:${PORTS[$((n - 1))]}/"
  done
  printf '%s\n' "$out"
}

cmd_status() {
  ip netns list | grep -q "^$HUB\b" || { echo "down"; return 3; }
  local n link
  for n in 1 2 3; do
    link="$(ip -n "$HUB" -br link show "v$n" | awk '{print $2}')"
    if beam_pid "$n" >/dev/null; then
      local running
      running="$(ctl "$n" eval 'rabbit_nodes:all_running().' 2>/dev/null | tr -d '\n ' || echo '?')"
      echo "node $n $(node "$n") port ${PORTS[$((n - 1))]} running link=$link sees=$running"
    else
      echo "node $n $(node "$n") port ${PORTS[$((n - 1))]} stopped link=$link"
    fi
  done
}

cmd_kill() {
  check_n "${1:-}"
  local pid
  pid="$(beam_pid "$1")" || die "node $1 is not running"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  log "killed node $1 (pid $pid)"
}

cmd_start() {
  check_n "${1:-}"
  beam_pid "$1" >/dev/null && die "node $1 is already running"
  launch "$1"
  await_node "$1"
  log "started node $1"
}

cmd_stop() {
  check_n "${1:-}"
  ctl "$1" stop >/dev/null
  log "stopped node $1"
}

cmd_partition() {
  check_n "${1:-}"
  ip -n "$HUB" link set "v$1" down
  log "node $1 cut off"
}

cmd_heal() {
  local n
  for n in 1 2 3; do ip -n "$HUB" link set "v$n" up; done
  log "healed"
}

cmd_ci() {
  local root
  root="$(cd "$(dirname "$0")/.." && pwd)"
  cmd_down >/dev/null 2>&1 || true  # a cluster left by an interrupted run
  trap 'cmd_down' EXIT
  trap 'exit 130' INT TERM
  cmd_up
  AMQPKIT_CLUSTER_URLS="$(cmd_urls)" timeout --kill-after=30 "${AMQPKIT_CLUSTER_CI_TIMEOUT:-900}" \
    "$root/.venv/bin/python" -m pytest -p no:cacheprovider "$root/tests/cluster" "$@"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  urls) cmd_urls ;;
  kill) cmd_kill "${2:-}" ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  partition) cmd_partition "${2:-}" ;;
  heal) cmd_heal ;;
  ctl) check_n "${2:-}"; n="$2"; shift 2; ctl "$n" "$@" ;;
  ci) shift; cmd_ci "$@" ;;
  node) check_n "${2:-}"; node "$2"; echo ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
