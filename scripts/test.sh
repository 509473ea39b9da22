#!/usr/bin/env bash
# Install everything, then run the whole test suite (lint, types, unit, real mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
echo "==> ruff"
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/ruff format --check src tests benchmarks examples
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
export MEMCACHEFS_REQUIRE_FUSE=1  # here a skipped mount test is a failure
exec .venv/bin/pytest "$@"
