"""The pyfuse3 adapter: kernel requests onto the metadata cache and the loader.

Kept thin on purpose so the filesystem can be driven without a kernel in unit
tests. Only FUSEError leaves a handler: pyfuse3 lets any other exception end
its main loop, so `_handler` maps our errors and OSError to their errno, and
turns anything unexpected into EIO plus one log line.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from memcachefs.errors import ReadError
from memcachefs.handles import OpenFiles
from memcachefs.inodes import InodeLimit, InodeTable, InvalidateEntry
from memcachefs.keys import FileVersion, block_span
from memcachefs.metadata import MetadataCache
from memcachefs.metrics import counter, gauge
from memcachefs.pagecache import PageCachePusher
from memcachefs.source import DirectoryStream, Listing, Source, version_of

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

ReaddirReply = Callable[[Any, bytes, pyfuse3.EntryAttributes, int], bool]
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

# xattr namespaces the mount does not support (EOPNOTSUPP, left out of listxattr):
# none of them would be in effect here. The mount is nosuid (no file capabilities),
# permissions are the mode bits (default_permissions, no POSIX ACLs), and a security
# module labels a FUSE mount as a whole. Refusing them at once also lets `ls -l`
# stop asking after the first file (coreutils caches "not supported" per device),
# instead of sending two GETXATTR requests per entry.
UNSUPPORTED_XATTR_NAMESPACES = (b"security.", b"system.")


def _handler(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        fs = args[0]
        assert isinstance(fs, Filesystem)
        fs.counters.requests_in_flight += 1
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ReadError as error:
            raise pyfuse3.FUSEError(error.errno_value) from None
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except Exception:
            fs.counters.internal_errors += 1
            log.exception("internal error in %s; answered EIO", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            fs.counters.requests_in_flight -= 1
            if fs.counters.requests_in_flight == 0:
                fs.idle.set()

    return wrapper


def _read_only(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Replace a mutating operation: the mount is read-only."""

    @functools.wraps(method)
    async def refuse(*args: P.args, **kwargs: P.kwargs) -> R:
        raise pyfuse3.FUSEError(errno.EROFS)

    return refuse


@dataclass
class FilesystemStatistics:
    open_dirs: int = gauge("directory handles the kernel holds open")
    requests_in_flight: int = gauge("kernel requests being served")
    internal_errors: int = counter("handler bugs answered with EIO (each logged once)")
    inodes: int = gauge("inodes the kernel knows")


@dataclass
class OpenDir:
    inode: int
    relpath: bytes
    entries: Listing | None = None  # fetched by the first readdir
    stream: DirectoryStream | None = None  # instead, for a directory too large to cache


