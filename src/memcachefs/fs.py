"""The pyfuse3 adapter: kernel requests onto the metadata cache and the loader.

Kept thin on purpose so the filesystem can be driven without a kernel in unit
tests. Only FUSEError leaves a handler: pyfuse3 lets any other exception end
its main loop, so `_handler` maps our errors and OSError to their errno, and
turns anything unexpected into EIO plus one log line.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from memcachefs.blockstore import Block
from memcachefs.errors import ReadError
from memcachefs.inodes import InodeTable
from memcachefs.keys import BlockKey, FileVersion, block_span
from memcachefs.loader import Loader
from memcachefs.metadata import MetadataCache
from memcachefs.pagecache import PageCachePusher
from memcachefs.source import Source, version_of

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

STATS_XATTR = b"user.memcachefs.stats"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def _handler(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        fs = args[0]
        assert isinstance(fs, Filesystem)
        fs.requests_in_flight += 1
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ReadError as error:
            raise pyfuse3.FUSEError(error.errno_value) from None
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except Exception:
            fs.internal_errors += 1
            log.exception("internal error in %s; answered EIO", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            fs.requests_in_flight -= 1
            if fs.requests_in_flight == 0:
                fs.idle.set()

    return wrapper


def _read_only(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Replace a mutating operation: the mount is read-only."""

    @functools.wraps(method)
    async def refuse(*args: P.args, **kwargs: P.kwargs) -> R:
        raise pyfuse3.FUSEError(errno.EROFS)

    return refuse


@dataclass(frozen=True)
class FilesystemStatistics:
    open_files: int
    open_dirs: int
    requests_in_flight: int
    internal_errors: int
    unpinned_opens: int
    inodes: int


@dataclass
class OpenFile:
    inode: int
    version: FileVersion
    pinned: bool = True  # the source file is held open (see Filesystem._pin)
    last_index: int = -1


@dataclass
class OpenDir:
    relpath: bytes
    entries: list[tuple[bytes, os.stat_result]]


