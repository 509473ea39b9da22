"""Shared helpers for the real-mount tests: a fault-injecting source, the CLI, polling."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import (
    DEADLINE_S,
    run_cli,
)

from memcachefs import mounts
from memcachefs.testing import faultfs
from memcachefs.testing.plugin import require_fuse

# A suite started in the background by a shell without job control inherits
# SIGINT ignored, and so would every command it starts: a test's Ctrl-C to a
# child would do nothing. Handling SIGINT here gives children the default back
# at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- a fault-injecting source ---------------------------------------------------------
@pytest.fixture
def fault_source(tmp_path: Path) -> Iterator[faultfs.FaultSource]:
    """A source directory served by memcachefs.testing.faultfs (see its docstring)."""
    require_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    path = tmp_path / "faulty"
    path.mkdir()
    with faultfs.serve(
        backing,
        path,
        stall_file=tmp_path / "faulty.stall",
        log_path=tmp_path / "faultfs.log",
        timeout_s=DEADLINE_S,
    ) as source:
        yield source


# -- mounts made through the CLI ------------------------------------------------------
@dataclass
class CliMounts:
    """Mountpoints a test mounted with `memcachefs mount`; unmounted at teardown."""

    tmp_path: Path
    mountpoints: list[Path] = field(default_factory=list)

    def track(self, mountpoint: Path) -> Path:
        self.mountpoints.append(mountpoint)
        return mountpoint

    def mount(self, source: Path, mountpoint: Path, *args: str) -> subprocess.CompletedProcess[str]:
        self.track(mountpoint)
        return run_cli(
            "mount",
            source,
            mountpoint,
            "--capacity",
            "16M",
            "--log-file",
            self.tmp_path / f"{mountpoint.name}.log",
            *args,
        )

    def cleanup(self) -> None:
        for mountpoint in self.mountpoints:
            while mounts.find_mount(mountpoint) is not None:
                run_cli("umount", mountpoint)
                if mounts.find_mount(mountpoint) is not None:
                    mounts.unmount(mountpoint, lazy=True)


@pytest.fixture
def cli_mounts(tmp_path: Path) -> Iterator[CliMounts]:
    require_fuse()
    tracked = CliMounts(tmp_path)
    try:
        yield tracked
    finally:
        tracked.cleanup()


# -- an unexpected exception inside the daemon -----------------------------------------
@pytest.fixture
def inject_into_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """`inject_into_daemon(code)`: daemons started afterwards run `code` at startup.

    Done with a sitecustomize module on PYTHONPATH, so the daemon under test is
    the real one, started the real way, with one function patched to fail.
    """

    def inject(code: str) -> None:
        directory = tmp_path / "inject"
        directory.mkdir()
        (directory / "sitecustomize.py").write_text(textwrap.dedent(code))
        existing = os.environ.get("PYTHONPATH")
        monkeypatch.setenv(
            "PYTHONPATH", str(directory) + (os.pathsep + existing if existing else "")
        )

    return inject
