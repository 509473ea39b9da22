"""The pytest plugin itself: what users get from `memcachefs_mount`."""

from __future__ import annotations

from pathlib import Path

from memcachefs.metrics import metric_names
from memcachefs.testing import MountedFS


def test_factory_mounts_reads_and_unmounts(memcachefs_source: Path, memcachefs_mount) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    (memcachefs_source / "model.bin").write_bytes(payload)

    fs: MountedFS = memcachefs_mount(memcachefs_source, capacity="16M")

    assert fs.mounted
    assert (fs.path / "model.bin").read_bytes() == payload
    stats = fs.stats()
    assert metric_names("local") <= stats.keys()
    assert stats["pid"] == fs.pid
    assert stats["source_bytes"] == len(payload)
    assert fs.unmount() == 0
    assert not fs.mounted
    assert fs.problems() == []


def test_factory_without_source_makes_one(memcachefs_mount) -> None:
    fs = memcachefs_mount()
    assert list(fs.path.iterdir()) == []
    assert fs.source.is_dir()
