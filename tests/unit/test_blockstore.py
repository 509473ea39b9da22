"""The byte-budgeted LRU store: budget, eviction order, buffer reuse, pins."""

from __future__ import annotations

import random

import pytest

from memcachefs.blockstore import BlockStore
from memcachefs.keys import BlockKey, FileVersion

BS = 4096
VERSION = FileVersion(b"model.bin", 1000 * BS, 1)


def key(index: int, version: FileVersion = VERSION) -> BlockKey:
    return BlockKey(version, index)


def store_block(store: BlockStore, k: BlockKey, fill: int = 0) -> None:
    length = k.length(BS)
    buffer = store.try_allocate(length)
    assert buffer is not None
    buffer[:length] = bytes([fill]) * length
    store.put(k, buffer, length, checksum=fill)


def total(store: BlockStore) -> int:
    stats = store.statistics()
    return stats.used_bytes + stats.reserved_bytes + stats.free_buffer_bytes


def test_constructor_refuses_capacity_below_one_block() -> None:
    with pytest.raises(ValueError):
        BlockStore(BS - 1, BS)


def test_try_allocate_refuses_bad_lengths() -> None:
    store = BlockStore(4 * BS, BS)
    for length in (0, -1, BS + 1):
        with pytest.raises(ValueError):
            store.try_allocate(length)


def test_put_then_get_returns_the_bytes_and_checksum() -> None:
    store = BlockStore(4 * BS, BS)
    store_block(store, key(0), fill=7)
    block = store.get(key(0))
    assert block is not None
    assert bytes(block.view) == bytes([7]) * BS
    assert block.checksum == 7
    assert key(0) in store
    assert store.get(key(1)) is None


def test_evicts_least_recently_used_and_get_refreshes() -> None:
    store = BlockStore(3 * BS, BS)
    for i in range(3):
        store_block(store, key(i), fill=i)
    assert store.get(key(0)) is not None  # 0 is now the most recent; 1 the oldest
    store_block(store, key(3), fill=3)
    assert key(1) not in store
    assert {key(0), key(2), key(3)} == {k for k in map(key, range(4)) if k in store}
    store_block(store, key(4), fill=4)
    assert key(2) not in store
    assert key(0) in store
    assert store.statistics().evictions == 2


def test_evicted_buffers_are_reused_not_reallocated() -> None:
    store = BlockStore(2 * BS, BS)
    store_block(store, key(0))
    store_block(store, key(1))
    first = store.get(key(0))
    assert first is not None
    old_buffer = first.buffer
    assert store.get(key(1)) is not None  # key 0 is the least recently used again
    store_block(store, key(2), fill=9)  # evicts key 0, whose buffer comes back
    stats = store.statistics()
    assert stats.buffers_allocated == 2
    assert stats.buffers_reused == 1
    assert key(0) not in store
    new = store.get(key(2))
    assert new is not None
    assert new.buffer is old_buffer
    assert bytes(new.view) == bytes([9]) * BS


def test_short_last_block_uses_an_exact_buffer_and_counts_its_length() -> None:
    version = FileVersion(b"short", 2 * BS + 100, 1)
    store = BlockStore(3 * BS, BS)
    store_block(store, key(2, version), fill=1)
    block = store.get(key(2, version))
    assert block is not None
    assert block.length == 100
    assert len(block.view) == 100
    assert store.statistics().used_bytes == 100
    # A spare full-size buffer is not handed out for a short block's budget.
    store_block(store, key(0, version))
    store_block(store, key(1, version))
    assert total(store) <= 3 * BS


def test_try_allocate_returns_none_when_fills_reserve_everything() -> None:
    store = BlockStore(2 * BS, BS)
    a = store.try_allocate(BS)
    b = store.try_allocate(BS)
    assert a is not None
    assert b is not None
    assert store.try_allocate(BS) is None
    assert store.try_allocate(10) is None
    store.release(a)  # a failed fill gives its room back as a spare buffer
    c = store.try_allocate(BS)
    assert c is a
    assert total(store) == 2 * BS


def test_release_of_a_short_buffer_frees_its_bytes() -> None:
    store = BlockStore(BS, BS)
    short = store.try_allocate(10)
    assert short is not None
    assert store.try_allocate(BS) is None
    store.release(short)
    assert total(store) == 0
    assert store.try_allocate(BS) is not None


