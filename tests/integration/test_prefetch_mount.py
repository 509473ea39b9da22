"""Prefetch on a real mount: a cold safetensors load in shuffled order reads each block once."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from support import wait_until

pytestmark = pytest.mark.fuse


def tensor_hashes(path: Path, order_seed: int | None = None) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        names = list(f.keys())
        if order_seed is not None:
            random.Random(order_seed).shuffle(names)
        return {name: hashlib.sha256(f.get_tensor(name).tobytes()).hexdigest() for name in names}


def test_a_cold_shuffled_load_is_verified_and_reads_each_block_once(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"layer.{i}": rng.standard_normal(rng.integers(1, 300_000)) for i in range(40)}
    save_file(tensors, str(memcachefs_source / "model.safetensors"))
    size = (memcachefs_source / "model.safetensors").stat().st_size
    fs = memcachefs_mount(
        memcachefs_source, capacity="64M", args=["--block-size", "1M", "--read-ahead", "0"]
    )
    loaded = tensor_hashes(fs.path / "model.safetensors", order_seed=1)
    assert loaded == tensor_hashes(memcachefs_source / "model.safetensors")
    stats = fs.stats()
    assert stats["source_bytes"] == size  # every block once, whatever the order of the faults
    assert stats["prefetches"] == 1
    assert stats["prefetch_fills"] > 0
    wait_until(lambda: fs.stats()["prefetches_in_flight"] == 0, "the prefetch to stop")


def test_no_prefetch_leaves_unread_blocks_alone(memcachefs_source: Path, memcachefs_mount) -> None:
    (memcachefs_source / "model.bin").write_bytes(bytes(8 << 20))
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="64M",
        args=[
            "--block-size",
            "1M",
            "--read-ahead",
            "0",
            "--kernel-read-ahead",
            "4K",
            "--no-prefetch",
        ],
    )
    fd = os.open(fs.path / "model.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == bytes(4096)
    finally:
        os.close(fd)
    stats = fs.stats()
    assert stats["source_bytes"] == 1 << 20
    assert "prefetches" not in stats
