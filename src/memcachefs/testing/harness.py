"""Start a real memcachefs daemon on a directory and stop it cleanly.

The daemon runs as its own process (exactly as `memcachefs mount` starts it),
so a test or benchmark sees the kernel, the FUSE transport and the daemon
together. Every mount remembers its log: `problems()` lists the warnings,
errors and tracebacks the daemon wrote, which the pytest fixture turns into a
failure unless the test said it expected them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from memcachefs import mounts
from memcachefs.cli import read_statistics, spawn_daemon

_PROBLEM_RE = re.compile(r" (WARNING|ERROR|CRITICAL) |^Traceback ")


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM a child we started, SIGKILL it if it does not exit, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fuse_available() -> str | None:
    """None when this process can mount FUSE filesystems, else why not."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as error:
        return f"/dev/fuse is not usable: {error.strerror}"
    return None


class MountedFS:
    """A running memcachefs mount: its paths, its daemon and its log."""

    def __init__(
        self,
        source: Path,
        path: Path,
        process: subprocess.Popen[bytes],
        log_path: Path,
        expected_log: Sequence[str] = (),
    ) -> None:
        self.source = source
        self.path = path
        self.process = process
        self.log_path = log_path
        self.expected_log = [re.compile(pattern) for pattern in expected_log]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def mounted(self) -> bool:
        return mounts.find_mount(self.path) is not None

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The daemon's statistics (what `memcachefs stats --json` prints)."""
        return read_statistics(self.path, timeout_s=timeout_s)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 30.0) -> int:
        """Wait for the daemon to exit; its exit status."""
        return self.process.wait(timeout=timeout_s)

    def unmount(self, timeout_s: float = 30.0) -> int | None:
        """Unmount (as `memcachefs umount` does) and wait for the daemon to exit.

        Returns the daemon's exit status; None if it had to be killed.
        """
        if self.mounted:
            try:
                mounts.unmount(self.path)
            except OSError:
                mounts.unmount(self.path, lazy=True)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def problems(self) -> list[str]:
        """Log lines with a warning, an error or a traceback that were not expected."""
        return [
            line
            for line in self.log_text().splitlines()
            if _PROBLEM_RE.search(line)
            and not any(pattern.search(line) for pattern in self.expected_log)
        ]


def mount(
    source: Path,
    mountpoint: Path,
    *,
    capacity: str = "256M",
    args: Iterable[str] = (),
    log_path: Path | None = None,
    expected_log: Sequence[str] = (),
    ready_timeout_s: float = 60.0,
) -> MountedFS:
    """Mount memcachefs over `source` at `mountpoint`; returns once it serves.

    `args` are extra `memcachefs mount` options (``["--block-size", "1M"]``).
    Raises RuntimeError with the daemon's own message if it cannot mount.
    """
    source, mountpoint = Path(source).absolute(), Path(mountpoint).absolute()
    log_path = log_path or mountpoint.with_name(mountpoint.name + ".log")
    argv = [
        "mount",
        str(source),
        str(mountpoint),
        "--foreground",
        "--capacity",
        capacity,
        *args,
    ]
    started = time.monotonic()
    process, outcome = spawn_daemon(argv, log_path, timeout_s=ready_timeout_s)
    if outcome != "ok":
        if process.poll() is None:
            process.kill()
        process.wait()
        raise RuntimeError(
            f"memcachefs did not mount {mountpoint} after {time.monotonic() - started:.1f}s: "
            f"{outcome.removeprefix('error: ')} (log: {log_path})"
        )
    return MountedFS(source, mountpoint, process, log_path, expected_log)
