"""Model-aware prefetch: the order from a safetensors header, its bounds, its triggers."""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pyfuse3
import pytest
import trio
import trio.lowlevel
from safetensors.numpy import save_file

from memcachefs.daemon import Service, build_service
from memcachefs.prefetch import block_order, index_shards, safetensors_ranges
from memcachefs.source import Source

BS = 4096
ROOT = pyfuse3.ROOT_INODE


def safetensors_bytes(tmp_path: Path, sizes: dict[str, int]) -> bytes:
    tensors = {name: np.full(size, 7, dtype=np.uint8) for name, size in sizes.items()}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


def header(table: object, length: int | None = None) -> bytes:
    encoded = json.dumps(table).encode()
    return (len(encoded) if length is None else length).to_bytes(8, "little") + encoded


def test_ranges_of_a_real_checkpoint_start_with_the_header(tmp_path: Path) -> None:
    data = safetensors_bytes(tmp_path, {"b": 3 * BS, "a": 5 * BS + 7, "c": 10})
    ranges = safetensors_ranges(data, len(data))
    assert ranges is not None
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert ranges[0] == (0, header_end)
    assert ranges[-1][1] == len(data)
    assert sum(end - start for start, end in ranges[1:]) == 3 * BS + 5 * BS + 7 + 10
    order = block_order(len(data), BS, ranges)
    assert order[0] == 0
    assert sorted(order) == list(range(-(-len(data) // BS)))


def test_block_order_follows_the_ranges_then_the_rest() -> None:
    assert block_order(10 * BS, BS, [(0, 10), (7 * BS, 8 * BS), (2 * BS, 3 * BS + 1)]) == [
        0, 7, 2, 3, 1, 4, 5, 6, 8, 9,
    ]  # fmt: skip
    assert block_order(3 * BS + 1, BS, None) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00",
        (1 << 40).to_bytes(8, "little") + b"{}",  # a huge length
        header({}, length=10_000),  # longer than the file
        (5).to_bytes(8, "little") + b"{nope",  # bad JSON
        header([1, 2, 3]),  # not a table
        header({"t": {"data_offsets": [0, 10**9]}}),  # past the end of the file
        header({"t": {"data_offsets": [8, 4]}}),  # backwards
        header({"t": {"data_offsets": [-4, 4]}}),
        header({"t": {"data_offsets": ["0", 4]}}),
        header({"t": {"data_offsets": [0, 4.5]}}),
        header({"t": "no offsets"}),
        header({"t": {"data_offsets": [0, True]}}),
    ],
)
def test_a_malformed_or_hostile_header_means_file_order(data: bytes) -> None:
    assert safetensors_ranges(data + bytes(100), len(data) + 100) is None


def test_index_shards() -> None:
    index = {"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    assert index_shards(json.dumps(index).encode()) == ["m-1.safetensors", "m-2.safetensors"]
    evil = {"weight_map": {"a": "../etc/passwd", "b": "..", "c": 3}}
    assert index_shards(json.dumps(evil).encode()) == []
    assert index_shards(b"not json") is None


@asynccontextmanager
async def serving(root: Path, capacity_blocks: int) -> AsyncIterator[Service]:
    with Source(root, block_threads=4, metadata_threads=4) as source:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            yield build_service(
                source,
                nursery,
                capacity_bytes=capacity_blocks * BS,
                block_size_bytes=BS,
                read_ahead_blocks=0,
                attr_timeout_s=1.0,
                push_page_cache=False,
                prefetch_patterns=("*.safetensors", "*.bin"),
                prefetch_window_bytes=4 * BS,
                stale_grace_s=60.0,
            )
            nursery.cancel_scope.cancel()


async def open_file(service: Service, name: str) -> int:
    inode = (await service.fs.lookup(ROOT, name.encode())).st_ino
    return (await service.fs.open(inode, os.O_RDONLY)).fh


async def test_an_opened_model_file_is_filled_whole(tmp_path: Path, wait_for) -> None:
    data = safetensors_bytes(tmp_path, {"w": 20 * BS})
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "m.safetensors").write_bytes(data)
    (tmp_path / "root" / "notes.txt").write_bytes(bytes(8 * BS))
    async with serving(tmp_path / "root", capacity_blocks=64) as service:
        fh = await open_file(service, "m.safetensors")
        await wait_for(lambda: service.prefetcher.statistics().prefetches_in_flight == 0, "it")
        assert service.loader.statistics().source_bytes == len(data)
        # A reader jumping around finds every block in memory.
        for offset in (15 * BS, 3 * BS, 19 * BS, 0):
            assert bytes(await service.fs.read(fh, offset, BS)) == data[offset : offset + BS]
        assert service.loader.statistics().source_bytes == len(data)
        await service.fs.release(fh)
        fh = await open_file(service, "notes.txt")  # not a model file: nothing prefetched
        assert service.prefetcher.statistics().prefetches == 1  # open would have started it
        assert service.prefetcher.statistics().prefetches_in_flight == 0
        assert service.loader.statistics().source_bytes == len(data)


async def test_a_file_larger_than_the_cache_streams_without_evicting_itself(
    tmp_path: Path,
) -> None:
    data = os.urandom(64 * BS)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "big.bin").write_bytes(data)
    async with serving(tmp_path / "root", capacity_blocks=16) as service:
        fh = await open_file(service, "big.bin")
        got = bytearray()
        for offset in range(0, len(data), BS // 2):
            got += await service.fs.read(fh, offset, BS // 2)
            await trio.lowlevel.checkpoint()  # the prefetch runs alongside
        assert bytes(got) == data
        source_bytes = service.loader.statistics().source_bytes
        assert source_bytes <= 1.1 * len(data)  # nothing prefetched was evicted and read again
        assert service.store.statistics().readahead_evicted_unread <= 2
        await service.fs.release(fh)


async def test_a_random_reader_does_not_let_the_prefetch_run_past_its_share(
    tmp_path: Path, wait_for
) -> None:
    """A reader that jumps near the end of a file larger than the cache does not
    let the prefetch fill the whole file: its unread blocks stay within the share."""
    data = os.urandom(64 * BS)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "big.bin").write_bytes(data)
    async with serving(tmp_path / "root", capacity_blocks=16) as service:
        fh = await open_file(service, "big.bin")
        assert bytes(await service.fs.read(fh, 60 * BS, BS)) == data[60 * BS : 61 * BS]
        share = 16 // 2
        # The prefetch parks once its share is filled: nothing more in flight.
        await wait_for(
            lambda: (
                service.prefetcher.statistics().prefetched_unread_blocks >= share
                and service.loader.statistics().fills_in_flight == 0
            ),
            "the prefetch to fill its share",
        )
        assert service.prefetcher.statistics().prefetch_fills <= share
        assert service.store.statistics().readahead_evicted_unread == 0
        # The reader goes on in random order and finds every byte right.
        order = list(range(64))
        random.Random(8).shuffle(order)
        for index in order:
            got = await service.fs.read(fh, index * BS, BS)
            assert bytes(got) == data[index * BS : (index + 1) * BS]
        await service.fs.release(fh)


async def test_closing_the_last_handle_stops_the_prefetch(tmp_path: Path, wait_for) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "big.bin").write_bytes(bytes(64 * BS))
    async with serving(tmp_path / "root", capacity_blocks=16) as service:
        fh = await open_file(service, "big.bin")
        await service.fs.release(fh)
        await wait_for(lambda: service.prefetcher.statistics().prefetches_in_flight == 0, "stop")
        assert service.loader.statistics().source_bytes < 64 * BS


async def test_an_index_prefetches_its_shards_only_when_they_fit(tmp_path: Path, wait_for) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name in ("m-1.safetensors", "m-2.safetensors"):
        (root / name).write_bytes(safetensors_bytes(tmp_path, {"w": 6 * BS}))
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    shard_bytes = 2 * (root / "m-1.safetensors").stat().st_size
    index_bytes = (root / "model.safetensors.index.json").stat().st_size
    async with serving(root, capacity_blocks=64) as service:
        fh = await open_file(service, "model.safetensors.index.json")
        await wait_for(lambda: service.loader.statistics().source_bytes >= shard_bytes, "shards")
        await service.fs.release(fh)
    # 12 blocks of shards do not fit in half of an 8-block cache: nothing is prefetched.
    async with serving(root, capacity_blocks=8) as service:
        fh = await open_file(service, "model.safetensors.index.json")
        await wait_for(lambda: service.prefetcher.statistics().prefetches_in_flight == 0, "it")
        assert service.loader.statistics().source_bytes == index_bytes
        await service.fs.release(fh)
