"""A byte-budgeted LRU store of blocks, with buffer reuse.

Sync code, touched only from the trio thread (cachetools is not thread-safe).
Every byte the store holds counts against the budget: stored blocks, buffers
reserved by fills in flight, and evicted buffers kept for reuse. So
``used + reserved + free <= capacity`` always holds.

Full-size buffers are recycled: first touch of fresh memory costs more than the
copy into it, and glibc tends to overshoot a budget of many fresh allocations.
A buffer is recycled only when nothing outside the store still looks at it
(``pins``), e.g. a page-cache push running in a worker thread.

Pinned files (``--pin``): blocks of a pinned FileVersion are held outside the
LRU, in a dict counted against the same budget, so eviction never takes them,
as long as the pinned bytes stay within ``pin_limit_bytes`` (blocks past it are
ordinary LRU blocks). A new version of a pinned file is pinned in its place and
the old version's blocks become ordinary LRU blocks. Watched versions (a warm
set) and pinned ones are reported once per version when one of their blocks is
evicted (`on_protected_evicted`).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, replace

from cachetools import LRUCache

from memcachefs.keys import BlockKey, FileVersion
from memcachefs.metrics import counter, gauge

# A block's memory: anonymous mmap, returned to the kernel as soon as it is dropped.
Buffer = mmap.mmap


# Blocks an eviction for a fill ahead of readers passes over at most (bounded work).
MAX_SPARED = 64


class Block:
    """Immutable bytes of one block: a buffer, the valid length and its xxh3-64.

    `recycled` turns True when the block was evicted and its buffer went back to
    the store for another fill: from then on its bytes may belong to another
    key, so a holder must not serve them (it fills the block again instead).
    """

    __slots__ = ("buffer", "checksum", "length", "origin", "pins", "recycled", "unread")

    def __init__(self, buffer: Buffer, length: int, checksum: int) -> None:
        self.buffer = buffer
        self.length = length
        self.checksum = checksum
        self.pins = 0
        self.recycled = False
        self.unread = False  # filled ahead of a reader that has not read it yet
        self.origin = "source"  # or "peer": where its fill got the bytes

    @property
    def view(self) -> memoryview:
        return memoryview(self.buffer)[: self.length]


@dataclass
class StoreStatistics:
    capacity_bytes: int = gauge("bytes of memory for cached blocks: the store never holds more")
    used_bytes: int = gauge("bytes of blocks stored")
    reserved_bytes: int = gauge("bytes of buffers held by fills in flight")
    free_buffer_bytes: int = gauge("bytes of evicted buffers kept for reuse")
    blocks: int = gauge("blocks stored")
    evictions: int = counter("blocks evicted")
    buffers_allocated: int = counter("block buffers allocated")
    buffers_reused: int = counter("block buffers reused after an eviction")
    readahead_evicted_unread: int = counter(
        "blocks filled ahead of a reader and evicted before it read them"
    )
    pinned_bytes: int = gauge("bytes of blocks of pinned files, kept out of LRU eviction")
    pinned_files: int = gauge("files pinned (--pin)")


class _EvictingLRU(LRUCache[BlockKey, Block]):
    """LRUCache that hands every evicted block to a callback (all evictions use popitem)."""

    def __init__(self, maxsize: int, on_evict: Callable[[BlockKey, Block], None]) -> None:
        super().__init__(maxsize, getsizeof=lambda block: len(block.buffer))
        self._on_evict = on_evict

    def popitem(self) -> tuple[BlockKey, Block]:
        key, block = super().popitem()
        self._on_evict(key, block)
        return key, block


class BlockStore:
    def __init__(
        self,
        capacity_bytes: int,
        block_size_bytes: int,
        *,
        pin_limit_bytes: int = 0,
        on_protected_evicted: Callable[[FileVersion, bool], None] | None = None,
    ) -> None:
        if capacity_bytes < block_size_bytes:
            raise ValueError("capacity must hold at least one block")
        self.capacity_bytes = capacity_bytes
        self.block_size_bytes = block_size_bytes
        self.pin_limit_bytes = min(pin_limit_bytes, capacity_bytes)
        self._lru = _EvictingLRU(capacity_bytes, self._evicted)
        self._free: list[Buffer] = []
        self._reserved_bytes = 0
        self._pinned: dict[BlockKey, Block] = {}
        self._pinned_bytes = 0
        self._pinned_versions: dict[bytes, FileVersion] = {}  # relpath -> pinned version
        self._watched: set[FileVersion] = set()
        self._reported: set[FileVersion] = set()  # evictions reported once per version
        self._on_protected_evicted = on_protected_evicted
        self.counters = StoreStatistics(capacity_bytes=capacity_bytes)

    # -- pinning and watching ------------------------------------------------
    def pin(self, version: FileVersion) -> None:
        """Keep `version`'s blocks out of LRU eviction (within `pin_limit_bytes`).

        A previously pinned version of the same path is unpinned: its blocks
        become ordinary LRU blocks (most recently used first)."""
        old = self._pinned_versions.get(version.relpath)
        if old == version:
            return
        if old is not None:
            self._unpin_blocks(old)
        self._pinned_versions[version.relpath] = version
        self._reported.discard(version)
        # Blocks of this version already in the LRU move into the pinned set.
        for key in [key for key in self._lru if key.version == version]:
            size = len(self._lru[key].buffer)  # Cache.__getitem__ does not touch order
            if self._pinned_bytes + size > self.pin_limit_bytes:
                break
            block = self._lru.pop(key)
            self._pinned[key] = block
            self._pinned_bytes += size

    def is_pinned(self, version: FileVersion) -> bool:
        return self._pinned_versions.get(version.relpath) == version

    def pinned_version(self, relpath: bytes) -> FileVersion | None:
        return self._pinned_versions.get(relpath)

    def watch(self, version: FileVersion) -> None:
        """Report the first eviction of one of `version`'s blocks (a warm file)."""
        self._watched.add(version)
        self._reported.discard(version)

    def _unpin_blocks(self, version: FileVersion) -> None:
        for key in [key for key in self._pinned if key.version == version]:
            block = self._pinned.pop(key)
            self._pinned_bytes -= len(block.buffer)
            # The LRU's maxsize is the whole capacity and the total never exceeds
            # it, so these inserts never evict.
            self._lru[key] = block

    # -- lookups -------------------------------------------------------------
    def get(self, key: BlockKey) -> Block | None:
        """The block for `key`, marking it most recently used; None on a miss."""
        block = self._pinned.get(key)
        return block if block is not None else self._lru.get(key)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._pinned or key in self._lru

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    # -- filling -------------------------------------------------------------
    def try_allocate(
        self, length: int, spare: Callable[[BlockKey], bool] | None = None
    ) -> Buffer | None:
        """A buffer for a block of `length` bytes, reserved against the budget.

        Evicts least recently used blocks to make room. Returns None only when
        fills in flight already reserve the whole budget; the caller waits for
        `put` or `release` and tries again. A fill ahead of its readers passes
        `spare`: blocks it answers True for (an open handle is about to read
        them) are passed over, as long as another block can go (at most
        MAX_SPARED per eviction are looked at).
        """
        if not 0 < length <= self.block_size_bytes:
            raise ValueError(f"bad block length {length}")
        while True:
            if length == self.block_size_bytes and self._free:
                break  # a spare buffer is already counted: no room needed
            if self._total_bytes() + length <= self.capacity_bytes:
                break
            if self._free:
                self._free.pop()  # spares are full-size; this fill wants another size
            elif self._lru:
                self._evict_one(spare)
            else:
                return None
        buffer = self._take_buffer(length)
        self._reserved_bytes += len(buffer)
        return buffer

    def put(self, key: BlockKey, buffer: Buffer, length: int, checksum: int) -> Block:
        """Store a filled buffer obtained from `try_allocate`."""
        self._reserved_bytes -= len(buffer)
        block = Block(buffer, length, checksum)
        existing = self.get(key)
        if existing is not None:  # filled twice (never via one single-flight): keep one
            self._recycle(buffer)
            return existing
        pinned = self._pinned_versions.get(key.version.relpath)
        if pinned is not None and pinned != key.version and key.version.mtime_ns >= pinned.mtime_ns:
            self.pin(key.version)  # the pinned file changed in the source: pin the new version
        if self.is_pinned(key.version) and self._pinned_bytes + len(buffer) <= self.pin_limit_bytes:
            self._pinned[key] = block
            self._pinned_bytes += len(buffer)
            return block
        # Room was reserved by try_allocate, so this insert never needs to evict
        # more than that reservation freed.
        self._lru[key] = block
        return block

    def release(self, buffer: Buffer) -> None:
        """Return a reserved buffer whose fill failed."""
        self._reserved_bytes -= len(buffer)
        self._recycle(buffer)

    def abandon(self, buffer: Buffer) -> None:
        """Forget a reserved buffer that a thread may still write into (never reused)."""
        self._reserved_bytes -= len(buffer)

    def discard(self, key: BlockKey) -> None:
        block = self._pinned.pop(key, None)
        if block is not None:
            self._pinned_bytes -= len(block.buffer)
        else:
            block = self._lru.pop(key, None)
        if block is not None:
            self._retire(block)

    # -- internals -----------------------------------------------------------
    def _evict_one(self, spare: Callable[[BlockKey], bool] | None) -> None:
        if spare is None:
            self._lru.popitem()
            return
        passed: list[tuple[BlockKey, Block]] = []
        try:
            while self._lru and len(passed) < MAX_SPARED:
                key, block = LRUCache.popitem(self._lru)  # no eviction yet: look first
                if not spare(key):
                    self._evicted(key, block)
                    return
                passed.append((key, block))
            if self._lru:
                self._lru.popitem()
            elif passed:  # every block is about to be read: the oldest goes all the same
                key, block = passed.pop(0)
                self._evicted(key, block)
        finally:
            for key, block in passed:  # back, as most recently used (they are wanted)
                self._lru[key] = block

    def _total_bytes(self) -> int:
        free_bytes = len(self._free) * self.block_size_bytes
        pinned = self._pinned_bytes
        return int(self._lru.currsize) + pinned + self._reserved_bytes + free_bytes

    def _take_buffer(self, size: int) -> Buffer:
        if size == self.block_size_bytes and self._free:
            self.counters.buffers_reused += 1
            return self._free.pop()
        self.counters.buffers_allocated += 1
        # Private anonymous memory, zeroed lazily by the kernel: its pages are
        # first touched by the fill in a worker thread (preadv, recv_into), not
        # here on the trio thread as bytearray(size) would (4 MiB of zeros
        # written, then faulted in, while READs wait). Measured: cold reads
        # 0.78 -> 1.24 GB/s, remote hits 0.57 -> 0.75 GB/s. (mmap's default,
        # MAP_SHARED, would be shmem: slower faults, counted as shared memory.)
        # Not advised to use huge pages: with MADV_HUGEPAGE a loopback remote hit
        # got faster, but a remote read over a 4 gbit link fell from 0.99x to
        # 0.86x raw TCP (benchmarks/README.md, the b3b329c sitting).
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _evicted(self, key: BlockKey, block: Block) -> None:
        self._retire(block)
        version = key.version
        if version in self._reported:
            return
        pinned = self.is_pinned(version)
        if pinned or version in self._watched:
            self._reported.add(version)
            if self._on_protected_evicted is not None:
                self._on_protected_evicted(version, pinned)

    def _retire(self, block: Block) -> None:
        self.counters.evictions += 1
        if block.unread:
            self.counters.readahead_evicted_unread += 1
        if block.pins == 0:
            block.recycled = self._recycle(block.buffer)

    def _recycle(self, buffer: Buffer) -> bool:
        """Keep a full-size buffer for reuse; True if it was kept."""
        if len(buffer) == self.block_size_bytes:
            self._free.append(buffer)
            return True
        return False

    def statistics(self) -> StoreStatistics:
        return replace(
            self.counters,
            used_bytes=int(self._lru.currsize) + self._pinned_bytes,
            reserved_bytes=self._reserved_bytes,
            free_buffer_bytes=len(self._free) * self.block_size_bytes,
            blocks=len(self),
            pinned_bytes=self._pinned_bytes,
            pinned_files=len(self._pinned_versions),
        )
