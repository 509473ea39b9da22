"""Pinned files in the block store (--pin), the pattern rule, and event lines."""

from __future__ import annotations

import json
import logging
import random

import pytest

from memcachefs.blockstore import BlockStore
from memcachefs.cli import _JsonFormatter
from memcachefs.events import RateLimitedEvent, event
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.patterns import expand, matches

BS = 4096
PINNED = FileVersion(b"models/a.safetensors", 4 * BS, 1)
OTHER = FileVersion(b"data/flood.bin", 1000 * BS, 1)


def store_block(store: BlockStore, k: BlockKey) -> None:
    length = k.length(BS)
    buffer = store.try_allocate(length)
    assert buffer is not None
    store.put(k, buffer, length, checksum=0)


def total(store: BlockStore) -> int:
    stats = store.statistics()
    return stats.used_bytes + stats.reserved_bytes + stats.free_buffer_bytes


def test_pinned_blocks_survive_a_flood_of_other_blocks() -> None:
    store = BlockStore(8 * BS, BS, pin_limit_bytes=4 * BS)
    store.pin(PINNED)
    for index in range(4):
        store_block(store, BlockKey(PINNED, index))
    for index in range(100):
        store_block(store, BlockKey(OTHER, index))
        assert total(store) <= 8 * BS
    assert all(BlockKey(PINNED, index) in store for index in range(4))
    stats = store.statistics()
    assert stats.pinned_bytes == 4 * BS
    assert stats.pinned_files == 1
    assert stats.used_bytes == 8 * BS


def test_pinned_blocks_past_the_limit_are_ordinary_and_reported_once() -> None:
    reported: list[tuple[FileVersion, bool]] = []
    store = BlockStore(
        8 * BS,
        BS,
        pin_limit_bytes=2 * BS,
        on_protected_evicted=lambda v, p: reported.append((v, p)),
    )
    store.pin(PINNED)
    for index in range(4):
        store_block(store, BlockKey(PINNED, index))
    for index in range(20):
        store_block(store, BlockKey(OTHER, index))
    assert BlockKey(PINNED, 0) in store and BlockKey(PINNED, 1) in store
    assert BlockKey(PINNED, 2) not in store and BlockKey(PINNED, 3) not in store
    assert reported == [(PINNED, True)]


def test_a_new_version_is_pinned_and_the_old_one_becomes_evictable() -> None:
    store = BlockStore(8 * BS, BS, pin_limit_bytes=4 * BS)
    store.pin(PINNED)
    for index in range(4):
        store_block(store, BlockKey(PINNED, index))
    newer = FileVersion(PINNED.relpath, PINNED.size, 2)
    store.pin(newer)
    assert store.is_pinned(newer) and not store.is_pinned(PINNED)
    assert store.statistics().pinned_bytes == 0
    for index in range(4):
        store_block(store, BlockKey(newer, index))
    for index in range(20):
        store_block(store, BlockKey(OTHER, index))
    assert not any(BlockKey(PINNED, index) in store for index in range(4))
    assert all(BlockKey(newer, index) in store for index in range(4))
    assert total(store) <= 8 * BS


def test_pinning_blocks_already_stored_moves_them_out_of_the_lru() -> None:
    store = BlockStore(8 * BS, BS, pin_limit_bytes=4 * BS)
    for index in range(4):
        store_block(store, BlockKey(PINNED, index))
    store.pin(PINNED)
    assert store.statistics().pinned_bytes == 4 * BS
    for index in range(20):
        store_block(store, BlockKey(OTHER, index))
    assert all(BlockKey(PINNED, index) in store for index in range(4))


def test_watched_version_eviction_is_reported_once() -> None:
    reported: list[tuple[FileVersion, bool]] = []
    store = BlockStore(4 * BS, BS, on_protected_evicted=lambda v, p: reported.append((v, p)))
    store.watch(PINNED)
    for index in range(4):
        store_block(store, BlockKey(PINNED, index))
    for index in range(8):
        store_block(store, BlockKey(OTHER, index))
    assert reported == [(PINNED, False)]


@pytest.mark.parametrize("seed", range(10))
def test_budget_holds_with_pins_discards_and_new_versions(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([2, 3, 5, 8]) * BS + rng.choice([0, 100])
    store = BlockStore(capacity, BS, pin_limit_bytes=capacity // 2)
    versions = [FileVersion(b"p", 6 * BS - 10, 1), FileVersion(b"p", 6 * BS, 2), OTHER]
    for _ in range(400):
        action = rng.random()
        version = rng.choice(versions)
        k = BlockKey(version, rng.randrange(version.block_count(BS)))
        if action < 0.1:
            store.pin(rng.choice(versions[:2]))
        elif action < 0.2:
            store.discard(k)
        elif k not in store:
            buffer = store.try_allocate(k.length(BS))
            if buffer is not None:
                store.put(k, buffer, k.length(BS), checksum=0)
        stats = store.statistics()
        assert total(store) <= capacity
        assert stats.pinned_bytes <= capacity // 2


def test_pattern_rule() -> None:
    assert matches("models/sd/a.safetensors", "models/sd/*.safetensors")
    assert not matches("models/sd/x/a.safetensors", "models/sd/*.safetensors")
    assert matches("a.safetensors", "**/*.safetensors")
    assert matches("a/b/c.safetensors", "**/*.safetensors")
    assert not matches("a/b/c.safetensors.tmp", "**/*.safetensors")


def test_expand_lists_regular_files_with_sizes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "m" / "b.txt").write_bytes(b"y")
    (tmp_path / "c.bin").write_bytes(b"zz")
    assert expand(tmp_path, ("**/*.bin",)) == [("c.bin", 2), ("m/a.bin", 10)]
    assert expand(tmp_path, ("nothing/*",)) == []


def test_event_fields_become_json_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="memcachefs.events"):
        event("mounted", source="/src", mountpoint="/mnt")
    (record,) = caplog.records
    entry = json.loads(_JsonFormatter().format(record))
    assert entry["event"] == "mounted"
    assert entry["source"] == "/src" and entry["mountpoint"] == "/mnt"
    assert entry["level"] == "info"


def test_rate_limited_event_counts_the_lines_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    source_error = RateLimitedEvent("source_error", 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="memcachefs.events"):
        assert source_error(path="a")
        assert not source_error(path="b")
        assert not source_error(path="c")
        now[0] = 11.0
        assert source_error(path="d")
    assert [r.fields for r in caplog.records] == [  # type: ignore[attr-defined]
        {"suppressed": 0, "path": "a"},
        {"suppressed": 2, "path": "d"},
    ]
