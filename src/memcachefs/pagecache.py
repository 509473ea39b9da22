"""Push cached blocks into the kernel page cache, so reads never reach the daemon.

A READ answered by the daemon costs a round trip through FUSE (~2 GB/s here);
a page already in the kernel's page cache is read at memory speed, and an mmap
fault on it needs no READ at all. When a file whose blocks are in memory is
opened, its blocks are pushed with `pyfuse3.notify_store` from a worker thread
(it releases the GIL), in file order, while the reader starts reading.

Rules that keep it correct:
- Only blocks of the version the handle pinned, and never past that version's
  size (a store beyond the end would extend the file in the kernel).
- An inode only ever holds one version of a file (inodes.py gives a new
  version a new inode), so pages pushed for it are never another version's.
- Every block is pinned while a thread copies it, so its buffer is not reused.
- Pages may be reclaimed by the kernel at any time: READ keeps working.

A repeat open copies only what the kernel dropped: before pushing, a child
process (residency.py) opens the file through the mount and asks `cachestat(2)`
which blocks are still wholly in the page cache; those are skipped. That open
is a FUSE request to this daemon, answered by the trio thread while the worker
waits for the child (its `open` finds this push running and starts no other).
The thread is abandoned on cancel: after the FUSE loop ends nothing would
answer the child.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from memcachefs.blockstore import BlockStore
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.metrics import counter, gauge
from memcachefs.residency import ResidencyProbe

log = logging.getLogger(__name__)

# pyfuse3 accepts any contiguous buffer (its stub says bytes): a memoryview avoids a copy.
NotifyStore = Callable[[int, int, Any], None]


@dataclass
class PageCacheStatistics:
    page_cache_pushes: int = counter("opens that pushed cached blocks into the kernel page cache")
    page_cache_pushed_bytes: int = counter("bytes pushed into the kernel page cache")
    page_cache_resident_bytes: int = counter(
        "bytes not pushed because their pages were still in the page cache"
    )
    page_cache_push_errors: int = counter("pushes the kernel refused")
    page_cache_pushes_in_flight: int = gauge("pushes running now")


class _Push:
    __slots__ = ("done", "relpath", "scope", "version")

    def __init__(self, version: FileVersion, relpath: bytes | None) -> None:
        self.version = version
        self.relpath = relpath
        self.scope = trio.CancelScope()
        self.done = trio.Event()


class PageCachePusher:
    def __init__(
        self,
        store: BlockStore,
        nursery: trio.Nursery,
        notify_store: NotifyStore = pyfuse3.notify_store,
        reader_position: Callable[[int], int] = lambda inode: -1,
        mountpoint: Path | None = None,
    ) -> None:
        self._store = store
        # Where the file is seen, to ask the kernel which pages it still has (None: never).
        self._mountpoint = mountpoint
        self._reader_position = reader_position
        self._nursery = nursery
        self._notify_store = notify_store
        # One thread: a push competes for the CPU with the reader it helps.
        self._limiter = trio.CapacityLimiter(1)
        self._pushes: dict[int, _Push] = {}
        self._probe = ResidencyProbe()
        self.counters = PageCacheStatistics()

    def push(self, inode: int, version: FileVersion, relpath: bytes | None = None) -> None:
        """Start pushing the cached blocks of `version` for `inode` (no wait).

        `relpath` (the file's path under the mount) lets the push skip the blocks
        whose pages the kernel still holds.
        """
        # An inode holds one version (inodes.py): a push running for it is this one.
        if inode in self._pushes or not self._any_cached(version):
            return
        push = self._pushes[inode] = _Push(version, relpath)
        self.counters.page_cache_pushes += 1
        self._nursery.start_soon(self._run, inode, push)

    async def stop(self, inode: int) -> None:
        """Stop a push for `inode` and wait until no thread stores its pages."""
        push = self._pushes.get(inode)
        if push is None:
            return
        push.scope.cancel()
        await push.done.wait()

    async def stop_all(self) -> None:
        """Stop every push and wait for the threads (before the FUSE session closes)."""
        for inode in list(self._pushes):
            await self.stop(inode)

    def close(self) -> None:
        """End the residency child (blocking; after the FUSE session closed, so that
        an open it still waits on has failed)."""
        self._probe.close()

    def _any_cached(self, version: FileVersion) -> bool:
        block_size = self._store.block_size_bytes
        return any(
            BlockKey(version, index) in self._store
            for index in range(version.block_count(block_size))
        )

    async def _run(self, inode: int, push: _Push) -> None:
        version = push.version
        block_size = self._store.block_size_bytes
        try:
            with push.scope:
                resident: set[int] = set()
                if self._mountpoint is not None and push.relpath is not None:
                    path = self._mountpoint / os.fsdecode(push.relpath)
                    found: set[int] | None = await trio.to_thread.run_sync(
                        self._probe.resident_blocks,
                        path,
                        inode,
                        version.size,
                        block_size,
                        abandon_on_cancel=True,
                    )
                    resident = found or set()
                for index in range(version.block_count(block_size)):
                    if index in resident:
                        self.counters.page_cache_resident_bytes += min(
                            block_size, version.size - index * block_size
                        )
                        continue
                    # Stay ahead of a reader: the blocks it read, and the one it reads
                    # next, are answered by READ anyway.
                    position = self._reader_position(inode)
                    if index <= position or (position >= 0 and index == position + 1):
                        continue
                    block = self._store.get(BlockKey(version, index))
                    if block is None:
                        continue
                    length = min(block.length, version.size - index * block_size)
                    block.pins += 1
                    try:
                        # Not abandonable: stop() must know when the thread is done.
                        await trio.to_thread.run_sync(
                            self._notify_store,
                            inode,
                            index * block_size,
                            block.view[:length],
                            limiter=self._limiter,
                        )
                    finally:
                        block.pins -= 1
                    self.counters.page_cache_pushed_bytes += length
        except OSError as error:
            # ENOENT: the kernel forgot the inode; nothing to push into.
            if error.errno != errno.ENOENT:
                self.counters.page_cache_push_errors += 1
                log.info("page cache push for inode %d stopped: %s", inode, error)
        finally:
            del self._pushes[inode]
            push.done.set()

    def statistics(self) -> PageCacheStatistics:
        return replace(self.counters, page_cache_pushes_in_flight=len(self._pushes))
