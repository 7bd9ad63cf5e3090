#!/usr/bin/env bash
# The soak: amqpkit under a steady mixed load (pub/sub to 3 subscribers, a work queue whose tasks fail
# 20 % of the time, RPC at 50/s) with a fault every ~30 s, then a ledger by message id.
#
#   bash scripts/soak.sh [--minutes N | --seconds N] [--out FILE] [--url URL --ctl-node NODE] [--help]
#
# By default it starts a RabbitMQ node of its own (own name, ports, folders and cookie, in a temp folder)
# so whole-broker faults hit only that node, and stops it at the end, also on failure or Ctrl-C.
# Prints the ledger as JSON, writes it to --out (default docs/reliability/soak-<timestamp>.json), and
# exits 1 if anything was lost or unaccounted for (2: could not be set up; 130: interrupted).
set -euo pipefail
here=$(pwd)
cd "$(dirname "$0")/.."
root=$(pwd)

if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi

workdir=""
for arg in "$@"; do
  case "$arg" in --workdir|--workdir=*) workdir=keep ;; esac
done
if [ -z "$workdir" ]; then
  workdir=$(mktemp -d "${TMPDIR:-/tmp}/amqpkit-soak.XXXXXX")
  export SOAK_WORKDIR_MADE="$workdir"
  set -- --workdir "$workdir" "$@"
fi

# The net under the soak's own clean-up: if the Python side died without stopping what it started
# (SIGKILL, a crash), stop its node and its workers here.
cleanup() {
  local code=$?
  if [ "$workdir" != keep ] && [ -d "$workdir" ]; then
    for pidfile in "$workdir"/pids/*; do
      [ -e "$pidfile" ] || continue
      kill -KILL "$(basename "$pidfile")" 2>/dev/null || true
    done
    if [ -f "$workdir/node/started-by" ]; then
      node=$(sed -n 2p "$workdir/node/started-by")
      if HOME="$workdir/node/home" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$node" -q ping >/dev/null 2>&1; then
        echo "[soak] stopping leftover node $node" >&2
        HOME="$workdir/node/home" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$node" stop >/dev/null 2>&1 || true
      fi
    fi
    rmdir "$workdir" 2>/dev/null || true  # left empty (--help, a bad option)
  fi
  exit "$code"
}
trap cleanup EXIT

# From the caller's folder (relative paths stay theirs); -P keeps that folder off sys.path, so amqpkit is
# the installed one, or the one PYTHONPATH names.
cd "$here"
PYTHONPATH="$root/scripts${PYTHONPATH:+:$PYTHONPATH}" "$root/.venv/bin/python" -P -m soak "$@"