def test_pinned_block_buffer_is_never_recycled() -> None:
    # A worker thread may still read a pinned block's buffer after eviction.
    store = BlockStore(BS, BS)
    store_block(store, key(0), fill=5)
    pinned = store.get(key(0))
    assert pinned is not None
    pinned.pins += 1
    store_block(store, key(1), fill=6)
    assert key(0) not in store
    current = store.get(key(1))
    assert current is not None
    assert current.buffer is not pinned.buffer
    assert bytes(pinned.view) == bytes([5]) * BS
    assert store.statistics().buffers_reused == 0
    assert total(store) <= BS


def test_discard_removes_the_block_and_keeps_the_buffer_for_reuse() -> None:
    store = BlockStore(2 * BS, BS)
    store_block(store, key(0))
    store.discard(key(0))
    store.discard(key(0))  # discarding a missing key is harmless
    assert key(0) not in store
    stats = store.statistics()
    assert stats.used_bytes == 0
    assert stats.free_buffer_bytes == BS
    store_block(store, key(1))
    assert store.statistics().buffers_reused == 1


def test_put_of_an_existing_key_keeps_one_copy() -> None:
    store = BlockStore(3 * BS, BS)
    a = store.try_allocate(BS)
    b = store.try_allocate(BS)
    assert a is not None
    assert b is not None
    first = store.put(key(0), a, BS, checksum=1)
    second = store.put(key(0), b, BS, checksum=2)
    assert second is first
    assert len(store) == 1
    assert total(store) <= 3 * BS
    assert store.statistics().reserved_bytes == 0


@pytest.mark.parametrize("seed", range(20))
def test_budget_holds_under_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([1, 2, 3, 5, 8]) * BS + rng.choice([0, 0, 100])
    store = BlockStore(capacity, BS)
    versions = [FileVersion(b"f%d" % i, rng.randrange(1, 6 * BS), i) for i in range(4)]
    reserved: list[tuple[BlockKey, bytearray]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.45:
            version = rng.choice(versions)
            k = BlockKey(version, rng.randrange(version.block_count(BS)))
            buffer = store.try_allocate(k.length(BS))
            if buffer is None:
                # Only legitimate when fills in flight hold the whole budget.
                assert store.statistics().reserved_bytes + k.length(BS) > capacity
            else:
                assert len(buffer) >= k.length(BS)
                reserved.append((k, buffer))
        elif op < 0.7 and reserved:
            k, buffer = reserved.pop(rng.randrange(len(reserved)))
            length = k.length(BS)
            buffer[:length] = bytes([k.index % 256]) * length
            block = store.put(k, buffer, length, checksum=k.index)
            assert block.length == length
        elif op < 0.85 and reserved:
            store.release(reserved.pop(rng.randrange(len(reserved)))[1])
        elif op < 0.95:
            version = rng.choice(versions)
            k = BlockKey(version, rng.randrange(version.block_count(BS)))
            block = store.get(k)
            if block is not None:  # stored bytes never change while stored
                assert bytes(block.view) == bytes([k.index % 256]) * k.length(BS)
        else:
            version = rng.choice(versions)
            store.discard(BlockKey(version, rng.randrange(version.block_count(BS))))
        stats = store.statistics()
        assert stats.used_bytes + stats.reserved_bytes + stats.free_buffer_bytes <= capacity
        assert stats.reserved_bytes == sum(len(b) for _, b in reserved)
        assert stats.blocks == len(store)


def test_block_is_marked_recycled_once_its_buffer_is_reused() -> None:
    # A reader still holding such a block must not serve its bytes.
    store = BlockStore(BS, BS)
    store_block(store, key(0), fill=1)
    old = store.get(key(0))
    assert old is not None
    assert not old.recycled
    store_block(store, key(1), fill=2)
    assert old.recycled
    assert bytes(old.view) == bytes([2]) * BS  # the reason for the flag


def test_pinned_or_short_blocks_are_not_marked_recycled_on_eviction() -> None:
    version = FileVersion(b"short", 100, 1)
    store = BlockStore(BS, BS)
    store_block(store, key(0, version), fill=3)
    short = store.get(key(0, version))
    assert short is not None
    store_block(store, key(0), fill=4)
    assert key(0, version) not in store
    assert not short.recycled  # its buffer was dropped, never handed out again
    assert bytes(short.view) == bytes([3]) * 100
    pinned = store.get(key(0))
    assert pinned is not None
    pinned.pins = 1
    store.discard(key(0))
    assert not pinned.recycled
