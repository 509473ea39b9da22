"""The miss path: memory, then the owning peer, then the source; plus readahead.

``block()`` returns at once on a hit (no await). On a miss one fill per key
runs (single-flight) in the service nursery: it reserves a buffer in the store,
asks the peer layer (when a cluster is configured) and otherwise reads the
source, then stores the block. Readahead starts the same fills for the blocks
after a sequential reader, bounded in number.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import trio

from memcachefs.blockstore import Block, BlockStore, Buffer
from memcachefs.errors import ReadError, SourceError
from memcachefs.events import RateLimitedEvent
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.metrics import counter, gauge
from memcachefs.singleflight import SingleFlight
from memcachefs.source import Source

SOURCE_ERROR_LOG_INTERVAL_S = 10.0


class PeerFetcher(Protocol):
    """The cluster's side of a fill (see peers.py)."""

    async def fetch_into(self, key: BlockKey, buffer: memoryview) -> int | None:
        """Fill `buffer` from a peer and return its verified xxh3-64, or None to
        let the caller read the source. Never raises for peer failures."""


@dataclass
class LoaderStatistics:
    hits: int = counter("block lookups of reads answered from memory")
    misses: int = counter("block lookups of reads that needed a fill")
    memory_bytes: int = counter("bytes handed to readers from memory")
    source_bytes: int = counter("bytes read from the source")
    peer_bytes: int = counter("bytes received from peers (verified)")
    peer_hits: int = counter("blocks received from peers (verified)")
    fills: int = counter("blocks filled (from peers or the source)")
    readahead_fills: int = counter("fills started by readahead")
    fills_in_flight: int = gauge("fills running now")
    readahead_window_blocks: int = gauge(
        "blocks readahead fetches ahead of a reader now (shrinks under memory pressure)"
    )
    deduplicated_fills: int = counter(
        "readers and peers that shared a fill already in flight instead of reading again"
    )


