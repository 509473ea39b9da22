#!/usr/bin/env bash
# Install everything memcachefs needs on a fresh Debian/Ubuntu machine (as root):
# FUSE 3 and the build tools for pyfuse3, a virtualenv in .venv, the package.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for pkg in fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    echo "==> installing system packages (fuse3, libfuse3-dev, pkg-config, gcc, python3-dev, python3-venv)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "==> creating the virtualenv .venv"
    python3 -m venv .venv
fi
echo "==> installing memcachefs and its test tools into .venv"
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q -e ".[test,dev]"
