#!/usr/bin/env bash
# Quick start: install everything, then mount memcachefs over a demo source of
# model-like files, read it twice (cold, then from memory) and unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/python examples/demo.py "$@"