class Filesystem(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        source: Source,
        metadata: MetadataCache,
        loader: Loader,
        *,
        attr_timeout_s: float,
        statistics: Callable[[], dict[str, Any]] | None = None,
        readdir_reply: Callable[[Any, bytes, pyfuse3.EntryAttributes, int], bool] | None = None,
        nursery: trio.Nursery | None = None,
        push_page_cache: bool = False,
    ) -> None:
        super().__init__()
        self.pusher: PageCachePusher | None = None
        if push_page_cache:
            if nursery is None:
                raise ValueError("pushing into the page cache needs a nursery")
            self.pusher = PageCachePusher(
                loader.store, nursery, reader_position=self.reader_position
            )
        self._source = source
        self._metadata = metadata
        self._loader = loader
        self._block_size = loader.block_size
        self._attr_timeout_s = attr_timeout_s
        self._statistics = statistics
        self._readdir_reply = readdir_reply or pyfuse3.readdir_reply
        self._nursery = nursery
        self.inodes = InodeTable()
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_handle = 1
        self.requests_in_flight = 0
        self.internal_errors = 0
        self.unpinned_opens = 0
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
        if name == b".":
            relpath = self._path(parent_inode)
        elif name == b"..":
            relpath = os.path.dirname(self._path(parent_inode))
        else:
            relpath = self._child(parent_inode, name)
        st = await self._metadata.lstat(relpath)
        inode = self.inodes.inode(relpath, st)
        self.inodes.looked_up(inode)
        return self._entry(inode, st)

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
            pinned = await self._pinned_attributes(inode)
            if pinned is None:
                raise
            st = pinned
        if not self.inodes.is_current(inode, st):
            # The path holds another version now; this inode stays the old one
            # (its open handles read it), with the old size and mtime.
            st = self.inodes.attributes(inode) or st
        return self._entry(inode, st)

    async def _pinned_attributes(self, inode: int) -> os.stat_result | None:
        for handle in list(self._files.values()):
            if handle.inode == inode and handle.pinned:
                st = await self._source.fstat(handle.version)
                if st is not None:
                    return st
        return None

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
        relpath = self._path(inode)
        # Sorted once by the cache and shared by every handle of this directory.
        entries = await self._metadata.listdir(relpath)
        return self._new_handle(self._dirs, OpenDir(relpath, entries))

    @_handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._dirs[fh]
        prefix = handle.relpath + b"/" if handle.relpath else b""
        for position in range(start_id, len(handle.entries)):
            name, st = handle.entries[position]
            inode = self.inodes.inode(prefix + name, st)
            if not self._readdir_reply(token, name, self._entry(inode, st), position + 1):
                break
            self.inodes.looked_up(inode)

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------
    @_handler
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        relpath = self._path(inode)
        version, pinned = await self._pin(relpath)
        known = self.inodes.attributes(inode)
        if known is not None and version_of(relpath, known) != version:
            # The source file is another version than this inode: ESTALE makes
            # the kernel look the name up again (fresh attributes, a new inode)
            # and retry the open there.
            if pinned:
                self._source.release(version)
            self._metadata.forget(relpath)
            raise pyfuse3.FUSEError(errno.ESTALE)
        # The kernel has this version's attributes (its size) for this inode,
        # and the inode never holds another version: its pages stay valid.
        if self.pusher is not None and known is not None:
            self.pusher.push(inode, version)
        fh = self._new_handle(self._files, OpenFile(inode, version, pinned))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def reader_position(self, inode: int) -> int:
        """The furthest block an open handle of `inode` has read (-1: none yet)."""
        return max((h.last_index for h in self._files.values() if h.inode == inode), default=-1)

    async def _pin(self, relpath: bytes) -> tuple[FileVersion, bool]:
        """Open the source file and pin its version; (version, pinned).

        If the source does not answer within the metadata grace period (a
        stalled source) and the file's attributes are known, the handle uses
        that version unpinned: reads of cached blocks work, and a block that
        needs the source is read by path and checked against the version.
        """
        if self._nursery is None:
            return await self._source.open(relpath), True
        outcome: list[FileVersion | BaseException] = []
        answered = trio.Event()
        abandoned = False

        async def open_in_background() -> None:
            try:
                outcome.append(await self._source.open(relpath))
            except Exception as error:
                outcome.append(error)
            answered.set()
            if abandoned and isinstance(outcome[0], FileVersion):
                self._source.release(outcome[0])

        self._nursery.start_soon(open_in_background)
        with trio.move_on_after(self._metadata.stale_grace_s):
            await answered.wait()
        if answered.is_set():
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            return outcome[0], True
        known = self._metadata.last_known(relpath)
        if known is None or not stat.S_ISREG(known.st_mode):
            await answered.wait()  # nothing to fall back on: wait for the source
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            return outcome[0], True
        abandoned = True
        self.unpinned_opens += 1
        return version_of(relpath, known), False

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 accepts any contiguous buffer; a memoryview slice avoids a copy.
        handle = self._files[fh]
        span = block_span(off, size, handle.version.size, self._block_size)
        if not span:
            return b""
        if len(span) == 1:  # the common case: a slice of one block, no copy
            block = await self._block(handle, span[0], size)
            start = off - span[0] * self._block_size
            return block.view[start : start + size]  # type: ignore[return-value]
        out = bytearray()
        for index in span:
            base = index * self._block_size
            block = await self._block(handle, index, self._block_size)
            # Copy now: after the next await this block's buffer may be reused.
            out += block.view[max(0, off - base) : off + size - base]
        return out  # type: ignore[return-value]

    async def _block(self, handle: OpenFile, index: int, wanted_bytes: int) -> Block:
        key = BlockKey(handle.version, index)
        if index != handle.last_index:
            if index == handle.last_index + 1 or index == 0:
                self._loader.read_ahead(handle.version, index)
            handle.last_index = index
        return await self._loader.block(key, wanted_bytes)

    @_handler
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None and handle.pinned:
            self._source.release(handle.version)

    @_handler
    async def flush(self, fh: int) -> None:
        return None

    # -- extended attributes ---------------------------------------------------
    @_handler
    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        if name == STATS_XATTR and inode == pyfuse3.ROOT_INODE and self._statistics:
            return json.dumps(self._statistics(), sort_keys=True).encode()
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
        return await self._metadata.listxattr(self._path(inode))

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

    def _new_handle(self, table: dict[int, Any], value: Any) -> int:
        fh = self._next_handle
        self._next_handle += 1
        table[fh] = value
        return fh

    async def wait_idle(self) -> None:
        """Return once no request is being handled and no file is open (graceful stop).

        Open files count: one read() of a reader is several kernel requests, and
        unmounting in a gap between two of them fails the read with ENOTCONN.
        """
        while self.requests_in_flight or self._files:
            self.idle = trio.Event()
            await self.idle.wait()

    def statistics(self) -> FilesystemStatistics:
        return FilesystemStatistics(
            open_files=len(self._files),
            open_dirs=len(self._dirs),
            requests_in_flight=self.requests_in_flight,
            internal_errors=self.internal_errors,
            unpinned_opens=self.unpinned_opens,
            inodes=self.inodes.statistics().inodes,
        )