class Loader:
    def __init__(
        self,
        store: BlockStore,
        source: Source,
        nursery: trio.Nursery,
        *,
        read_ahead_blocks: int,
        peers: PeerFetcher | None = None,
    ) -> None:
        self.store = store
        self.block_size = store.block_size_bytes
        self._source = source
        self._peers = peers
        self._flight: SingleFlight[BlockKey, Block] = SingleFlight(nursery)
        # Readahead must not evict what readers are about to use: keep it to a
        # fraction of the capacity, and shrink it while its blocks are evicted
        # before they are read (memory pressure); it grows back, one block at a
        # time, as readers use what it fetched.
        capacity_blocks = store.capacity_bytes // store.block_size_bytes
        self._read_ahead_blocks = min(read_ahead_blocks, max(0, capacity_blocks // 4))
        self._window = self._read_ahead_blocks
        self._capacity_blocks = capacity_blocks
        self._evicted_unread_seen = 0
        self._fills_at_last_change = 0
        self._space_freed = trio.Event()
        self._readahead_in_flight = 0
        self._about_to_read: Callable[[BlockKey], bool] | None = None
        self.counters = LoaderStatistics()
        # A failing source fails many reads: one log line per interval, with a count.
        self._source_error = RateLimitedEvent("source_error", SOURCE_ERROR_LOG_INTERVAL_S)

    def set_peers(self, peers: PeerFetcher | None) -> None:
        self._peers = peers

    def set_reader_guard(self, about_to_read: Callable[[BlockKey], bool]) -> None:
        """Fills ahead of readers (readahead, prefetch) never evict a block for
        which `about_to_read` is True while another block can go."""
        self._about_to_read = about_to_read

    def cached(self, key: BlockKey) -> Block | None:
        """The block if it is in memory (no fill, no statistics)."""
        return self.store.get(key)

    async def block(self, key: BlockKey, wanted_bytes: int) -> Block:
        """The block for `key`, from memory or filled once. ReadError on failure.

        `wanted_bytes` is how much of it the reader takes (for statistics).
        """
        block = self.store.get(key)
        if block is not None:
            self.counters.hits += 1
            self.counters.memory_bytes += wanted_bytes
            block.unread = False  # read: not a readahead block evicted unread
            return block
        self.counters.misses += 1
        try:
            block = await self._filled(key, ask_peers=True)
            block.unread = False  # read: not a readahead block evicted unread
            return block
        except SourceError as error:
            self._source_error(path=os.fsdecode(key.version.relpath), error=str(error))
            raise
        except ReadError:
            raise
        except OSError as error:
            self._source_error(path=os.fsdecode(key.version.relpath), error=str(error))
            raise SourceError(str(error)) from error

    async def fill_for_peer(self, key: BlockKey) -> Block:
        """Fill as the owner on behalf of a peer: memory or the source, never a peer."""
        block = self.store.get(key)
        if block is not None:
            return block
        return await self._filled(key, ask_peers=False)

    async def _filled(self, key: BlockKey, *, ask_peers: bool) -> Block:
        while True:
            block = await self._flight.do(key, lambda: self._fill(key, ask_peers=ask_peers))
            # A waiter can wake after the block was already evicted and its
            # buffer reused by another fill: never hand that out, fill again.
            if not block.recycled:
                return block

    def read_ahead(self, version: FileVersion, after_index: int) -> None:
        """Start fills for the blocks after `after_index` (sequential reader)."""
        self._adapt_window()
        last = min(after_index + self._window, version.block_count(self.block_size) - 1)
        for index in range(after_index + 1, last + 1):
            if self._readahead_in_flight >= self._read_ahead_blocks:
                return
            key = BlockKey(version, index)
            if self.holds(key):
                continue
            self._readahead_in_flight += 1
            self.counters.readahead_fills += 1
            self._flight.start(key, functools.partial(self._readahead_fill, key))

    def holds(self, key: BlockKey) -> bool:
        """Whether `key` is in memory or being filled."""
        return key in self.store or self._flight.in_flight(key)

    async def prefetch(self, key: BlockKey) -> bool:
        """Fill `key` ahead of its readers unless it is in memory or being filled;
        True once this call filled it. ReadError or OSError if the fill failed."""
        if self.holds(key):
            return False
        await self._flight.do(key, functools.partial(self._fill_ahead, key))
        return True

    async def warm(self, key: BlockKey) -> str:
        """Make `key` resident for a warm-up; where its bytes came from: "memory"
        (already there), "peer" or "source". ReadError if the fill failed."""
        if self.store.get(key) is not None:  # marks it recently used
            return "memory"
        try:
            return (await self._filled(key, ask_peers=True)).origin
        except ReadError:
            raise
        except OSError as error:
            raise SourceError(str(error)) from error

    def _adapt_window(self) -> None:
        """Halve the readahead window when its blocks were evicted unread; after a
        capacity's worth of fills without that, let it grow by one block."""
        evicted_unread = self.store.counters.readahead_evicted_unread
        if evicted_unread > self._evicted_unread_seen:
            self._evicted_unread_seen = evicted_unread
            self._window //= 2
            self._fills_at_last_change = self.counters.fills
        elif (
            self._window < self._read_ahead_blocks
            and self.counters.fills - self._fills_at_last_change >= self._capacity_blocks
        ):
            self._window += 1
            self._fills_at_last_change = self.counters.fills

    async def _readahead_fill(self, key: BlockKey) -> Block:
        try:
            return await self._fill_ahead(key)
        finally:
            self._readahead_in_flight -= 1

    async def _fill_ahead(self, key: BlockKey) -> Block:
        """A fill for no reader yet: its block counts as unread until a reader takes it
        (marked before any waiter wakes, so a reader's take is never undone)."""
        already = self.store.get(key)
        block = await self._fill(key, ahead=True)
        if block is not already:
            block.unread = True
        return block

    async def _fill(self, key: BlockKey, *, ask_peers: bool = True, ahead: bool = False) -> Block:
        block = self.store.get(key)  # filled while this fill waited to start
        if block is not None:
            return block
        length = key.length(self.block_size)
        buffer = await self._reserve(length, spare=self._about_to_read if ahead else None)
        try:
            view = memoryview(buffer)[:length]
            checksum = None
            checksum_from_source = False
            if ask_peers and self._peers is not None:
                checksum = await self._peers.fetch_into(key, view)
                if checksum is not None:
                    self.counters.peer_hits += 1
                    self.counters.peer_bytes += length
            if checksum is None:
                checksum = await self._source.read_block(key, view, self.block_size)
                checksum_from_source = True
                self.counters.source_bytes += length
        except trio.Cancelled:
            # A read abandoned at shutdown may still write into the buffer: drop it.
            self.store.abandon(buffer)
            raise
        except BaseException:
            self.store.release(buffer)
            self._wake_reservers()
            raise
        block = self.store.put(key, buffer, length, checksum)
        if block.buffer is buffer and not checksum_from_source:
            block.origin = "peer"
        self.counters.fills += 1
        self._wake_reservers()
        return block

    async def _reserve(
        self, length: int, spare: Callable[[BlockKey], bool] | None = None
    ) -> Buffer:
        while (buffer := self.store.try_allocate(length, spare)) is None:
            await self._space_freed.wait()
        return buffer

    def _wake_reservers(self) -> None:
        self._space_freed.set()
        self._space_freed = trio.Event()

    def statistics(self) -> LoaderStatistics:
        flight = self._flight.statistics()
        return replace(
            self.counters,
            fills_in_flight=flight.in_flight,
            deduplicated_fills=flight.joined,
            readahead_window_blocks=self._window,
        )
