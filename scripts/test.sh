#!/usr/bin/env bash
# Quick start, part 2: set everything up, then run the whole test suite against the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
