"""The only module that touches the slow source directory.

Every call runs in a worker thread under a capacity limiter, so a slow or
stalled source never blocks the trio thread, and a dedicated limiter for block
reads keeps a stalled source from starving metadata (and the other way round).
Worker threads get paths, file descriptors and buffers; never the store.

Paths are relative byte strings (``b"dir/model.safetensors"``). Files are
opened one component at a time with O_NOFOLLOW from a descriptor of the root
taken before the mount, so no path, however crafted, reads outside the root.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import operator
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

import trio
import xxhash
from prometheus_client import Histogram

from memcachefs import mounts
from memcachefs.errors import MemcachefsError, SourceError, StaleVersion
from memcachefs.keys import MAX_PATH_BYTES, BlockKey, FileVersion
from memcachefs.metrics import counter, gauge

# Exposed on /metrics (httpd.default_collectors); not in a global registry.
SOURCE_READ_SECONDS = Histogram(
    "memcachefs_source_block_read_seconds",
    "time to read one block from the source",
    registry=None,
)

T = TypeVar("T")
Listing = list[tuple[bytes, os.stat_result]]  # (name, attributes) of a directory's entries
Closer = Callable[[], None]

MAX_NAME_BYTES = 255
STREAM_CHUNK = 1024  # entries of a streamed directory read from the source at once
IDLE_DESCRIPTORS = 64
_CLOSE_THREADS = 2  # closes in flight at once (one may be stuck on a stalled source)


class PathRejected(MemcachefsError):
    """A relative path that could escape the root or is malformed."""


def validate_relpath(relpath: bytes) -> bytes:
    """Return `relpath` if it is a clean relative path below the root, else raise."""
    if len(relpath) > MAX_PATH_BYTES:
        raise PathRejected("path too long")
    if b"\0" in relpath:
        raise PathRejected("NUL byte in path")
    if relpath.startswith(b"/"):
        raise PathRejected("absolute path")
    if relpath == b"":
        return relpath
    for part in relpath.split(b"/"):
        if part in (b"", b".", b".."):
            raise PathRejected(f"bad path component {part!r}")
        if len(part) > MAX_NAME_BYTES:
            raise PathRejected("name too long")
    return relpath


def version_of(relpath: bytes, st: os.stat_result) -> FileVersion:
    return FileVersion(relpath, st.st_size, st.st_mtime_ns)


@dataclass
class _Descriptor:
    """The source file kept open for one version, and the descriptors its block reads use.

    A FUSE client of object storage may serve one read of a handle at a time
    (rclone without its cache), so block reads of one file that run at once
    each get a descriptor of their own: `fd`, or one more opened (and checked to
    be the same version) when every one is busy. The extra ones are closed when
    the file's block reads are done.
    """

    fd: int  # the first one: fstat, and a block reader like the others
    refs: int = 0  # handles, retried opens and block reads holding it
    reading: int = 0  # block reads running now
    idle: list[int] = field(default_factory=list)  # free for a block read
    extra: int = 0  # descriptors opened beside `fd` (idle or reading)
    closed: bool = False

    def __post_init__(self) -> None:
        self.idle.append(self.fd)


@dataclass
class SourceStatistics:
    block_reads: int = counter("blocks read from the source")
    read_errors: int = counter("source opens and block reads that failed")
    stale_reads: int = counter("block reads refused because the file changed in the source")
    open_descriptors: int = gauge("source files held open")
    parallel_opens: int = counter(
        "descriptors opened beside a file's first so that its block reads run in parallel"
    )
    held_descriptors: int = gauge(
        "source files held open for open handles and retried opens (the rest are idle)"
    )
    metadata_calls: int = counter("metadata calls to the source (stat, listing, xattr, statfs)")


class Source:
    """A source directory, opened once; use as a context manager to close it."""

    def __init__(self, root: os.PathLike[str] | str, *, block_threads: int, metadata_threads: int):
        self.root = os.fspath(root)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Blocks are read whole, several at once on descriptors of their own: on a
        # network source the kernel's readahead past a block fetches bytes another
        # read fetches too (1.3x the file through rclone). A local disk keeps it.
        self._exact_reads = mounts.is_network(mounts.mount_containing(self.root))
        self._block_limiter = trio.CapacityLimiter(block_threads)
        self._metadata_limiter = trio.CapacityLimiter(metadata_threads)
        self._descriptors: dict[FileVersion, _Descriptor] = {}
        self._readers_lock = threading.Lock()  # _Descriptor.idle/extra/closed: worker threads
        # close(2) of a file on a FUSE source (s3fs) waits for its FLUSH: never on
        # the trio thread, where a stalled source would freeze every cached read.
        self._to_close, self._closing = trio.open_memory_channel[Closer](math.inf)
        self.counters = SourceStatistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close released descriptors in worker threads, until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(_CLOSE_THREADS):
                nursery.start_soon(self._close_released)
            task_status.started()

    async def _close_released(self) -> None:
        async for close in self._closing:
            # Abandoned on cancel: a close stuck on a stalled source must not hold
            # up shutdown; the thread finishes it whenever the source answers.
            await trio.to_thread.run_sync(close, abandon_on_cancel=True)

    def _close_later(self, fd: int) -> None:
        self.close_later(functools.partial(os.close, fd))

    def close_later(self, close: Closer) -> None:
        """Run `close` (a close(2) of something of the source) in a worker thread."""
        self._to_close.send_nowait(close)

    def close(self) -> None:
        """Close every descriptor (in a thread of its own: the source may be stalled)."""
        closers: list[Closer] = [
            functools.partial(os.close, fd)
            for version in list(self._descriptors)
            for fd in self._drop(version)
        ]
        while True:
            try:
                closers.append(self._closing.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        closers.append(functools.partial(os.close, self._root_fd))
        threading.Thread(target=_close_all, args=(closers,), daemon=True).start()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- metadata ------------------------------------------------------------
    async def lstat(self, relpath: bytes) -> os.stat_result:
        return await self._metadata(self._at_parent, relpath, _lstat_at)

    async def readlink(self, relpath: bytes) -> bytes:
        return await self._metadata(self._at_parent, relpath, _readlink_at)

    async def listdir(
        self, relpath: bytes, previous: Listing | None = None, max_entries: int | None = None
    ) -> Listing:
        """Names and lstat results of a directory's entries (vanished ones skipped),
        sorted by name; ListingTooLarge past `max_entries` (read no further).

        The entries of `previous` (an earlier listing of it) that did not change are
        returned as they were, the same objects: a rescan of a large directory then
        costs neither new attribute objects nor the memory of a second copy.
        """
        return await self._metadata(self._scan, relpath, previous or [], max_entries)

    async def statvfs(self) -> os.statvfs_result:
        return await self._metadata(os.statvfs, self._root_fd)

    async def getxattr(self, relpath: bytes, name: bytes) -> bytes:
        return await self._metadata(self._xattr, os.getxattr, relpath, name)

    async def listxattr(self, relpath: bytes) -> list[str]:
        return await self._metadata(self._xattr, os.listxattr, relpath)

    async def listxattr_many(
        self, relpath: bytes, names: list[bytes]
    ) -> list[tuple[bytes, ...] | None]:
        """The xattr names of several entries of directory `relpath`, in one worker call
        (None for an entry that could not be asked, e.g. one removed meanwhile)."""
        return await self._metadata(self._listxattr_many, relpath, names)

    def _listxattr_many(self, relpath: bytes, names: list[bytes]) -> list[tuple[bytes, ...] | None]:
        fd = self._open_beneath(relpath, os.O_RDONLY | os.O_DIRECTORY) if relpath else None
        base = b"/proc/self/fd/%d/" % (self._root_fd if fd is None else fd)
        found: list[tuple[bytes, ...] | None] = []
        try:
            for name in names:
                try:
                    listed = os.listxattr(base + name, follow_symlinks=False)
                except OSError as error:
                    found.append(() if error.errno in (errno.ENOTSUP, errno.ENODATA) else None)
                    continue
                found.append(tuple(os.fsencode(x) for x in listed))
        finally:
            if fd is not None:
                os.close(fd)
        return found

    async def lstat_many(self, relpath: bytes, names: list[bytes]) -> list[os.stat_result | None]:
        """The attributes of several entries of directory `relpath`, in one worker call
        (None for an entry that is gone)."""
        return await self._metadata(self._lstat_many, relpath, names)

    def _lstat_many(self, relpath: bytes, names: list[bytes]) -> list[os.stat_result | None]:
        fd = self._open_beneath(relpath, os.O_RDONLY | os.O_DIRECTORY) if relpath else None
        dir_fd = self._root_fd if fd is None else fd
        found: list[os.stat_result | None] = []
        try:
            for name in names:
                try:
                    found.append(_lstat_at(dir_fd, name))
                except FileNotFoundError:
                    found.append(None)
        finally:
            if fd is not None:
                os.close(fd)
        return found

    def _scan(self, relpath: bytes, previous: Listing, max_entries: int | None) -> Listing:
        known = {entry[0]: entry for entry in previous}
        entries: Listing = []
        with self._scandir(relpath) as it:
            for entry in it:
                if max_entries is not None and len(entries) >= max_entries:
                    raise ListingTooLarge(relpath)
                found = _entry_of(entry)
                if found is None:
                    continue
                old = known.get(found[0])
                entries.append(old if old is not None and unchanged(old[1], found[1]) else found)
        entries.sort(key=operator.itemgetter(0))
        return entries

    def _scandir(self, relpath: bytes) -> DirectoryScan:
        # A descriptor of its own, the root's too: scandir reads a duplicate, which
        # shares the file offset, and two scans of one directory may run at once.
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        if relpath:
            fd = self._open_beneath(relpath, flags)
        else:
            fd = os.open(".", flags, dir_fd=self._root_fd)
        try:
            return DirectoryScan(fd)
        except BaseException:
            os.close(fd)
            raise

    async def scandir(self, relpath: bytes) -> DirectoryScan:
        """The entries of directory `relpath` (close the scan with close_later)."""
        return await self._metadata(self._scandir, relpath)

    async def next_entries(self, it: DirectoryScan, count: int) -> Listing:
        """Up to `count` more entries of `it` (fewer only at its end)."""
        return await self._metadata(_read_entries, it, count)

    def _xattr(self, call: Callable[..., T], relpath: bytes, *args: object) -> T:
        def at(dir_fd: int, name: bytes) -> T:
            # The parent by descriptor: no symlink in the path is followed.
            return call(b"/proc/self/fd/%d/%s" % (dir_fd, name), *args, follow_symlinks=False)

        return self._at_parent(relpath, at)

    def _at_parent(self, relpath: bytes, call: Callable[[int, bytes], T]) -> T:
        """`call(dir_fd, name)` for the last component of `relpath`.

        The parent directories are opened like files (no symlink followed), so a
        directory swapped for a symlink cannot expose metadata outside the root.
        """
        if not relpath:
            return call(self._root_fd, b".")
        try:
            validate_relpath(relpath)
        except PathRejected as error:
            raise OSError(errno.EACCES, str(error)) from error
        head, _, name = relpath.rpartition(b"/")
        if not head:
            return call(self._root_fd, name)
        dir_fd = self._open_beneath(head, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return call(dir_fd, name)
        finally:
            os.close(dir_fd)

    async def _metadata(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        self.counters.metadata_calls += 1
        # Abandoned on cancel (only at shutdown: fills and lookups run in the service
        # nursery): a call stuck on a stalled source must not hold up the exit.
        return await trio.to_thread.run_sync(
            lambda: call(*args, **kwargs), limiter=self._metadata_limiter, abandon_on_cancel=True
        )

    # -- file data -----------------------------------------------------------
    async def open(self, relpath: bytes) -> FileVersion:
        """Open a regular file and keep it open for its current version; `pin` holds it."""
        fd, st = await self._metadata(self._open_regular, relpath)
        version = version_of(relpath, st)
        self._adopt(version, fd)
        return version

    def pin(self, version: FileVersion) -> bool:
        """Hold the file kept open for `version` until `release`; False if none is kept."""
        descriptor = self._descriptors.get(version)
        if descriptor is None:
            return False
        descriptor.refs += 1
        return True

    async def fstat(self, version: FileVersion) -> os.stat_result | None:
        """Attributes of the file held open for `version` (even once removed from the
        source); None if it is not held."""
        descriptor = self._descriptors.get(version)
        if descriptor is None:
            return None
        descriptor.refs += 1
        try:
            return await self._metadata(os.fstat, descriptor.fd)
        finally:
            descriptor.refs -= 1

    def release(self, version: FileVersion) -> None:
        descriptor = self._descriptors.get(version)
        if descriptor is None:
            return
        descriptor.refs -= 1
        self._close_idle()

    async def read_block(self, key: BlockKey, buffer: memoryview, block_size: int) -> int:
        """Read block `key` into `buffer`; returns the xxh3-64 checksum of the bytes.

        Raises StaleVersion if the file no longer is the version the key names
        (never returns bytes of another version), SourceError on I/O errors.
        """
        version = key.version
        descriptor = self._descriptors.get(version)
        if descriptor is None:
            try:
                fd, st = await self._metadata(self._open_regular, version.relpath)
            except OSError as error:
                self.counters.read_errors += 1
                raise SourceError(f"open {version.relpath!r}: {error.strerror}") from error
            if version_of(version.relpath, st) != version:
                self._close_later(fd)
                self.counters.stale_reads += 1
                raise StaleVersion(f"{version.relpath!r} changed in the source")
            descriptor = self._adopt(version, fd)
        descriptor.refs += 1
        descriptor.reading += 1
        try:
            with SOURCE_READ_SECONDS.time():
                checksum = await trio.to_thread.run_sync(
                    self._read_with_a_free_descriptor,
                    descriptor,
                    buffer,
                    key.offset(block_size),
                    version,
                    limiter=self._block_limiter,
                    abandon_on_cancel=True,  # the loader then never reuses the buffer
                )
        except StaleVersion:
            self.counters.stale_reads += 1
            raise
        except OSError as error:
            self.counters.read_errors += 1
            raise SourceError(f"read {version.relpath!r}: {error.strerror}") from error
        finally:
            descriptor.refs -= 1
            descriptor.reading -= 1
            if not descriptor.reading:
                self._close_extra(descriptor)
            self._close_idle()
        self.counters.block_reads += 1
        return checksum

    # -- block readers (these run in worker threads) ----------------------------
    def _read_with_a_free_descriptor(
        self, descriptor: _Descriptor, buffer: memoryview, offset: int, version: FileVersion
    ) -> int:
        fd = self._take_reader(descriptor, version)
        try:
            return _read_exactly(fd, buffer, offset, version)
        finally:
            self._give_back(descriptor, fd)

    def _take_reader(self, descriptor: _Descriptor, version: FileVersion) -> int:
        with self._readers_lock:
            if descriptor.idle:
                return descriptor.idle.pop()
            descriptor.extra += 1
        try:
            fd = self._reopen(descriptor.fd)
        except OSError:  # no /proc: share the first one
            with self._readers_lock:
                descriptor.extra -= 1
            return descriptor.fd
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            with self._readers_lock:
                descriptor.extra -= 1
            raise
        if version_of(version.relpath, st) != version:  # rewritten in place
            os.close(fd)
            with self._readers_lock:
                descriptor.extra -= 1
            raise StaleVersion(f"{version.relpath!r} changed in the source")
        with self._readers_lock:
            self.counters.parallel_opens += 1
        return fd

    def _reopen(self, fd: int) -> int:
        """Another descriptor of the very file `fd` opened (even once it is replaced
        or removed in the source), not of whatever its name points to now."""
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        other = os.open(f"/proc/self/fd/{fd}", flags)
        if self._exact_reads:
            os.posix_fadvise(other, 0, 0, os.POSIX_FADV_RANDOM)
        return other

    def _give_back(self, descriptor: _Descriptor, fd: int) -> None:
        with self._readers_lock:
            if not descriptor.closed:
                if fd != descriptor.fd or fd not in descriptor.idle:  # shared: once
                    descriptor.idle.append(fd)
                return
            if fd == descriptor.fd:
                return  # closed with the descriptor
            descriptor.extra -= 1
        os.close(fd)  # the descriptor was let go while this read ran (it was abandoned)

    # -- keeping descriptors ----------------------------------------------------
    def _close_extra(self, descriptor: _Descriptor) -> None:
        """Close the idle descriptors opened beside `descriptor.fd`."""
        with self._readers_lock:
            extra = [fd for fd in descriptor.idle if fd != descriptor.fd]
            descriptor.idle = [fd for fd in descriptor.idle if fd == descriptor.fd]
            descriptor.extra -= len(extra)
        for fd in extra:
            self._close_later(fd)

    def _drop(self, version: FileVersion) -> list[int]:
        """Forget `version`'s descriptor; the descriptors to close (busy extra ones
        are closed by their reads)."""
        descriptor = self._descriptors.pop(version)
        with self._readers_lock:
            descriptor.closed = True
            fds = {descriptor.fd, *descriptor.idle}
            descriptor.idle.clear()
            descriptor.extra -= len(fds) - 1
        return sorted(fds)

    def _let_go(self, version: FileVersion) -> None:
        for fd in self._drop(version):
            self._close_later(fd)

    def _adopt(self, version: FileVersion, fd: int) -> _Descriptor:
        """Keep `fd` as the descriptor of `version` (sharing one already kept)."""
        descriptor = self._descriptors.get(version)
        if descriptor is not None:
            self._close_later(fd)
            return descriptor
        # Idle descriptors of the path's other versions are of replaced files: they
        # would keep the old files' space in use on the source.
        for other in [v for v in self._descriptors if v.relpath == version.relpath]:
            if self._descriptors[other].refs == 0:
                self._let_go(other)
        descriptor = self._descriptors[version] = _Descriptor(fd)
        self._close_idle()  # an opener that gave up never pins (or releases) it
        return descriptor

    def _close_idle(self) -> None:
        idle = [v for v, d in self._descriptors.items() if d.refs == 0]
        for version in idle[: max(0, len(idle) - IDLE_DESCRIPTORS)]:
            self._let_go(version)

    def _open_regular(self, relpath: bytes) -> tuple[int, os.stat_result]:
        # O_NONBLOCK: opening a FIFO must not hang; it has no effect on regular files.
        fd = self._open_beneath(relpath, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if self._exact_reads:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _open_beneath(self, relpath: bytes, flags: int) -> int:
        """Open `relpath` below the root without following any symlink."""
        try:
            parts = validate_relpath(relpath).split(b"/")
        except PathRejected as error:
            raise OSError(errno.EACCES, str(error)) from error
        dir_fd = self._root_fd
        try:
            for part in parts[:-1]:
                next_fd = os.open(
                    part,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=dir_fd,
                )
                if dir_fd != self._root_fd:
                    os.close(dir_fd)
                dir_fd = next_fd
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            if dir_fd != self._root_fd:
                os.close(dir_fd)

    def statistics(self) -> SourceStatistics:
        return replace(
            self.counters,
            open_descriptors=len(self._descriptors)
            + sum(d.extra for d in self._descriptors.values()),
            held_descriptors=sum(1 for d in self._descriptors.values() if d.refs),
        )


def _close_all(closers: list[Closer]) -> None:
    for close in closers:
        with contextlib.suppress(OSError):
            close()


def _lstat_at(dir_fd: int, name: bytes) -> os.stat_result:
    return compact_stat(os.lstat(name, dir_fd=dir_fd))


_SHARED_INTS: dict[int, int] = {}


def _shared(value: int) -> int:
    """One int object per distinct mode, owner, link count... (bounded table)."""
    shared = _SHARED_INTS.get(value)
    if shared is not None:
        return shared
    if len(_SHARED_INTS) < 4096:
        _SHARED_INTS[value] = value
    return value


def unchanged(compact: os.stat_result, st: os.stat_result) -> bool:
    """Whether `compact` (from compact_stat) still shows everything of `st`."""
    return (
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_atime_ns,
        st.st_size,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_blocks,
        st.st_rdev,
    ) == (
        compact.st_mtime_ns,
        compact.st_ctime_ns,
        compact.st_atime_ns,
        compact.st_size,
        compact.st_mode,
        compact.st_nlink,
        compact.st_uid,
        compact.st_gid,
        compact.st_blocks,
        compact.st_rdev,
    )


def compact_stat(st: os.stat_result) -> os.stat_result:
    """`st` with only what the mount shows, and its repeated values shared: a cached
    listing of a large directory costs about a third of the memory of full results.

    Kept: mode, link count, owner, size, the nanosecond times, blocks and rdev.
    Dropped (None or 0): the source's device and inode numbers and the float times.
    """
    mtime_ns = st.st_mtime_ns
    ctime_ns = mtime_ns if st.st_ctime_ns == mtime_ns else st.st_ctime_ns
    atime_ns = mtime_ns if st.st_atime_ns == mtime_ns else st.st_atime_ns
    return os.stat_result(
        (  # type: ignore[arg-type]  # the float times stay None
            _shared(st.st_mode),
            0,
            0,
            _shared(st.st_nlink),
            _shared(st.st_uid),
            _shared(st.st_gid),
            _shared(st.st_size),
            None,
            None,
            None,
        ),
        {
            "st_atime_ns": atime_ns,
            "st_mtime_ns": mtime_ns,
            "st_ctime_ns": ctime_ns,
            "st_blocks": _shared(st.st_blocks),
            "st_rdev": _shared(st.st_rdev),
            "st_blksize": 4096,
        },
    )


def _readlink_at(dir_fd: int, name: bytes) -> bytes:
    return os.readlink(name, dir_fd=dir_fd)


def _read_exactly(fd: int, buffer: memoryview, offset: int, version: FileVersion) -> int:
    """Fill `buffer` from `offset` (runs in a worker thread), then re-check the version."""
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            break
        done += count
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns) != (version.size, version.mtime_ns) or done < len(buffer):
        raise StaleVersion(f"{version.relpath!r} changed in the source while being read")
    return xxhash.xxh3_64_intdigest(buffer)


class DirectoryScan:
    """os.scandir of a directory's descriptor, and the descriptor: the entries' stat
    calls use it, so it stays open until the scan is closed."""

    def __init__(self, fd: int) -> None:
        self._it = os.scandir(fd)
        self._fd = fd

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        return self._it

    def __enter__(self) -> DirectoryScan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._it.close()
        os.close(self._fd)


class ListingTooLarge(Exception):
    """A directory has more entries than a listing may hold (read it as a stream)."""


def _entry_of(entry: os.DirEntry[str]) -> tuple[bytes, os.stat_result] | None:
    try:
        return os.fsencode(entry.name), compact_stat(entry.stat(follow_symlinks=False))
    except FileNotFoundError:  # removed meanwhile
        return None


def _read_entries(it: DirectoryScan, count: int) -> Listing:
    entries: Listing = []
    for entry in it:
        found = _entry_of(entry)
        if found is not None:
            entries.append(found)
            if len(entries) == count:
                break
    return entries


class DirectoryStream:
    """The entries of a directory too large to cache, read from the source a chunk at
    a time in the source's order: one chunk in memory, whatever the directory's size.

    Offsets are positions in that order; reading from an offset before the current
    chunk (rewinddir, seekdir back) starts the scan again.
    """

    def __init__(self, source: Source, relpath: bytes) -> None:
        self._source = source
        self._relpath = relpath
        self._it: DirectoryScan | None = None
        self._ended = False
        self._chunk: Listing = []
        self._chunk_start = 0  # the offset of self._chunk[0]
        self._lock = trio.Lock()

    async def entries_from(self, offset: int) -> tuple[int, Listing]:
        """A chunk of entries holding `offset`, and the offset of its first entry
        (past the end: no entries)."""
        async with self._lock:
            if offset < self._chunk_start or (self._it is None and not self._ended):
                self.close()
                self._it = await self._source.scandir(self._relpath)
                self._ended, self._chunk, self._chunk_start = False, [], 0
            while offset >= self._chunk_start + len(self._chunk) and self._it is not None:
                start = self._chunk_start + len(self._chunk)
                self._chunk = await self._source.next_entries(self._it, STREAM_CHUNK)
                self._chunk_start = start
                if len(self._chunk) < STREAM_CHUNK:  # the end: its descriptor can go
                    self._ended = True
                    self.close()
            return self._chunk_start, self._chunk

    def close(self) -> None:
        """Close the source directory (in a worker thread)."""
        it, self._it = self._it, None
        if it is not None:
            self._source.close_later(it.close)
