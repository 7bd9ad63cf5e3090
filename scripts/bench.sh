#!/usr/bin/env bash
# Quick start, part 1: set everything up, then run amqpkit's main job against the local broker:
# RPC against one-way messaging, side by side. Extra arguments go to `amqpkit bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/amqpkit bench "$@"
