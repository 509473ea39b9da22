"""Model-aware prefetch: an opened model file is filled whole, ahead of its readers.

A loader that maps a checkpoint and jumps between tensors (mmap faults out of
order) gets no sequential readahead: every jump would be a synchronous miss
paying the source's first-byte latency. So when a file matching a prefetch
pattern is opened, its blocks are filled in the order readers need them: for a
``.safetensors`` file the header first, then the tensors by offset (the header
is parsed, bounded and validated; a bad header just means file order).

Bounds: at most `window_blocks` fills of one file run at once (the window
advances as blocks land), and the blocks prefetched that no reader has taken
yet stay within a share of the capacity, for each file and for all together:
the prefetch waits for readers to take some before it fills more. So a file
larger than the cache never evicts itself, and readers jumping around such a
file do not let it fill the whole file ahead of them. A file's share halves
whenever prefetched blocks are evicted before anyone read them. The prefetch of a file stops when
its last handle is closed. Opening a ``*.safetensors.index.json`` prefetches
the shards it names, when they fit in that share together.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import trio

from memcachefs.config import DEFAULT_PATTERNS
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.loader import Loader
from memcachefs.metadata import MetadataCache
from memcachefs.metrics import counter, gauge

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".safetensors.index.json"
PREFETCH_SHARE = 0.5  # of the capacity, at most, in prefetched blocks no reader took yet
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_INDEX_BYTES = 16 * 1024 * 1024


def safetensors_ranges(header: bytes, file_size: int) -> list[tuple[int, int]] | None:
    """The byte ranges of the tensors, in file offsets, sorted; None if not a valid header.

    `header` is the start of the file (at least the 8-byte length and the JSON).
    Nothing outside [0, file_size) is ever returned.
    """
    if len(header) < 8:
        return None
    length = int.from_bytes(header[:8], "little")
    if not 2 <= length <= MAX_HEADER_BYTES or 8 + length > min(len(header), file_size):
        return None
    try:
        table = json.loads(header[8 : 8 + length])
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(table, dict):
        return None
    base = 8 + length
    ranges = [(0, base)]
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(value) is int for value in offsets)
            or not 0 <= offsets[0] <= offsets[1]
            or base + offsets[1] > file_size
        ):
            return None
        ranges.append((base + offsets[0], base + offsets[1]))
    return sorted(ranges)


def block_order(size: int, block_size: int, ranges: Sequence[tuple[int, int]] | None) -> list[int]:
    """Block indices in the order the ranges need them, then any others in file order."""
    count = -(-size // block_size)
    order: list[int] = []
    seen: set[int] = set()
    for start, end in ranges or ():
        for index in range(start // block_size, -(-end // block_size)):
            if index < count and index not in seen:
                seen.add(index)
                order.append(index)
    order += [index for index in range(count) if index not in seen]
    return order


def index_shards(index: bytes) -> list[str] | None:
    """The shard file names a ``model.safetensors.index.json`` names (same directory)."""
    try:
        weight_map = json.loads(index).get("weight_map")
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(weight_map, dict):
        return None
    names = {name for name in weight_map.values() if isinstance(name, str)}
    return sorted(name for name in names if name and "/" not in name and name not in (".", ".."))


@dataclass
class PrefetchStatistics:
    prefetches: int = counter("files whose prefetch was started (on open, or by an index)")
    prefetch_fills: int = counter("blocks filled by prefetch")
    prefetch_errors: int = counter("prefetch fills that failed (the reader then asks again)")
    prefetches_in_flight: int = gauge("files being prefetched now")
    prefetched_unread_blocks: int = gauge("blocks prefetched that no reader has taken yet")


@dataclass
class _Run:
    version: FileVersion
    scope: trio.CancelScope
    unread: set[int] = field(default_factory=set)  # blocks filled (or filling) for no reader yet
    filling: set[int] = field(default_factory=set)  # fills started by this run, not yet done


class Prefetcher:
    def __init__(
        self,
        loader: Loader,
        metadata: MetadataCache,
        nursery: trio.Nursery,
        *,
        patterns: Iterable[str] = DEFAULT_PATTERNS,
        window_bytes: int,
    ) -> None:
        self._loader = loader
        self._metadata = metadata
        self._nursery = nursery
        self._patterns = tuple(patterns)
        block_size = loader.block_size
        capacity_blocks = loader.store.capacity_bytes // block_size
        self._window_blocks = max(1, window_bytes // block_size)
        self._ahead_limit = max(1, int(capacity_blocks * PREFETCH_SHARE))
        self._runs: dict[FileVersion, _Run] = {}
        self._taken = trio.Event()  # set when a reader takes a block of a prefetched file
        self.counters = PrefetchStatistics()

    def wants(self, relpath: bytes) -> bool:
        name = os.fsdecode(os.path.basename(relpath))
        return name.endswith(INDEX_SUFFIX) or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self._patterns
        )

    def opened(self, version: FileVersion) -> None:
        """A handle of `version` was opened: prefetch it if it is a model file."""
        if version in self._runs or not version.size or not self.wants(version.relpath):
            return
        run = self._runs[version] = _Run(version, trio.CancelScope())
        self.counters.prefetches += 1
        self._nursery.start_soon(self._run, run)

    def closed(self, version: FileVersion) -> None:
        """The last handle of `version` was closed: its prefetch stops."""
        run = self._runs.get(version)
        if run is not None:
            run.scope.cancel()

    def read(self, version: FileVersion, index: int) -> None:
        """A reader took block `index`: the prefetch may advance."""
        run = self._runs.get(version)
        if run is not None:
            run.unread.discard(index)
            self._taken.set()

    async def _run(self, run: _Run) -> None:
        try:
            with run.scope:
                if run.version.relpath.endswith(INDEX_SUFFIX.encode()):
                    await self._prefetch_shards(run.version)
                else:
                    await self._fill_all(run)
        finally:
            del self._runs[run.version]
            self._taken.set()  # its unread blocks no longer count against the others

    async def _fill_all(self, run: _Run) -> None:
        version = run.version
        block_size = self._loader.block_size
        order = block_order(version.size, block_size, await self._ranges(version))
        window = trio.Semaphore(self._window_blocks)
        evicted_at_start = self._loader.store.counters.readahead_evicted_unread
        ahead_limit = self._ahead_limit
        async with trio.open_nursery() as fills:
            for index in order:
                key = BlockKey(version, index)
                if self._loader.holds(key):
                    continue
                evicted = self._loader.store.counters.readahead_evicted_unread
                if evicted > evicted_at_start:  # our blocks (or readahead's) are evicted unread
                    evicted_at_start = evicted
                    ahead_limit = max(1, ahead_limit // 2)
                while len(run.unread) >= ahead_limit or self._unread_blocks() >= self._ahead_limit:
                    self._forget_evicted()
                    if len(run.unread) < ahead_limit and self._unread_blocks() < self._ahead_limit:
                        break
                    if self._taken.is_set():
                        self._taken = trio.Event()
                    await self._taken.wait()
                await window.acquire()
                run.unread.add(index)
                run.filling.add(index)
                fills.start_soon(self._fill, run, index, window)

    def _unread_blocks(self) -> int:
        return sum(len(run.unread) for run in self._runs.values())

    def _forget_evicted(self) -> None:
        """Prefetched blocks evicted before anyone read them no longer count."""
        for run in self._runs.values():
            run.unread = {
                index
                for index in run.unread
                if index in run.filling or BlockKey(run.version, index) in self._loader.store
            }

    async def _fill(self, run: _Run, index: int, window: trio.Semaphore) -> None:
        key = BlockKey(run.version, index)
        try:
            if await self._loader.prefetch(key):
                self.counters.prefetch_fills += 1
        except Exception as error:  # the reader asks again and sees the error itself
            self.counters.prefetch_errors += 1
            log.debug("prefetch of %r block %d failed: %s", key.version.relpath, key.index, error)
        finally:
            run.filling.discard(index)
            window.release()

    async def _head(self, version: FileVersion, limit: int) -> bytes:
        """The first `limit` bytes of the file, through the loader (memory, peers, source)."""
        block_size = self._loader.block_size
        out = bytearray()
        for index in range(-(-min(limit, version.size) // block_size)):
            block = await self._loader.block(BlockKey(version, index), block_size)
            out += block.view
        return bytes(out[:limit])

    async def _ranges(self, version: FileVersion) -> list[tuple[int, int]] | None:
        if not version.relpath.endswith(b".safetensors"):
            return None
        try:
            head = await self._head(version, 8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 2 <= length <= MAX_HEADER_BYTES or 8 + length > version.size:
                return None
            return safetensors_ranges(await self._head(version, 8 + length), version.size)
        except Exception:  # any trouble: plain file order
            return None

    async def _prefetch_shards(self, index: FileVersion) -> None:
        if index.size > MAX_INDEX_BYTES:
            return
        try:
            names = index_shards(await self._head(index, index.size))
        except Exception:
            return
        directory = os.path.dirname(index.relpath)
        shards = []
        for name in names or ():
            relpath = os.path.join(directory, os.fsencode(name)) if directory else os.fsencode(name)
            try:
                st = await self._metadata.lstat(relpath)
            except OSError:
                continue
            shards.append(FileVersion(relpath, st.st_size, st.st_mtime_ns))
        total = sum(shard.size for shard in shards)
        if total > self._ahead_limit * self._loader.block_size:
            log.info(
                "%s names %d shards of %d bytes in all: more than the prefetch share, not "
                "prefetched",
                os.fsdecode(index.relpath),
                len(shards),
                total,
            )
            return
        for shard in shards:
            self.opened(shard)

    def statistics(self) -> PrefetchStatistics:
        return replace(
            self.counters,
            prefetches_in_flight=len(self._runs),
            prefetched_unread_blocks=self._unread_blocks(),
        )
