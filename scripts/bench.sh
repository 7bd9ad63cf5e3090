#!/usr/bin/env bash
# Quick start, part 1: set everything up, then run amqpkit's main job against the local broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if .venv/bin/amqpkit bench --help >/dev/null 2>&1; then
  exec .venv/bin/amqpkit bench "$@"
fi
# Until `amqpkit bench` lands, check the broker instead.
exec .venv/bin/amqpkit check "$@"
