"""A minimal reference FUSE filesystem: ONE file served from ONE in-memory buffer.

The FUSE transport ceiling for a pyfuse3 + trio daemon on this machine: it does
nothing but answer READ with a memoryview slice of a bytearray (no copies, no
lookups), with the same mount options and kernel readahead as memcachefs.

    python benchmarks/reference_fs.py MOUNTPOINT --size 1G [--name data.bin]
        [--from-file PATH] [--read-ahead-kb 1024] [--keep-cache]

It prints ``ready <major:minor> read_ahead_kb=<n>`` on stdout once the mount
serves requests (or ``error: ...`` and exits 2), and unmounts on SIGTERM/SIGINT.
The xattr ``user.reference.stats`` of the root counts the READs it answered.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import fill_buffer
from memcachefs import mounts
from memcachefs.config import parse_size

FILE_INODE = pyfuse3.ROOT_INODE + 1
STATS_XATTR = b"user.reference.stats"  # {"reads": n, "read_bytes": n} on the root


class ReferenceFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, name: bytes, data: bytearray, *, keep_cache: bool) -> None:
        super().__init__()
        self.name = name
        self.view = memoryview(data)
        self.size = len(data)
        self.keep_cache = keep_cache
        self.uid, self.gid = os.getuid(), os.getgid()
        self.reads = 0
        self.read_bytes = 0

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = 300
        entry.attr_timeout = 300
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
        else:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            entry.st_size = self.size
            entry.st_blocks = (self.size + 511) // 512
        entry.st_blksize = 4 * 1024 * 1024
        entry.st_uid, entry.st_gid = self.uid, self.gid
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = 1_700_000_000 * 10**9
        return entry

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.keep_cache)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.reads += 1
        chunk = self.view[off : off + size]
        self.read_bytes += len(chunk)
        return chunk  # type: ignore[return-value]  # pyfuse3 takes any contiguous buffer

    async def release(self, fh: int) -> None:
        return None

    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            return json.dumps({"reads": self.reads, "read_bytes": self.read_bytes}).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def _read_ahead(mountpoint: str, kib: int) -> tuple[str, str]:
    """Set the mount's kernel readahead; (its device, the value now in effect)."""
    entry = mounts.find_mount(mountpoint)
    if entry is None:
        return "?", "?"
    if kib:
        mounts.set_read_ahead(entry.device, kib)
    with contextlib.suppress(OSError):
        return entry.device, (
            Path("/sys/class/bdi") / entry.device / "read_ahead_kb"
        ).read_text().strip()
    return entry.device, "?"


async def _serve(mountpoint: str, read_ahead_kib: int) -> None:
    async with trio.open_nursery() as nursery:

        async def announce() -> None:
            await trio.to_thread.run_sync(os.stat, mountpoint)  # answered once INIT is done
            device, actual = await trio.to_thread.run_sync(_read_ahead, mountpoint, read_ahead_kib)
            print(f"ready {device} read_ahead_kb={actual}", flush=True)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(announce)
        nursery.start_soon(stop_on_signal)
        try:
            await pyfuse3.main()
        finally:
            nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--size", default="1G", help="file size (1024-based K/M/G suffixes)")
    parser.add_argument("--name", default="data.bin", help="the file's name in the mount")
    parser.add_argument("--from-file", type=Path, help="serve this file's bytes (else generated)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated bytes")
    parser.add_argument("--read-ahead-kb", type=int, default=1024, help="0 keeps the default")
    parser.add_argument("--keep-cache", action="store_true", help="keep the page cache on open")
    args = parser.parse_args()

    mountpoint = os.path.abspath(args.mountpoint)
    if args.from_file:
        size = args.from_file.stat().st_size
        data = bytearray(size)
        with open(args.from_file, "rb", buffering=0) as f:
            view, done = memoryview(data), 0
            while done < size and (n := f.readinto(view[done:])):
                done += n
    else:
        data = fill_buffer(parse_size(args.size), seed=args.seed)

    fs = ReferenceFS(os.fsencode(args.name), data, keep_cache=args.keep_cache)
    # The same options memcachefs mounts with (see memcachefs.daemon.fuse_options).
    options = {"fsname=reference_fs", "subtype=reference_fs", "ro", "nosuid", "nodev"}
    options.add("default_permissions")
    try:
        pyfuse3.init(fs, mountpoint, options)
    except RuntimeError as error:
        print(f"error: cannot mount {mountpoint}: {error}", flush=True)
        return 2
    unmounted = False
    try:
        trio.run(_serve, mountpoint, args.read_ahead_kb)
        unmounted = True
    finally:
        pyfuse3.close(unmount=True if unmounted else mounts.find_mount(mountpoint) is not None)
    print(f"served {fs.reads} reads, {fs.read_bytes} bytes", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
