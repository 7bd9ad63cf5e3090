#!/usr/bin/env bash
# Make sure a PostgreSQL answers for the outbox/inbox tests, found the way setup.sh finds RabbitMQ:
#
#   1. POSTGRES_URL when set (nothing is started; it must answer);
#   2. a server answering on 127.0.0.1:5432 (database `test`, created when missing; trust auth);
#   3. Debian's postgresql, installed when missing and started, when we are root (trust auth for
#      127.0.0.1, database `test`);
#   4. else fail, saying how to start one.
#
# Prints nothing on stdout; progress goes to stderr as "[postgres] ...". Exit 0 when one answers.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[postgres] %s\n' "$*" >&2; }

HOW="start PostgreSQL on 127.0.0.1:5432 with a database 'test' that user postgres reaches without a password \
(Debian, as root: apt-get install postgresql, then add 'host all all 127.0.0.1/32 trust' to pg_hba.conf), \
or set POSTGRES_URL=postgresql://USER@HOST:PORT/DB"

port_open() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

# Connects to the URL and runs one query (asyncpg from .venv when there, else psql).
answers() {
  local url=$1
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import asyncpg' 2>/dev/null; then
    .venv/bin/python - "$url" <<'PY' 2>/dev/null
import asyncio, sys
import asyncpg
async def main() -> None:
    conn = await asyncpg.connect(sys.argv[1], timeout=5)
    await conn.fetchval("SELECT 1")
    await conn.close()
asyncio.run(main())
PY
  elif command -v psql >/dev/null 2>&1; then
    psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1
  else
    return 1
  fi
}

LOCAL=postgresql://postgres@127.0.0.1:5432/test
ADMIN=postgresql://postgres@127.0.0.1:5432/postgres

as_postgres() {
  if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}

ensure_test_db() {
  if answers "$LOCAL"; then
    return 0
  fi
  if answers "$ADMIN" && command -v psql >/dev/null 2>&1; then
    log "creating database 'test'"
    psql "$ADMIN" -qc 'CREATE DATABASE test' >/dev/null
    answers "$LOCAL"
    return
  fi
  return 1
}

trust_local() {
  # Trust auth for TCP from 127.0.0.1 (a test machine's server; never do this on a shared host).
  local hba
  hba=$(as_postgres "psql -Atqc 'SHOW hba_file'" 2>/dev/null || true)
  if [ -n "$hba" ] && [ -f "$hba" ] && ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    log "trusting 127.0.0.1 in $hba"
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    as_postgres "psql -qc 'SELECT pg_reload_conf()'" >/dev/null
  fi
  if ! as_postgres "psql -Atqc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" | grep -q 1; then
    log "creating database 'test'"
    as_postgres "psql -qc 'CREATE DATABASE test'" >/dev/null
  fi
}

wait_for_port() {
  local i
  for i in $(seq 1 60); do
    port_open 127.0.0.1 5432 && return 0
    sleep 1
  done
  return 1
}

if [ -n "${POSTGRES_URL:-}" ]; then
  if answers "$POSTGRES_URL"; then
    log "using POSTGRES_URL (not starting a server)"
    exit 0
  fi
  log "POSTGRES_URL is set but does not answer; $HOW"
  exit 1
fi

if port_open 127.0.0.1 5432; then
  if ensure_test_db; then
    log "PostgreSQL answers on 127.0.0.1:5432 (database test)"
    exit 0
  fi
  if [ "$(id -u)" = 0 ]; then
    trust_local
    if answers "$LOCAL"; then
      log "PostgreSQL answers on 127.0.0.1:5432 (database test)"
      exit 0
    fi
  fi
  log "a server answers on 127.0.0.1:5432 but not as postgresql://postgres@127.0.0.1:5432/test; $HOW"
  exit 1
fi

if [ "$(id -u)" != 0 ]; then
  log "no PostgreSQL on 127.0.0.1:5432; $HOW"
  exit 1
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "no PostgreSQL and no apt-get to install it; $HOW"
    exit 1
  fi
  log "installing postgresql from Debian's archive"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

version=$(ls /etc/postgresql | sort -V | tail -1)
cluster=$(ls "/etc/postgresql/$version" | head -1)
log "starting PostgreSQL $version/$cluster"
pg_ctlcluster "$version" "$cluster" start 2>/dev/null || true
if ! wait_for_port; then
  log "PostgreSQL $version/$cluster did not open 127.0.0.1:5432; $HOW"
  exit 1
fi
trust_local
if answers "$LOCAL"; then
  log "PostgreSQL answers on 127.0.0.1:5432 (database test)"
  exit 0
fi
log "PostgreSQL started but postgresql://postgres@127.0.0.1:5432/test does not answer; $HOW"
exit 1