class Filesystem(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        source: Source,
        metadata: MetadataCache,
        files: OpenFiles,
        *,
        block_size: int,
        attr_timeout_s: float,
        root_xattrs: dict[bytes, Callable[[], bytes]] | None = None,
        readdir_reply: ReaddirReply | None = None,
        pusher: PageCachePusher | None = None,
        inode_limit: int | None = None,
        invalidate_entry: InvalidateEntry = pyfuse3.invalidate_entry,
    ) -> None:
        super().__init__()
        self._source = source
        self._metadata = metadata
        self._files = files
        self._block_size = block_size
        self._attr_timeout_s = attr_timeout_s
        self._root_xattrs = root_xattrs or {}
        self._readdir_reply = readdir_reply or pyfuse3.readdir_reply
        self._pusher = pusher
        self.inodes = InodeTable()
        self.inode_limit = InodeLimit(self.inodes, inode_limit, invalidate_entry)  # None: none
        self._dirs: dict[int, OpenDir] = {}
        self._next_dir_handle = 1
        self.counters = FilesystemStatistics()
        self.idle = trio.Event()

    # -- attributes ------------------------------------------------------------
    def _entry(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = self._attr_timeout_s
        entry.attr_timeout = self._attr_timeout_s
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = self._block_size
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        relpath = self._child(parent_inode, name)
        st = await self._lstat(relpath)
        inode = self.inodes.inode(relpath, st)
        self.inodes.looked_up(inode)
        self.inodes.touch(parent_inode)
        self.inode_limit.check()
        return self._entry(inode, st)

    async def _lstat(self, relpath: bytes) -> os.stat_result:
        """The attributes of `relpath` now; those of the version an open that raced a
        change holds, while the kernel retries that open (so both see one version)."""
        waiting = self._files.waiting(relpath)
        if waiting is not None:
            st = await self._source.fstat(waiting)
            if st is not None:
                return st
        return await self._metadata.lstat(relpath)

    @_handler
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        relpath = self._path(inode)
        try:
            st = await self._metadata.lstat(relpath)
        except FileNotFoundError:
            # Removed from the source while open: its handles read it to the end,
            # so it keeps its attributes (else the kernel fails their reads).
            pinned = await self._files.fstat_pinned(inode)
            if pinned is None:
                raise
            st = pinned
        if not self.inodes.is_same_version(inode, st):
            # The path holds another version now; this inode stays the old one
            # (its open handles read it), with the old size and mtime.
            st = self.inodes.attributes(inode) or st
        return self._entry(inode, st)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        return await self._source.readlink(self._path(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        vfs = await self._metadata.statvfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = vfs.f_bsize
        data.f_frsize = vfs.f_frsize
        data.f_blocks = vfs.f_blocks
        data.f_bfree = vfs.f_bfree
        data.f_bavail = vfs.f_bavail
        data.f_files = vfs.f_files
        data.f_ffree = vfs.f_ffree
        data.f_favail = vfs.f_favail
        data.f_namemax = vfs.f_namemax
        return data

    # -- directories -----------------------------------------------------------
    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        # The listing waits for the first readdir: opening a directory (as `memcachefs
        # stats` and the stale-mount check do) never waits for a stalled source.
        fh = self._next_dir_handle
        self._next_dir_handle += 1
        self._dirs[fh] = OpenDir(inode, self._path(inode))
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._dirs[fh]
        if handle.entries is None and handle.stream is None:
            # Sorted once by the cache and shared by every handle of this directory;
            # a directory too large for the cache is read from the source in chunks.
            handle.entries = await self._metadata.listdir(handle.relpath)
            if handle.entries is None:
                handle.stream = DirectoryStream(self._source, handle.relpath)
        if handle.stream is not None:
            first, entries = await handle.stream.entries_from(start_id)
        else:
            first, entries = 0, handle.entries or []
        prefix = handle.relpath + b"/" if handle.relpath else b""
        end = min(first + len(entries), start_id + self.inode_limit.room())
        for position in range(start_id, end):
            name, st = entries[position - first]
            inode = self.inodes.inode(prefix + name, st)
            if not self._readdir_reply(token, name, self._entry(inode, st), position + 1):
                break
            self.inodes.looked_up(inode)
        self.inodes.touch(handle.inode)
        self.inode_limit.check()

    @_handler
    async def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh, None)
        if handle is not None and handle.stream is not None:
            handle.stream.close()

    # -- files -----------------------------------------------------------------
    @_handler
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        relpath = self._path(inode)
        known = self.inodes.attributes(inode)
        expected = None if known is None else version_of(relpath, known)
        version, pinned = await self._files.pin(relpath, expected)
        if expected is not None and expected != version:
            # The source file is another version than this inode: ESTALE makes
            # the kernel look the name up again and retry the open. The version
            # found waits for that retry, so the new lookup gives its inode and
            # the retried open gets it, however often the file changes meanwhile.
            if pinned:
                self._files.keep_waiting(version)
            self._metadata.forget(relpath)
            raise pyfuse3.FUSEError(errno.ESTALE)
        # The kernel has this version's attributes (its size) for this inode,
        # and the inode never holds another version: its pages stay valid.
        if self._pusher is not None and known is not None:
            self._pusher.push(inode, version, relpath)
        return pyfuse3.FileInfo(fh=self._files.add(inode, version, pinned), keep_cache=True)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 accepts any contiguous buffer; a memoryview slice avoids a copy.
        handle = self._files[fh]
        span = block_span(off, size, handle.version.size, self._block_size)
        if not span:
            return b""
        if len(span) == 1:  # the common case: a slice of one block, no copy
            block = await self._files.block(handle, span[0], size)
            start = off - span[0] * self._block_size
            return block.view[start : start + size]  # type: ignore[return-value]
        out = bytearray()
        for index in span:
            base = index * self._block_size
            block = await self._files.block(handle, index, self._block_size)
            # Copy now: after the next await this block's buffer may be reused.
            out += block.view[max(0, off - base) : off + size - base]
        return out  # type: ignore[return-value]

    @_handler
    async def release(self, fh: int) -> None:
        self._files.release(fh)

    # flush is not implemented on purpose: ENOSYS tells the kernel not to send
    # one at every close(2) (there is nothing to flush on a read-only mount).

    # -- extended attributes ---------------------------------------------------
    @_handler
    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name in self._root_xattrs:
            return self._root_xattrs[name]()
        if name.startswith(UNSUPPORTED_XATTR_NAMESPACES):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        try:
            return await self._metadata.getxattr(self._path(inode), name)
        except OSError as error:
            if error.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_handler
    async def listxattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> Sequence[bytes]:
        names = await self._metadata.listxattr(self._path(inode))
        return [name for name in names if not name.startswith(UNSUPPORTED_XATTR_NAMESPACES)]

    # -- everything that would write -------------------------------------------
    setattr = _read_only(pyfuse3.Operations.setattr)
    mknod = _read_only(pyfuse3.Operations.mknod)
    mkdir = _read_only(pyfuse3.Operations.mkdir)
    unlink = _read_only(pyfuse3.Operations.unlink)
    rmdir = _read_only(pyfuse3.Operations.rmdir)
    symlink = _read_only(pyfuse3.Operations.symlink)
    rename = _read_only(pyfuse3.Operations.rename)
    link = _read_only(pyfuse3.Operations.link)
    write = _read_only(pyfuse3.Operations.write)
    create = _read_only(pyfuse3.Operations.create)
    setxattr = _read_only(pyfuse3.Operations.setxattr)
    removexattr = _read_only(pyfuse3.Operations.removexattr)

    # -- helpers ---------------------------------------------------------------
    def _path(self, inode: int) -> bytes:
        try:
            return self.inodes.path(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _child(self, parent: int, name: bytes) -> bytes:
        if b"/" in name or b"\0" in name:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            return self.inodes.child_path(parent, name)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def push_resident(self, version: FileVersion) -> None:
        """A warm-up made `version` resident: into the page cache, if the kernel
        holds its inode (a file never looked up gets its pages at open)."""
        inode = self.inodes.known(version.relpath)
        known = None if inode is None else self.inodes.attributes(inode)
        if self._pusher is None or inode is None or known is None:
            return
        if version_of(version.relpath, known) == version:
            self._pusher.push(inode, version)

    async def drop_pages(self, version: FileVersion) -> None:
        """Drop the kernel's cached pages of `version` (an eviction asked for)."""
        inode = self.inodes.known(version.relpath)
        if inode is None:
            return
        if self._pusher is not None:
            await self._pusher.stop(inode)  # no push may refill them meanwhile
        with contextlib.suppress(OSError):  # ENOENT: the kernel forgot it meanwhile
            # From a worker thread: the kernel may need a FUSE answer to complete it.
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)

    def add_root_xattr(self, name: bytes, value: Callable[[], bytes]) -> None:
        """Answer getxattr(`name`) on the mount's root with `value()` (the daemon's own)."""
        self._root_xattrs[name] = value

    @property
    def open_files(self) -> int:
        return len(self._files)

    async def wait_idle(self) -> None:
        """Return once no request is being handled and no file is open (graceful stop).

        Open files count: one read() of a reader is several kernel requests, and
        unmounting in a gap between two of them fails the read with ENOTCONN.
        """
        while self.counters.requests_in_flight or len(self._files):
            self.idle = trio.Event()
            await self.idle.wait()  # set as the last request in flight ends

    def statistics(self) -> FilesystemStatistics:
        return replace(
            self.counters, open_dirs=len(self._dirs), inodes=self.inodes.statistics().inodes
        )
