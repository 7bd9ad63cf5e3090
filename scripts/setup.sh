#!/usr/bin/env bash
# Set-up shared by the quick-start commands and CI: a virtualenv with amqpkit
# and its test extras in .venv, and a RabbitMQ broker answering.
#
# The broker, in this order: AMQP_URL when set (nothing is started); a broker
# already answering on 127.0.0.1:5672; Docker Compose when a Docker engine
# answers; a local rabbitmq-server (installed from Debian's archive when it is
# missing and we are root).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

port_open() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_for_broker() {
  local i
  for i in $(seq 1 120); do
    if port_open 127.0.0.1 5672; then
      # The port opens before the node accepts AMQP; await_startup waits for that.
      if command -v rabbitmqctl >/dev/null 2>&1; then
        rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || true
      fi
      return 0
    fi
    sleep 1
  done
  log "RabbitMQ did not answer on 127.0.0.1:5672 within 120 s"
  return 1
}

ensure_broker() {
  if [ -n "${AMQP_URL:-}" ]; then
    log "using AMQP_URL (not starting a broker)"
    return 0
  fi
  if port_open 127.0.0.1 5672; then
    log "RabbitMQ answers on 127.0.0.1:5672"
    return 0
  fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    log "starting RabbitMQ with Docker Compose"
    docker compose up -d --wait rabbitmq
    wait_for_broker
    return
  fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      log "installing rabbitmq-server from Debian's archive"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    else
      log "no broker: install RabbitMQ (apt-get install rabbitmq-server), run 'docker compose up -d', or set AMQP_URL"
      return 1
    fi
  fi
  log "starting rabbitmq-server"
  # A node that fails to start writes an Erlang crash dump; keep it out of the checkout.
  ERL_CRASH_DUMP="${TMPDIR:-/tmp}/amqpkit-rabbitmq-erl_crash.dump" rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for_broker
}

ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  local stamp=.venv/.amqpkit-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing amqpkit, its test and dev extras (pytest, ruff, mypy) into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev,test,plot,bench,shop]'
    touch "$stamp"
  fi
}

ensure_venv
ensure_broker
# PostgreSQL for the outbox/inbox tests: POSTGRES_URL, the local server, or Debian's, installed when root.
bash scripts/ensure_postgres.sh
