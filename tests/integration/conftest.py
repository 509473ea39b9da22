"""Shared helpers for the real-mount tests: a fault-injecting source, the CLI, polling."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import (
    DEADLINE_S,
    run_cli,
    wait_until,
)

from memcachefs import mounts
from memcachefs.testing.plugin import require_fuse


# -- a fault-injecting source ---------------------------------------------------------
@dataclass
class FaultSource:
    """A faultfs mount over `backing`: use `path` as memcachefs's source."""

    backing: Path
    path: Path
    stall_file: Path
    process: subprocess.Popen[bytes]

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """Every request to the source waits while inside this block."""
        self.stall_file.touch()
        try:
            yield
        finally:
            self.stall_file.unlink(missing_ok=True)


@pytest.fixture
def fault_source(tmp_path: Path) -> Iterator[FaultSource]:
    """A source directory served by memcachefs.testing.faultfs (see its docstring)."""
    require_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    path = tmp_path / "faulty"
    path.mkdir()
    stall_file = tmp_path / "faulty.stall"
    log = open(tmp_path / "faultfs.log", "wb")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memcachefs.testing.faultfs",
            str(backing),
            str(path),
            "--stall-file",
            str(stall_file),
        ],
        stdout=log,
        stderr=log,
    )
    source = FaultSource(backing, path, stall_file, process)
    try:
        wait_until(
            lambda: process.poll() is not None or mounts.find_mount(path) is not None,
            "faultfs to mount",
        )
        assert process.poll() is None, (tmp_path / "faultfs.log").read_text()
        yield source
    finally:
        stall_file.unlink(missing_ok=True)
        if mounts.find_mount(path) is not None:
            with contextlib.suppress(OSError):
                mounts.unmount(path)
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


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
