"""A read-only passthrough FUSE filesystem that injects source faults, for tests.

    python -m memcachefs.testing.faultfs SRC MNT [--stall-file PATH]

mirrors SRC at MNT (read-only, no caching: attributes time out at once and
file reads bypass the page cache), with two faults a test controls:

- a read of a file whose name contains ``.eio`` fails with EIO;
- a handle of a file whose name contains ``.serial`` serves one read at a
  time, each taking at least 20 ms, as a FUSE client of object storage with
  one stream per handle does (rclone without its cache); the file's xattr
  ``user.faultfs.most_reads_at_once`` says how many of its reads, over all
  its handles, ran at once at most;
- while the stall file exists (default: SRC's sibling ``SRC.stall``), every
  request waits until it is removed, FLUSH (sent by every close(2)) included:
  a frozen network source.

It stands in for the slow directory under memcachefs. Its inode numbers are
its own, one per file of SRC as on a local filesystem (a file replaced by
rename gets a new one), and the attributes of an open file are those of the
file it opened (fstat), not of whatever its name points to now. Stop it with
SIGTERM/SIGINT or by unmounting MNT; `serve` starts it as a child process for
tests and benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from memcachefs import mounts
from memcachefs.testing.harness import stop_process

EIO_MARKER = b".eio"
SERIAL_MARKER = b".serial"
SERIAL_READ_S = 0.02
MOST_READS_XATTR = b"user.faultfs.most_reads_at_once"
_POLL_S = 0.02


class FaultFS(pyfuse3.Operations):
    def __init__(self, root: str, stall_file: str) -> None:
        super().__init__()
        self._root = os.fsencode(os.path.abspath(root))
        self._stall_file = stall_file
        self._paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: self._root}
        self._backing: dict[int, int] = {pyfuse3.ROOT_INODE: os.lstat(self._root).st_ino}
        # (path, the backing file's inode number): a replaced file is another inode
        self._inodes: dict[tuple[bytes, int], int] = {
            (self._root, os.lstat(self._root).st_ino): pyfuse3.ROOT_INODE
        }
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._fds: dict[int, int] = {}
        self._handle_locks: dict[int, trio.Lock] = {}  # of .serial files' handles
        self._reads_at_once: dict[int, int] = {}  # per inode of a .serial file
        self._most_reads_at_once: dict[int, int] = {}

    # -- faults ----------------------------------------------------------------
    async def _gate(self) -> None:
        # Polling a file on purpose: the test's create/remove takes effect for
        # the very next request, with no signalling protocol to get wrong.
        while os.path.exists(self._stall_file):  # noqa: ASYNC110, ASYNC240
            await trio.sleep(_POLL_S)

    # -- helpers ---------------------------------------------------------------
    def _path(self, inode: int) -> bytes:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _inode(self, path: bytes, backing_ino: int) -> int:
        inode = self._inodes.get((path, backing_ino))
        if inode is None:
            inode = self._inodes[path, backing_ino] = self._next_inode
            self._backing[inode] = backing_ino
            self._paths[inode] = path
            self._next_inode += 1
        return inode

    def _attributes(self, path: bytes, fd: int | None = None) -> pyfuse3.EntryAttributes:
        """Attributes of `path`, or of the file open as `fd` (which `path` named)."""
        try:
            st = os.lstat(path) if fd is None else os.fstat(fd)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._inode(path, st.st_ino)
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
            setattr(entry, field, getattr(st, field))
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    # -- metadata ----------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._gate()
        return self._attributes(os.path.join(self._path(parent_inode), name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._gate()
        # An open file answers for itself, as fstat(2) on a local filesystem does.
        fd = next((fd for fd, open_inode in self._fds.items() if open_inode == inode), None)
        return self._attributes(self._path(inode), fd)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self._gate()
        try:
            return os.readlink(self._path(inode))
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._gate()
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._gate()
        directory = self._path(fh)
        try:
            names = sorted(os.listdir(directory))
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        for position in range(start_id, len(names)):
            try:
                attributes = self._attributes(os.path.join(directory, names[position]))
            except pyfuse3.FUSEError:
                continue  # vanished meanwhile
            if not pyfuse3.readdir_reply(token, names[position], attributes, position + 1):
                break

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await self._gate()
        vfs = os.statvfs(self._root)
        data = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, field, getattr(vfs, field))
        return data

    # -- files -------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self._gate()
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self._path(inode)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        st = os.fstat(fd)
        if st.st_ino != self._backing.get(inode):
            # The name points to another file since the kernel looked it up: as NFS
            # does, ESTALE (the kernel looks the name up again and retries).
            os.close(fd)
            raise pyfuse3.FUSEError(errno.ESTALE)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise pyfuse3.FUSEError(errno.EINVAL)
        self._fds[fd] = inode
        # direct_io: every read reaches this process, so faults are never masked.
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self._gate()
        inode = self._fds[fh]
        name = os.path.basename(self._path(inode))
        if EIO_MARKER in name:
            raise pyfuse3.FUSEError(errno.EIO)
        if SERIAL_MARKER in name:
            async with self._handle_locks.setdefault(fh, trio.Lock()):
                return await self._counted_slow_read(inode, fh, size, off)
        return _pread(fh, size, off)

    async def _counted_slow_read(self, inode: int, fh: int, size: int, off: int) -> bytes:
        at_once = self._reads_at_once[inode] = self._reads_at_once.get(inode, 0) + 1
        self._most_reads_at_once[inode] = max(at_once, self._most_reads_at_once.get(inode, 0))
        try:
            await trio.sleep(SERIAL_READ_S)
            return _pread(fh, size, off)
        finally:
            self._reads_at_once[inode] -= 1

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == MOST_READS_XATTR and inode in self._most_reads_at_once:
            return b"%d" % self._most_reads_at_once[inode]
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def flush(self, fh: int) -> None:
        # As a network FUSE client does at close(2): a stalled source stalls the close.
        await self._gate()

    async def release(self, fh: int) -> None:
        self._handle_locks.pop(fh, None)
        if self._fds.pop(fh, None) is not None:
            os.close(fh)


def _pread(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as error:
        raise pyfuse3.FUSEError(error.errno or errno.EIO) from None


async def _serve_until_signalled() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


# -- run as a child process ----------------------------------------------------------
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


@contextlib.contextmanager
def serve(
    backing: Path, path: Path, *, stall_file: Path, log_path: Path, timeout_s: float = 20.0
) -> Iterator[FaultSource]:
    """faultfs mirroring `backing` at `path` (an empty directory) while in the block.

    Raises RuntimeError with its log if it does not mount within `timeout_s`. At the
    end the stall is lifted, `path` unmounted and the process stopped (killed if it
    has not exited after `timeout_s`).
    """
    with open(log_path, "ab") as log:
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
    try:
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and mounts.find_mount(path) is None:
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        if process.poll() is not None or mounts.find_mount(path) is None:
            raise RuntimeError(f"faultfs did not mount {path}: {log_path.read_text()[-2000:]}")
        yield FaultSource(backing, path, stall_file, process)
    finally:
        stall_file.unlink(missing_ok=True)
        if mounts.find_mount(path) is not None:
            with contextlib.suppress(OSError):
                mounts.unmount(path)
        stop_process(process, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faultfs", description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--stall-file", help="every request waits while this file exists")
    args = parser.parse_args(argv)
    source = os.path.abspath(args.source)
    stall_file = args.stall_file or source.rstrip("/") + ".stall"
    fs = FaultFS(source, stall_file)
    options = {"fsname=faultfs", "subtype=faultfs", "ro", "default_permissions"}
    pyfuse3.init(fs, args.mountpoint, options)
    try:
        trio.run(_serve_until_signalled)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
