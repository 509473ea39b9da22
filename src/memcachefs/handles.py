"""Open file handles: the version each one pinned, and how its reader moves.

`open` pins the version the source file has at that moment by holding the
source file open (Source.open + Source.pin), so the handle reads that version
to its end even if the source file is replaced. If the source does not answer
within the metadata grace period (a stalled source) and the file's attributes
are known, the handle uses that version unpinned: cached blocks are served, and
a block that needs the source is read by path and checked against the version.

Readahead follows each handle's reader: a read of the block after the last one
it read (or of the first block) starts fills of the next blocks.

An open that finds the source file changed since the kernel looked it up (the
inode is another version) keeps the version it found waiting for the kernel's
retry, so the retried lookup and open agree on one version even while the
source file keeps changing. A waiting version serves every open of an inode of
that version until it expires (several openers of one path retry at once), and
each path keeps the few versions found within WAITING_VERSION_S.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace

import trio

from memcachefs.blockstore import Block
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.loader import Loader
from memcachefs.metadata import MetadataCache
from memcachefs.metrics import counter, gauge
from memcachefs.prefetch import Prefetcher
from memcachefs.singleflight import SingleFlight
from memcachefs.source import Source

# How long a version found by an open that raced a change waits for the kernel's retry.
WAITING_VERSION_S = 2.0
# Blocks at or just after a reader's position that fills ahead of readers never evict.
ABOUT_TO_READ_BLOCKS = 2


@dataclass
class OpenFile:
    inode: int
    version: FileVersion
    pinned: bool  # the source file is held open for this handle
    last_index: int = -1


@dataclass
class HandleStatistics:
    open_files: int = gauge("file handles the kernel holds open")
    unpinned_opens: int = counter(
        "opens answered from known attributes while the source did not answer"
    )
    raced_opens: int = counter(
        "opens that found the source file changed since its lookup (retried by the kernel)"
    )


class OpenFiles:
    def __init__(
        self,
        source: Source,
        metadata: MetadataCache,
        loader: Loader,
        nursery: trio.Nursery,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self._source = source
        self._metadata = metadata
        self._loader = loader
        self._prefetcher = prefetcher
        self._nursery = nursery
        self._opens: SingleFlight[bytes, FileVersion] = SingleFlight(nursery)
        self._files: dict[int, OpenFile] = {}
        # Per path, the versions held for retried opens: version -> expiry (newest last).
        self._waiting: dict[bytes, dict[FileVersion, float]] = {}
        self._next_handle = 1
        self.counters = HandleStatistics()

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, fh: int) -> OpenFile:
        return self._files[fh]

    async def pin(
        self, relpath: bytes, expected: FileVersion | None = None
    ) -> tuple[FileVersion, bool]:
        """The version of `relpath` now, and whether the source file is held for it;
        `expected` (the opened inode's version) if it is held for a retried open."""
        self._expire()
        if expected is not None and expected in self._waiting.get(relpath, {}):
            return expected, self._source.pin(expected)
        with trio.move_on_after(self._metadata.stale_grace_s):
            version = await self._open(relpath)
            return version, self._source.pin(version)
        known = self._metadata.last_known(relpath)
        if known is None or not stat.S_ISREG(known.st_mode):
            version = await self._open(relpath)  # nothing to fall back on: wait
            return version, self._source.pin(version)
        self.counters.unpinned_opens += 1
        return FileVersion(relpath, known.st_size, known.st_mtime_ns), False

    async def _open(self, relpath: bytes) -> FileVersion:
        # One source open per path at a time; it outlives an opener that gave up.
        return await self._opens.do(relpath, lambda: self._source.open(relpath))

    def add(self, inode: int, version: FileVersion, pinned: bool) -> int:
        fh = self._next_handle
        self._next_handle += 1
        self._files[fh] = OpenFile(inode, version, pinned)
        if self._prefetcher is not None:
            self._prefetcher.opened(version)
        return fh

    def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        if handle.pinned:
            self._source.release(handle.version)
        if self._prefetcher is not None and all(
            other.version != handle.version for other in self._files.values()
        ):
            self._prefetcher.closed(handle.version)

    # -- an open that raced a change ------------------------------------------------------
    def keep_waiting(self, version: FileVersion) -> None:
        """Hold pinned `version` of its path (the caller's pin) for retried opens."""
        held = self._waiting.setdefault(version.relpath, {})
        if held.pop(version, None) is not None:
            self._source.release(version)  # held already: one pin is enough
        held[version] = trio.current_time() + WAITING_VERSION_S
        self.counters.raced_opens += 1
        # Let it go on time even if the retry never comes: it holds a replaced file.
        self._nursery.start_soon(self._expire_after, WAITING_VERSION_S)

    async def _expire_after(self, delay_s: float) -> None:
        await trio.sleep(delay_s)
        self._expire()

    def waiting(self, relpath: bytes) -> FileVersion | None:
        """The newest version an open of `relpath` found and holds for a retry."""
        self._expire()
        held = self._waiting.get(relpath)
        return next(reversed(held)) if held else None

    def _expire(self) -> None:
        now = trio.current_time()
        for relpath, held in list(self._waiting.items()):
            for version, expires_at in list(held.items()):
                if expires_at <= now:
                    del held[version]
                    self._source.release(version)
            if not held:
                del self._waiting[relpath]

    # -- reading ------------------------------------------------------------------------
    async def block(self, handle: OpenFile, index: int, wanted_bytes: int) -> Block:
        """Block `index` of the handle's version; starts readahead for a sequential reader."""
        if index != handle.last_index:
            if index in (handle.last_index + 1, 0):
                self._loader.read_ahead(handle.version, index)
            handle.last_index = index
            if self._prefetcher is not None:
                self._prefetcher.read(handle.version, index)
        return await self._loader.block(BlockKey(handle.version, index), wanted_bytes)

    def about_to_read(self, key: BlockKey) -> bool:
        """Whether an open handle's reader is at `key` or just before it (within
        ABOUT_TO_READ_BLOCKS): readahead and prefetch must not evict it."""
        return any(
            h.version == key.version
            and h.last_index <= key.index <= h.last_index + ABOUT_TO_READ_BLOCKS
            for h in self._files.values()
        )

    def reader_position(self, inode: int) -> int:
        """The furthest block an open handle of `inode` has read (-1: none yet)."""
        return max((h.last_index for h in self._files.values() if h.inode == inode), default=-1)

    async def fstat_pinned(self, inode: int) -> os.stat_result | None:
        """Attributes of a source file a handle of `inode` holds open (it may be removed)."""
        for handle in list(self._files.values()):
            if handle.inode == inode and handle.pinned:
                st = await self._source.fstat(handle.version)
                if st is not None:
                    return st
        return None

    def statistics(self) -> HandleStatistics:
        return replace(self.counters, open_files=len(self._files))
