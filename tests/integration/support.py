"""Helpers shared by the real-mount tests: polling with a deadline, the CLI, the page cache.

Imported by name (`from support import ...`): a conftest module is not
importable reliably when unit and integration tests run together.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from memcachefs import mounts

T = TypeVar("T")

DEADLINE_S = 20.0
MEMCACHEFS = [sys.executable, "-m", "memcachefs"]


def wait_until(
    predicate: Callable[[], T], what: str, timeout_s: float = DEADLINE_S, interval_s: float = 0.02
) -> T:
    """Poll `predicate` until it returns something truthy; fail after a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def drop_page_cache(path: Path) -> None:
    """Drop the kernel page cache of one file, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mount_options(path: Path) -> set[str]:
    """The per-mount options of `path` (field 6 of /proc/self/mountinfo)."""
    target = str(path.absolute())
    found: set[str] | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if mounts._unescape(fields[4]) == target:
                found = set(fields[5].split(","))
    assert found is not None, f"{path} is not mounted"
    return found


def run_cli(*args: str | Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`memcachefs ARGS` as a user runs it."""
    return subprocess.run(
        [*MEMCACHEFS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@contextlib.contextmanager
def in_thread(function: Callable[[], T]) -> Iterator[Callable[[float], T]]:
    """Run `function` in a thread; yields `result(timeout_s)` (fails on a deadline)."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("ok", function()))
        except BaseException as error:
            outcome.append(("error", error))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def result(timeout_s: float = DEADLINE_S) -> T:
        thread.join(timeout_s)
        if thread.is_alive():
            pytest.fail(f"{function} did not finish within {timeout_s:.0f}s")
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value  # type: ignore[no-any-return]

    yield result
    thread.join(DEADLINE_S)
