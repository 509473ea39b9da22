"""Which blocks of a mounted file the kernel's page cache holds, asked by a child process.

The question needs an open of the file through the mount: a FUSE request to
this daemon. Asked from one of the daemon's own threads, a SIGKILL that arrives
while that open waits for its answer leaves the thread unkillable in the kernel
(nobody will answer); the daemon never exits, its /dev/fuse stays open, and the
mount hangs every access instead of failing with ENOTCONN. A child process asks
instead: the daemon's death closes /dev/fuse, which fails the child's open, and
the child exits at the end of its stdin.

Requests and answers are JSON lines: ``[path, inode, size_bytes, block_size_bytes]``
and the sorted block indexes, or null (cannot tell).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import subprocess
import sys
import threading
from typing import IO

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# cachestat(2), Linux 6.5+: 451 on x86_64 and aarch64 (the unified syscall table).
_CACHESTAT = 451 if platform.machine() in ("x86_64", "aarch64") else None
_libc = ctypes.CDLL(None, use_errno=True)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


def resident_blocks(
    path: str | os.PathLike[str], inode: int, size_bytes: int, block_size_bytes: int
) -> set[int] | None:
    """Indexes of the blocks of `path` wholly in the page cache (None: cannot tell).

    None too when `path` is no longer `inode` (the file changed: another version's
    pages say nothing about this one's). Blocking: an open and one syscall per block.
    """
    if _CACHESTAT is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_ino != inode:
            return None
        resident = set()
        span = _CachestatRange()
        stat = _Cachestat()
        for index in range((size_bytes + block_size_bytes - 1) // block_size_bytes):
            span.off = index * block_size_bytes
            span.len = min(block_size_bytes, size_bytes - span.off)
            if _libc.syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
                return None  # ENOSYS: an older kernel
            if stat.nr_cache >= -(-span.len // _PAGE_BYTES):
                resident.add(index)
        return resident
    finally:
        os.close(fd)


class ResidencyProbe:
    """The daemon's side: one child, started at the first question, asked in turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def resident_blocks(
        self, path: str | os.PathLike[str], inode: int, size_bytes: int, block_size_bytes: int
    ) -> set[int] | None:
        """As `resident_blocks`, asked of the child (blocking: from a worker thread)."""
        request = json.dumps([os.fspath(path), inode, size_bytes, block_size_bytes]) + "\n"
        with self._lock:
            try:
                process = self._started()
                stdin, stdout = _pipes(process)
                stdin.write(request.encode())
                stdin.flush()
                answer = stdout.readline()
            except OSError:
                answer = b""
            if not answer:  # the child is gone (or was killed by close)
                if self._process is not None:
                    _end(self._process)
                    self._process = None
                return None
        found = json.loads(answer)
        return None if found is None else set(found)

    def close(self) -> None:
        """End the child (blocking: it may first need the answer to an open)."""
        if self._process is not None:
            _end(self._process)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            if self._process is not None:
                _end(self._process)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "memcachefs.residency"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,  # not /dev/fuse: the daemon's death must end the mount
            )
        return self._process


def _end(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def _pipes(process: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
    assert process.stdin is not None and process.stdout is not None
    return process.stdin, process.stdout


def main() -> None:
    try:
        for line in sys.stdin.buffer:
            path, inode, size_bytes, block_size_bytes = json.loads(line)
            found = resident_blocks(path, inode, size_bytes, block_size_bytes)
            sys.stdout.write(json.dumps(None if found is None else sorted(found)) + "\n")
            sys.stdout.flush()
    except BrokenPipeError:  # the daemon is gone (killed): nothing to answer
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
