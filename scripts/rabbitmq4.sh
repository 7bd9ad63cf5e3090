#!/usr/bin/env bash
# shellcheck disable=SC2016 # the sh -c '...' scripts take their values as arguments
# A RabbitMQ 4.x node beside the default one, for testing amqpkit on a current
# release without touching the node on 127.0.0.1:5672.
#
#   scripts/rabbitmq4.sh up        start the node (builds its root the first time); waits for AMQP
#   scripts/rabbitmq4.sh down      stop it (the cached root stays)
#   scripts/rabbitmq4.sh status    "running ..." (exit 0) or "stopped" (exit 3)
#   scripts/rabbitmq4.sh url       its AMQP URL
#   scripts/rabbitmq4.sh env       shell lines pointing the test suite at it:
#                                  eval "$(scripts/rabbitmq4.sh env)"
#   scripts/rabbitmq4.sh logs [-f] its log (-f: follow it)
#   scripts/rabbitmq4.sh ctl ARGS  that node's rabbitmqctl
#
# How: a Debian 13 (trixie) root made with debootstrap from the Debian mirror
# this machine's apt already uses, with Debian's rabbitmq-server (4.0.x) in
# it, built once and cached. The node runs chrooted there, in its own mount
# and PID namespaces, on the host's network: AMQP on 127.0.0.1:5673, Erlang
# distribution on 127.0.0.1:25673 and its own epmd on 127.0.0.1:4370 (the
# default node's epmd on 4369 is never used), node name rabbit4@localhost, no
# plugins. Its data, log, settings and crash dumps live in a folder of its own
# outside the root, seen as /srv/node by the node only. Every `up` that starts
# the node starts it fresh (empty data, new log).
#
# Needs root (debootstrap, chroot, namespaces). Settings, from the environment:
#   RABBITMQ4_BASE       where the root and the nodes' folders live (/var/cache/amqpkit)
#   RABBITMQ4_MIRROR     Debian mirror URL (default: the one in /etc/apt/sources.list*)
#   RABBITMQ4_INSTANCE   name of the node (rabbit4): other names are other nodes
#                        sharing the cached root; give them their own ports
#   RABBITMQ4_AMQP_PORT  5673    RABBITMQ4_DIST_PORT 25673    RABBITMQ4_EPMD_PORT 4370
#   RABBITMQ4_DEPRECATED permit (RabbitMQ's default: a deprecated feature works and
#                        its first use is logged as a warning) or deny (as if it
#                        were removed: using one fails, e.g. declaring a transient
#                        non-exclusive queue closes the connection)
#   RABBITMQ4_TIMEOUT    seconds `up` waits for the node to accept AMQP (120)
# The ports and RABBITMQ4_DEPRECATED are read when the node starts; while it
# runs, the other commands use the values it was started with.
set -euo pipefail

SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
BASE="${RABBITMQ4_BASE:-/var/cache/amqpkit}"
ROOT="$BASE/rabbitmq4-root"
ROOT_LOCK="$BASE/rabbitmq4-root.lock"
BUILD_LOG="$BASE/rabbitmq4-build.log"
INSTANCE="${RABBITMQ4_INSTANCE:-rabbit4}"
STATE="$BASE/rabbitmq4-nodes/$INSTANCE"  # lock, pid, settings, node/ (the node's /srv/node)
NODE="$INSTANCE@localhost"
TIMEOUT="${RABBITMQ4_TIMEOUT:-120}"
SUITE="trixie"
# Bump when the way the root is built changes: a root with another recipe is rebuilt.
RECIPE="amqpkit-rabbitmq4-root 2: debootstrap minbase $SUITE + rabbitmq-server"
FEATURES="amqp_address_v1 global_qos queue_master_locator ram_node_type transient_nonexcl_queues"

log() { printf '[rabbitmq4] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and namespaces)"; }

[[ "$INSTANCE" =~ ^[A-Za-z0-9_-]+$ ]] || die "RABBITMQ4_INSTANCE: letters, digits, - and _ only"

# ---------------------------------------------------------------- the root

# The first Debian archive URI apt is configured with (one-line .list files and
# deb822 .sources files); security and third-party repositories are skipped.
find_mirror() {
  if [ -n "${RABBITMQ4_MIRROR:-}" ]; then
    printf '%s\n' "${RABBITMQ4_MIRROR%/}"
    return
  fi
  local files=() f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ "${#files[@]}" -gt 0 ] || die "no apt sources found; set RABBITMQ4_MIRROR to a Debian mirror URL"
  uri="$(
    awk '
      /^[[:space:]]*#/ { next }
      /^[[:space:]]*deb[[:space:]]/ {
        for (i = 2; i <= NF; i++) {
          if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; continue }
          print $i; break
        }
        next
      }
      tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }
    ' "${files[@]}" |
      sed 's:/*$::' | grep -E '^https?://[^ ]+/debian$' | head -n 1
  )" || true
  [ -n "$uri" ] || die "no Debian mirror in /etc/apt/sources.list*; set RABBITMQ4_MIRROR to one"
  printf '%s\n' "$uri"
}

