"""The miss path: hits and misses, one fill per key, readahead, budget, peers."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
import trio
import trio.testing
import xxhash

from memcachefs.blockstore import BlockStore
from memcachefs.errors import ReadError, SourceError
from memcachefs.keys import BlockKey
from memcachefs.loader import Loader
from memcachefs.source import Source

BS = 4096


def within_budget(store: BlockStore) -> bool:
    stats = store.statistics()
    return stats.used_bytes + stats.reserved_bytes + stats.free_buffer_bytes <= stats.capacity_bytes


@pytest.fixture
def files(make_payload) -> dict[bytes, bytes]:
    return {b"big": make_payload(20 * BS, seed=1), b"short": make_payload(BS + 123, seed=2)}


@pytest.fixture
def fake(fake_source_cls, files):
    return fake_source_cls(files)


def expected(files: dict[bytes, bytes], key: BlockKey) -> bytes:
    start = key.offset(BS)
    return files[key.version.relpath][start : start + BS]


async def test_miss_then_hit_with_statistics(fake, files) -> None:
    store = BlockStore(8 * BS, BS)
    key = BlockKey(fake.version(b"short"), 1)
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0)
        block = await loader.block(key, 100)
        assert bytes(block.view) == expected(files, key)
        assert block.length == 123
        assert block.checksum == xxhash.xxh3_64_intdigest(expected(files, key))
        again = await loader.block(key, 50)
        assert again is block
    stats = loader.statistics()
    assert (stats.hits, stats.misses) == (1, 1)
    assert stats.memory_bytes == 50
    assert stats.source_bytes == 123
    assert len(fake.reads) == 1
    assert loader.cached(key) is block


async def test_concurrent_readers_of_a_cold_block_cause_one_source_read(fake, files) -> None:
    store = BlockStore(8 * BS, BS)
    key = BlockKey(fake.version(b"big"), 3)
    fake.gate = trio.Event()
    blocks = []
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0)

        async def reader() -> None:
            blocks.append(await loader.block(key, BS))

        async with trio.open_nursery() as readers:
            for _ in range(10):
                readers.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert loader.statistics().fills_in_flight == 1
            fake.gate.set()
    assert len(fake.reads) == 1
    assert all(block is blocks[0] for block in blocks)
    assert bytes(blocks[0].view) == expected(files, key)
    stats = loader.statistics()
    assert stats.misses == 10
    assert stats.deduplicated_fills == 9
    assert stats.fills_in_flight == 0


async def test_concurrent_readers_share_one_read_of_a_real_source(
    tmp_path: Path, make_payload
) -> None:
    data = make_payload(4 * BS, seed=3)
    (tmp_path / "f").write_bytes(data)
    blocks = []
    with Source(tmp_path, block_threads=4, metadata_threads=4) as source:
        version = await source.open(b"f")
        async with trio.open_nursery() as nursery:
            loader = Loader(BlockStore(8 * BS, BS), source, nursery, read_ahead_blocks=0)

            async def reader() -> None:
                blocks.append(await loader.block(BlockKey(version, 2), BS))

            async with trio.open_nursery() as readers:
                for _ in range(10):
                    readers.start_soon(reader)
        assert source.statistics().block_reads == 1
    assert len(blocks) == 10
    assert all(bytes(block.view) == data[2 * BS : 3 * BS] for block in blocks)


async def test_readahead_is_bounded_and_fills_the_next_blocks(fake, files) -> None:
    store = BlockStore(64 * BS, BS)
    version = fake.version(b"big")
    fake.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=4)
        loader.read_ahead(version, 0)
        loader.read_ahead(version, 1)  # still 4 in flight: nothing more starts
        loader.read_ahead(version, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.in_flight == 4
        assert loader.statistics().readahead_fills == 4
        fake.gate.set()
    assert sorted(key.index for key in fake.reads) == [1, 2, 3, 4]
    assert all(BlockKey(version, i) in store for i in (1, 2, 3, 4))
    async with trio.open_nursery() as nursery:
        loader2 = Loader(store, fake, nursery, read_ahead_blocks=4)
        loader2.read_ahead(version, 18)  # only block 19 is left in the file
    assert [key.index for key in fake.reads[4:]] == [19]


@pytest.mark.parametrize(("capacity_blocks", "allowed"), [(2, 0), (4, 1), (8, 2), (64, 4)])
async def test_readahead_is_capped_at_a_quarter_of_the_capacity(
    fake, capacity_blocks: int, allowed: int
) -> None:
    store = BlockStore(capacity_blocks * BS, BS)
    fake.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=4)
        loader.read_ahead(fake.version(b"big"), 0)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.in_flight == allowed
        fake.gate.set()


async def test_readahead_skips_blocks_already_stored(fake) -> None:
    store = BlockStore(64 * BS, BS)
    version = fake.version(b"big")
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=4)
        await loader.block(BlockKey(version, 2), BS)
        loader.read_ahead(version, 0)
    assert sorted(key.index for key in fake.reads) == [1, 2, 3, 4]  # 2 read once


@pytest.mark.parametrize("seed", range(5))
async def test_capacity_pressure_keeps_the_budget_and_the_bytes_right(
    fake, files, seed: int
) -> None:
    store = BlockStore(2 * BS, BS)
    budget_ok = []
    original = fake.read_block

    async def checked_read(key, buffer, block_size):
        budget_ok.append(within_budget(store))
        return await original(key, buffer, block_size)

    fake.read_block = checked_read
    versions = [fake.version(b"big"), fake.version(b"short")]
    rng = random.Random(seed)
    mismatches = []
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=4)

        async def reader(picks: list[BlockKey]) -> None:
            for key in picks:
                block = await loader.block(key, BS)
                # Check before the next await: the buffer may be reused after it.
                # A recycled block is one the reader must not serve (fs.py fills
                # it again); any other block must hold exactly its key's bytes.
                if not block.recycled and bytes(block.view) != expected(files, key):
                    mismatches.append(key)
                budget_ok.append(within_budget(store))
                loader.read_ahead(key.version, key.index)

        async with trio.open_nursery() as readers:
            for _ in range(8):
                picks = []
                for _ in range(15):
                    version = rng.choice(versions)
                    picks.append(BlockKey(version, rng.randrange(version.block_count(BS))))
                readers.start_soon(reader, picks)
    assert mismatches == []
    assert budget_ok
    assert all(budget_ok)
    assert store.statistics().evictions > 0
    assert store.statistics().reserved_bytes == 0


async def test_source_error_reaches_the_reader_and_frees_the_buffer(fake) -> None:
    store = BlockStore(2 * BS, BS)
    key = BlockKey(fake.version(b"big"), 0)
    fake.fail = lambda k: SourceError("read failed")
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0)
        with pytest.raises(SourceError):
            await loader.block(key, BS)
        assert store.statistics().reserved_bytes == 0
        assert fake.reads == [key]
        fake.fail = lambda k: None
        assert (await loader.block(key, BS)).length == BS  # the next read retries


async def test_os_error_from_the_source_becomes_a_read_error(fake) -> None:
    store = BlockStore(2 * BS, BS)
    fake.fail = lambda k: OSError(errno.EIO, "Input/output error")
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0)
        with pytest.raises(ReadError) as caught:
            await loader.block(BlockKey(fake.version(b"big"), 0), BS)
    assert caught.value.errno_value == errno.EIO


async def test_peer_that_has_the_block_is_asked_before_the_source(
    fake, fake_peers_cls, files
) -> None:
    store = BlockStore(8 * BS, BS)
    peers = fake_peers_cls(BS, files)
    key = BlockKey(fake.version(b"short"), 1)
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0, peers=peers)
        block = await loader.block(key, 123)
    assert bytes(block.view) == expected(files, key)
    assert peers.requests == [key]
    assert fake.reads == []
    stats = loader.statistics()
    assert stats.peer_hits == 1
    assert stats.peer_bytes == 123
    assert stats.source_bytes == 0


async def test_peer_without_the_block_falls_through_to_the_source(
    fake, fake_peers_cls, files
) -> None:
    store = BlockStore(8 * BS, BS)
    peers = fake_peers_cls(BS, {})
    key = BlockKey(fake.version(b"big"), 5)
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0, peers=peers)
        block = await loader.block(key, BS)
    assert bytes(block.view) == expected(files, key)
    assert peers.requests == [key]
    assert fake.reads == [key]
    stats = loader.statistics()
    assert stats.peer_hits == 0
    assert stats.source_bytes == BS


async def test_fill_for_a_peer_never_asks_peers(fake, fake_peers_cls, files) -> None:
    store = BlockStore(8 * BS, BS)
    peers = fake_peers_cls(BS, files)
    key = BlockKey(fake.version(b"big"), 0)
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0, peers=peers)
        block = await loader.fill_for_peer(key)
    assert bytes(block.view) == expected(files, key)
    assert peers.requests == []
    assert fake.reads == [key]


async def test_block_never_returns_a_recycled_block_under_pressure(fake, files) -> None:
    store = BlockStore(2 * BS, BS)
    version = fake.version(b"big")
    rng = random.Random(0)
    recycled = []
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0)

        async def reader(picks: list[int]) -> None:
            for index in picks:
                block = await loader.block(BlockKey(version, index), BS)
                if block.recycled:
                    recycled.append(index)

        async with trio.open_nursery() as readers:
            for _ in range(8):
                readers.start_soon(reader, [rng.randrange(20) for _ in range(40)])
    assert recycled == []


async def test_readahead_under_memory_pressure_does_not_amplify_source_reads(
    fake_source_cls, make_payload
) -> None:
    # 8 sequential readers of 64-block files through a 16-block store: their
    # readahead alone could fill the store, evicting blocks before they are read.
    files = {f"f{i}".encode(): make_payload(64 * BS, seed=i) for i in range(8)}
    fake = fake_source_cls(files)
    store = BlockStore(16 * BS, BS)
    delivered = 0

    async def reader(name: bytes, loader: Loader) -> None:
        nonlocal delivered
        version = fake.version(name)
        pace = random.Random(name)
        for index in range(64):
            loader.read_ahead(version, index)  # as handles.py does for a sequential reader
            for part in range(4):  # the kernel reads a block in several requests
                block = await loader.block(BlockKey(version, index), BS // 4)
                start = part * BS // 4
                chunk = bytes(block.view[start : start + BS // 4])
                assert chunk == files[name][index * BS + start :][: BS // 4]
                delivered += len(chunk)
                for _ in range(pace.randrange(1, 6)):
                    await trio.lowlevel.checkpoint()  # readers at uneven speeds

    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=4)
        async with trio.open_nursery() as readers:
            for name in files:
                readers.start_soon(reader, name, loader)
        nursery.cancel_scope.cancel()
    source_bytes = len(fake.reads) * BS
    assert delivered == 8 * 64 * BS
    assert source_bytes / delivered <= 1.5


async def test_readahead_never_evicts_a_block_an_open_handle_is_about_to_read(fake) -> None:
    store = BlockStore(8 * BS, BS)
    short, big = fake.version(b"short"), fake.version(b"big")
    wanted = BlockKey(short, 1)  # a handle of `short` read block 0: block 1 is next
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=2)
        loader.set_reader_guard(lambda key: key == wanted)
        await loader.block(BlockKey(short, 0), BS)
        await loader.block(wanted, 10)
        for index in range(6):
            await loader.block(BlockKey(big, index), BS)
        assert len(store) == 8  # full: the two blocks of `short` are the least recent
        loader.read_ahead(big, 5)  # fills 6 and 7: two blocks must go
    assert BlockKey(big, 6) in store and BlockKey(big, 7) in store
    assert wanted in store  # passed over although it was the least recently used but one
    assert BlockKey(short, 0) not in store and BlockKey(big, 0) not in store
    assert within_budget(store)


async def test_a_reader_s_own_fill_is_not_held_back_by_the_guard(fake) -> None:
    store = BlockStore(2 * BS, BS)
    short, big = fake.version(b"short"), fake.version(b"big")
    async with trio.open_nursery() as nursery:
        loader = Loader(store, fake, nursery, read_ahead_blocks=0)
        loader.set_reader_guard(lambda key: True)  # every block is about to be read
        await loader.block(BlockKey(short, 0), BS)
        await loader.block(BlockKey(short, 1), 10)
        block = await loader.block(BlockKey(big, 0), BS)  # evicts as ever
        assert bytes(block.view) == fake.files[b"big"][:BS]
        assert await loader.prefetch(BlockKey(big, 1))  # all spared: the oldest goes anyway
    assert BlockKey(big, 0) in store or BlockKey(big, 1) in store
    assert len(store) == 2 and within_budget(store)
