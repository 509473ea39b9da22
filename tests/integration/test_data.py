"""Issue 2, items 6 and 8: data is byte-identical for sequential, random and mmap reads
(and through safetensors); one source read per cold block under concurrent readers;
readahead; the kernel readahead of the mount."""

from __future__ import annotations

import mmap
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from support import DEADLINE_S, drop_page_cache

from memcachefs import mounts

pytestmark = pytest.mark.fuse

KiB, MiB = 1024, 1024 * 1024


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize(
    ("block_size", "size"),
    [("64K", 3 * MiB + 12_345), ("1M", 9 * MiB + 1)],
    ids=["64K-blocks", "1M-blocks"],
)
def test_sequential_random_and_mmap_reads_are_byte_identical(
    memcachefs_source: Path, memcachefs_mount, block_size: str, size: int
) -> None:
    payload = _payload(size, seed=size)
    (memcachefs_source / "model.bin").write_bytes(payload)
    fs = memcachefs_mount(memcachefs_source, capacity="64M", args=["--block-size", block_size])
    path = fs.path / "model.bin"
    block = {"64K": 64 * KiB, "1M": MiB}[block_size]

    # Random reads first, on a cold cache: every offset and length, block edges included.
    rng = random.Random(7)
    offsets = [0, block - 1, block, 2 * block - 3, size - 1, size - block, size + 10]
    offsets += [rng.randrange(size) for _ in range(200)]
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for offset in offsets:
            length = rng.choice([1, 100, 4096, block, block + 1, 3 * block + 17])
            assert os.pread(f.fileno(), length, offset) == payload[offset : offset + length], (
                offset,
                length,
            )
    # Sequential, through the page cache and again with it dropped (from memory).
    assert path.read_bytes() == payload
    drop_page_cache(path)
    with open(path, "rb") as f:
        chunks = []
        while chunk := f.read(777_777):
            chunks.append(chunk)
    assert b"".join(chunks) == payload
    # mmap, touched in a scattered order.
    drop_page_cache(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert len(m) == size
        for offset in sorted(offsets[: len(offsets) // 2], reverse=True):
            assert m[offset : offset + 5000] == payload[offset : offset + 5000]
        assert m[:] == payload
    stats = fs.stats()
    assert stats["source_bytes"] == size  # everything fit: each block read once
    assert stats["hits"] > 0


def test_safetensors_file_loads_all_tensors(memcachefs_source: Path, memcachefs_mount) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {
        "embed.weight": rng.standard_normal((1024, 512), dtype=np.float32),
        "layer.0.attn.q": rng.standard_normal((512, 512)).astype(np.float16),
        "layer.0.bias": rng.standard_normal(512).astype(np.float64),
        "layer.1.ids": rng.integers(-(2**31), 2**31, size=(333, 7), dtype=np.int32),
        "mask": rng.integers(0, 2, size=(77,), dtype=np.uint8).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    save_file(tensors, str(memcachefs_source / "model.safetensors"), metadata={"fmt": "np"})
    fs = memcachefs_mount(memcachefs_source, capacity="64M", args=["--block-size", "64K"])

    with safe_open(str(fs.path / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"fmt": "np"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, expected in tensors.items():
            loaded = f.get_tensor(name)
            assert loaded.dtype == expected.dtype, name
            assert loaded.shape == expected.shape, name
            assert np.array_equal(loaded, expected), name


def test_concurrent_cold_readers_cause_one_source_read_per_block(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    size = 8 * MiB + 4096
    payload = _payload(size, seed=16)
    (memcachefs_source / "cold.bin").write_bytes(payload)
    fs = memcachefs_mount(memcachefs_source, capacity="64M", args=["--block-size", "256K"])
    path = fs.path / "cold.bin"
    readers = 16
    barrier = threading.Barrier(readers)
    results: list[bytes | BaseException] = [b""] * readers

    def read(i: int) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                barrier.wait(DEADLINE_S)
                # Different starting points so readers meet on cold blocks.
                start = (i * size // readers) // 4096 * 4096
                parts = [os.pread(f.fileno(), size - start, start)]
                parts.insert(0, os.pread(f.fileno(), start, 0))
                results[i] = b"".join(parts)
        except BaseException as error:
            results[i] = error

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S * 3)
    assert not any(thread.is_alive() for thread in threads)
    for result in results:
        assert result == payload
    stats = fs.stats()
    assert stats["source_bytes"] == size
    assert stats["block_reads"] == -(-size // (256 * KiB))


def test_sequential_reader_gets_readahead(memcachefs_source: Path, memcachefs_mount) -> None:
    payload = _payload(4 * MiB, seed=4)
    (memcachefs_source / "seq.bin").write_bytes(payload)
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="64M",
        args=["--block-size", "64K", "--read-ahead", "4", "--no-prefetch"],
    )
    assert (fs.path / "seq.bin").read_bytes() == payload
    stats = fs.stats()
    assert stats["readahead_fills"] > 0
    assert stats["source_bytes"] == len(payload)


def _read_ahead_kb(path: Path) -> int:
    entry = mounts.find_mount(path)
    assert entry is not None
    return int((Path("/sys/class/bdi") / entry.device / "read_ahead_kb").read_text())


@pytest.mark.parametrize(
    ("args", "expected_kb"),
    [([], 1024), (["--kernel-read-ahead", "512K"], 512), (["--kernel-read-ahead", "4M"], 4096)],
    ids=["default", "512K", "4M"],
)
def test_kernel_read_ahead_of_the_mount(
    memcachefs_source: Path, memcachefs_mount, args: list[str], expected_kb: int
) -> None:
    fs = memcachefs_mount(memcachefs_source, capacity="64M", args=args)
    assert _read_ahead_kb(fs.path) == expected_kb