ensure_host_tools() {
  local missing=()
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
  command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
  [ "${#missing[@]}" -eq 0 ] && return
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]} on the host"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

root_ready() { [ -f "$ROOT/etc/amqpkit-root-recipe" ] && [ "$(cat "$ROOT/etc/amqpkit-root-recipe")" = "$RECIPE" ]; }

# Runs "$@" in a private mount namespace, so whatever it mounts (debootstrap
# mounts /proc and /sys in the target) goes away with it, even if interrupted.
in_mount_ns() { unshare --mount --propagation private "$@"; }

# Instances running from the root (their names), other than this one.
other_running() {
  local dir
  for dir in "$BASE"/rabbitmq4-nodes/*/; do
    [ -d "$dir" ] || continue
    dir="${dir%/}"
    [ "${dir##*/}" = "$INSTANCE" ] && continue
    node_pid "$dir" >/dev/null && printf '%s\n' "${dir##*/}"
  done
  return 0
}

build_root() {
  ensure_host_tools
  local mirror tmp="$ROOT.build" script="" running
  running="$(other_running)"
  [ -z "$running" ] || die "the cached root must be rebuilt, but nodes run from it: ${running//$'\n'/ }; stop them first"
  mirror="$(find_mirror)"
  log "building a Debian $SUITE root with rabbitmq-server from $mirror (once; cached in $ROOT)"
  [ -e "$tmp" ] && rm -rf --one-file-system "$tmp"
  # An older debootstrap without a script for this suite can use sid's.
  [ -e "/usr/share/debootstrap/scripts/$SUITE" ] || script=/usr/share/debootstrap/scripts/sid
  : >"$BUILD_LOG"
  # shellcheck disable=SC2086 # $script: no word or one
  if ! in_mount_ns debootstrap --variant=minbase \
      --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
      "$SUITE" "$tmp" "$mirror" $script >>"$BUILD_LOG" 2>&1; then
    tail -n 20 "$BUILD_LOG" >&2
    die "debootstrap failed (full log: $BUILD_LOG)"
  fi
  # Packages must not start services in the root; the node is started by this script.
  printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
  chmod 0755 "$tmp/usr/sbin/policy-rc.d"
  if ! in_mount_ns sh -c '
      mount -t proc proc "$1/proc" &&
      exec chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive sh -c "
          apt-get update -q &&
          apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 rabbitmq-server &&
          apt-get clean && rm -rf /var/lib/apt/lists/*"' sh "$tmp" >>"$BUILD_LOG" 2>&1; then
    tail -n 20 "$BUILD_LOG" >&2
    die "installing rabbitmq-server in the root failed (full log: $BUILD_LOG)"
  fi
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$tmp/etc/hosts"
  mkdir -p "$tmp/srv/node"  # where each node's own folder is mounted
  # Every command in the root runs with its node's environment, and nothing else.
  cat >"$tmp/usr/local/bin/amqpkit-node" <<'EOF'
#!/bin/sh
set -a
. /srv/node/etc/node.env
set +a
cd "$HOME"
exec "$@"
EOF
  chmod 0755 "$tmp/usr/local/bin/amqpkit-node"
  printf '%s\n' "$RECIPE" >"$tmp/etc/amqpkit-root-recipe"
  [ -e "$ROOT" ] && rm -rf --one-file-system "$ROOT"
  mv "$tmp" "$ROOT"
  log "root ready: $(chroot "$ROOT" dpkg-query -W -f '${Package} ${Version}' rabbitmq-server)"
}

ensure_root() {
  root_ready && return 0
  exec 8>"$ROOT_LOCK"
  flock -w 1800 8 || die "another build of the root holds $ROOT_LOCK"
  root_ready || build_root
  exec 8>&-
}

# ---------------------------------------------------------------- one node's settings

# The settings the node was started with when it runs; otherwise the ones `up` would use.
load_settings() {
  AMQP_PORT="${RABBITMQ4_AMQP_PORT:-5673}"
  DIST_PORT="${RABBITMQ4_DIST_PORT:-25673}"
  EPMD_PORT="${RABBITMQ4_EPMD_PORT:-4370}"
  DEPRECATED="${RABBITMQ4_DEPRECATED:-permit}"
  if [ "${1:-}" != requested ] && [ -f "$STATE/settings" ] && node_pid >/dev/null; then
    # shellcheck source=/dev/null
    . "$STATE/settings"
  fi
  local port
  for port in "$AMQP_PORT" "$DIST_PORT" "$EPMD_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] || die "ports are numbers (got '$port')"
  done
  case "$DEPRECATED" in permit | deny) ;; *) die "RABBITMQ4_DEPRECATED is permit or deny" ;; esac
  URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/"
}

# A fresh folder for the node, with its environment and configuration.
write_node_dir() {
  local dir="$STATE/node"
  rm -rf --one-file-system "$dir"
  mkdir -p "$dir/etc" "$dir/data" "$dir/log" "$dir/crash"
  cat >"$STATE/settings" <<EOF
AMQP_PORT=$AMQP_PORT
DIST_PORT=$DIST_PORT
EPMD_PORT=$EPMD_PORT
DEPRECATED=$DEPRECATED
EOF
  cat >"$dir/etc/node.env" <<EOF
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/var/lib/rabbitmq
LANG=C.UTF-8
LC_ALL=C.UTF-8
RABBITMQ_NODENAME=$NODE
RABBITMQ_CONFIG_FILE=/srv/node/etc/rabbitmq.conf
RABBITMQ_ENABLED_PLUGINS_FILE=/srv/node/etc/enabled_plugins
RABBITMQ_DIST_PORT=$DIST_PORT
ERL_EPMD_PORT=$EPMD_PORT
ERL_EPMD_ADDRESS=127.0.0.1
RABBITMQ_MNESIA_BASE=/srv/node/data
RABBITMQ_LOG_BASE=/srv/node/log
RABBITMQ_LOGS=/srv/node/log/rabbit.log
RABBITMQ_PID_FILE=/srv/node/node.pid
ERL_CRASH_DUMP=/srv/node/crash/erl_crash.dump
RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  {
    echo "# Written by scripts/rabbitmq4.sh (amqpkit): a test node on loopback only."
    echo "listeners.tcp.1 = 127.0.0.1:$AMQP_PORT"
    echo "log.file.level = info"
    echo "log.console = false"
    if [ "$DEPRECATED" = deny ]; then
      local feature
      for feature in $FEATURES; do
        echo "deprecated_features.permit.$feature = false"
      done
    fi
  } >"$dir/etc/rabbitmq.conf"
  printf '[].\n' >"$dir/etc/enabled_plugins"
}

# ---------------------------------------------------------------- the node

# The pid of the node's namespace holder (unshare) while it is alive; $1: the
# node's folder (default: this one's).
node_pid() {
  local pid state="${1:-$STATE}"
  [ -f "$state/pid" ] || return 1
  pid="$(cat "$state/pid")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  # Guard against a reused pid: the process must be this node's.
  tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "$state" || return 1
  printf '%s\n' "$pid"
}

# True once the port answers the AMQP 0-9-1 header with connection.start.
amqp_ready() {
  python3 - "$AMQP_PORT" <<'PY'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
        s.settimeout(2)
        s.sendall(b"AMQP\x00\x00\x09\x01")
        head = b""
        while len(head) < 11:
            chunk = s.recv(11 - len(head))
            if not chunk:
                break
            head += chunk
except OSError:
    sys.exit(1)
# frame type 1 (method), then after channel and size: class 10, method 10 (connection.start)
sys.exit(0 if len(head) == 11 and head[0] == 1 and head[7:11] == b"\x00\x0a\x00\x0a" else 1)
PY
}

port_taken() {
  python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

lock_instance() {
  mkdir -p "$STATE"
  exec 9>"$STATE/lock"
  flock -w 1800 9 || die "another up/down of $NODE holds $STATE/lock"
}

cmd_up() {
  need_root
  lock_instance
  local pid
  if pid="$(node_pid)"; then
    load_settings
    local wanted
    wanted="$(load_settings requested; echo "$AMQP_PORT $DIST_PORT $EPMD_PORT $DEPRECATED")"
    [ "$wanted" = "$AMQP_PORT $DIST_PORT $EPMD_PORT $DEPRECATED" ] ||
      log "note: running with ports $AMQP_PORT $DIST_PORT $EPMD_PORT, deprecated features $DEPRECATED; 'down' first to change them"
    if amqp_ready; then
      log "already running: $NODE accepts AMQP on 127.0.0.1:$AMQP_PORT"
      return 0
    fi
    log "$NODE is running but does not answer AMQP yet; waiting"
  else
    load_settings requested
    ensure_root
    local port
    for port in "$AMQP_PORT" "$DIST_PORT" "$EPMD_PORT"; do
      port_taken "$port" && die "127.0.0.1:$port is already in use by something else"
    done
    write_node_dir
    # The node's own mount and PID namespaces: its folder and /proc are mounted
    # for it alone, and when its VM exits everything it started (epmd) goes too.
    setsid unshare --mount --pid --fork --kill-child=SIGKILL --propagation private \
      sh -c 'mount --bind "$2/node" "$1/srv/node" && mount -t proc proc "$1/proc" &&
             exec chroot "$1" /usr/local/bin/amqpkit-node /usr/lib/rabbitmq/bin/rabbitmq-server' \
      sh "$ROOT" "$STATE" </dev/null >"$STATE/node/log/console.log" 2>&1 9>&- &  # 9: the lock stays here
    pid=$!
    printf '%s\n' "$pid" >"$STATE/pid"
    log "starting $NODE on 127.0.0.1:$AMQP_PORT (deprecated features: $DEPRECATED)"
  fi
  local deadline=$((SECONDS + TIMEOUT))
  # Poll the bare port (a connect and close leaves nothing in the node's log),
  # then check once that AMQP is answered; the listener opens late in the boot.
  until port_taken "$AMQP_PORT" && amqp_ready; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$STATE/node/log/console.log" "$STATE/node/log/rabbit.log" >&2 2>/dev/null || true
      rm -f "$STATE/pid"
      die "$NODE exited during start (logs above; a crash dump, if any, is in $STATE/node/crash)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$STATE/node/log/rabbit.log" >&2 2>/dev/null || true
      die "$NODE did not accept AMQP within ${TIMEOUT}s (it is left running; '$0 down' stops it)"
    fi
    sleep 0.2  # polling a port: there is nothing to wait on instead
  done
  log "ready: $NODE accepts AMQP on 127.0.0.1:$AMQP_PORT"
}

cmd_down() {
  need_root
  lock_instance
  local pid
  if ! pid="$(node_pid)"; then
    rm -f "$STATE/pid"
    log "$NODE is not running"
    return 0
  fi
  RABBITMQ4_INSTANCE="$INSTANCE" timeout 60 "$SCRIPT" ctl stop >/dev/null 2>&1 ||
    log "rabbitmqctl stop failed; killing $NODE"
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.2  # waiting for a process that is not our child to exit
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true  # --kill-child takes the whole namespace with it
  fi
  rm -f "$STATE/pid"
  log "stopped $NODE"
}

cmd_ctl() {
  need_root
  root_ready || die "no root yet: run '$0 up' first"
  [ -f "$STATE/node/etc/node.env" ] || die "$NODE was never started: run '$0 up' first"
  exec unshare --mount --pid --fork --kill-child=SIGKILL --propagation private \
    sh -c 'root="$1" state="$2"; shift 2
           mount --bind "$state/node" "$root/srv/node" && mount -t proc proc "$root/proc" &&
           exec chroot "$root" /usr/local/bin/amqpkit-node /usr/lib/rabbitmq/bin/rabbitmqctl "$@"' \
    sh "$ROOT" "$STATE" "$@"
}

cmd_status() {
  local pid
  if pid="$(node_pid)"; then
    load_settings
    if amqp_ready; then
      echo "running: $NODE, AMQP on 127.0.0.1:$AMQP_PORT, deprecated features $DEPRECATED (pid $pid)"
    else
      echo "starting: $NODE (pid $pid), AMQP on 127.0.0.1:$AMQP_PORT not answering yet"
    fi
    return 0
  fi
  echo "stopped"
  return 3
}

cmd_logs() {
  local file="$STATE/node/log/rabbit.log"
  [ -f "$file" ] || die "no log yet ($file)"
  if [ "${1:-}" = "-f" ]; then
    exec tail -n +1 -f "$file"
  fi
  cat "$file"
}

cmd_env() {
  load_settings
  local ctl
  ctl="$(printf '%q' "$SCRIPT") ctl"  # a command line: split it with shlex.split
  [ "$INSTANCE" = rabbit4 ] || ctl="env RABBITMQ4_INSTANCE=$INSTANCE $ctl"
  printf 'export AMQP_URL=%q\n' "$URL"
  printf 'export AMQPKIT_RABBITMQCTL=%q\n' "$ctl"
}

usage() {
  sed -n '/^#   scripts\/rabbitmq4.sh up/,/^#   scripts\/rabbitmq4.sh ctl/p' "$SCRIPT" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  url) load_settings && echo "$URL" ;;
  env) cmd_env ;;
  logs) shift; cmd_logs "$@" ;;
  ctl) shift; cmd_ctl "$@" ;;
  *) usage ;;
esac
