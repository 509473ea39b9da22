"""Issue 7, item 6: examples/entrypoint.sh mounts, waits for /ready and execs the model
server (a stand-in that checks the mount and exits 0)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port, run_cli

from memcachefs import mounts

pytestmark = pytest.mark.fuse

ENTRYPOINT = Path(__file__).parents[2] / "examples" / "entrypoint.sh"

STAND_IN = """\
import json, os, sys, urllib.request
mountpoint = sys.argv[1]
assert open(os.path.join(mountpoint, "model.bin"), "rb").read() == b"m" * 4096
port = os.environ["MEMCACHEFS_HTTP_ADDRESS"].rsplit(":", 1)[1]
with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as reply:
    assert json.load(reply)["ready"] is True
print("server ran with pid", os.getpid())
"""


def test_entrypoint_mounts_waits_and_execs_the_server(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "data-slow", tmp_path / "data-fast"
    source.mkdir()
    (source / "model.bin").write_bytes(b"m" * 4096)
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "memcachefs"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m memcachefs "$@"\n')
    shim.chmod(0o755)
    server = tmp_path / "server.py"
    server.write_text(STAND_IN)
    env = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "SOURCE": str(source),
        "MOUNTPOINT": str(mountpoint),
        "MEMCACHEFS_CAPACITY": "64M",
        "MEMCACHEFS_HTTP_ADDRESS": f"127.0.0.1:{free_port()}",
        "MEMCACHEFS_LOG_FILE": str(tmp_path / "daemon.log"),
        "READY_TIMEOUT_S": "30",
    }
    try:
        result = subprocess.run(
            [str(ENTRYPOINT), sys.executable, str(server), str(mountpoint)],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "server ran" in result.stdout
        assert mounts.find_mount(mountpoint) is not None  # the daemon outlives the exec
    finally:
        if mounts.find_mount(mountpoint) is not None:
            run_cli("umount", mountpoint)


def test_entrypoint_without_a_command_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ENTRYPOINT)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
