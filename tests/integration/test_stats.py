"""Issue 2, items 7 and 13: `memcachefs stats` (text and --json); bounded store with LRU
eviction under a working set larger than the capacity."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path

import pytest
from support import DEADLINE_S, drop_page_cache, run_cli

from memcachefs.metrics import metric_names

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def test_stats_json_and_text_after_a_cold_and_a_warm_read(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    # Not a prefetch pattern (*.bin is one): its fills could take every block before
    # the reader misses.
    payload = random.Random(1).randbytes(3 * MiB + 5)
    (memcachefs_source / "data.raw").write_bytes(payload)
    fs = memcachefs_mount(memcachefs_source, capacity="32M", args=["--block-size", "1M"])

    fresh = json.loads(run_cli("stats", fs.path, "--json").stdout)
    assert metric_names("local") <= fresh.keys()
    assert fresh["capacity_bytes"] == 32 * MiB
    assert fresh["used_bytes"] == fresh["hits"] == fresh["misses"] == 0
    assert fresh["source_bytes"] == fresh["evictions"] == 0
    assert fresh["pid"] == fs.pid

    assert (fs.path / "data.raw").read_bytes() == payload
    drop_page_cache(fs.path / "data.raw")
    assert (fs.path / "data.raw").read_bytes() == payload

    result = run_cli("stats", fs.path, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["source_bytes"] == len(payload)
    assert stats["used_bytes"] == len(payload)
    assert stats["blocks"] == 4
    assert stats["misses"] >= 1  # readahead may have filled the later blocks
    assert stats["hits"] > 0  # the second read came from memory
    assert stats["memory_bytes"] > 0
    assert stats["evictions"] == 0

    text = run_cli("stats", fs.path)
    assert text.returncode == 0, text.stderr
    assert text.stderr == ""
    for word in ("hits", "misses", "evictions", "from memory", "from the source", "used of"):
        assert word in text.stdout, (word, text.stdout)
    assert f"{stats['evictions']}" in text.stdout
    assert "32.0M" in text.stdout  # the capacity, human readable
    # The statistics are an xattr of the root: any tool can read them.
    raw = json.loads(os.getxattr(fs.path, "user.memcachefs.stats"))
    assert raw["source_bytes"] == len(payload)


def test_store_stays_within_capacity_and_evicts_under_4x_working_set(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    capacity = 4 * MiB
    files = []
    for i in range(4):
        payload = random.Random(i).randbytes(4 * MiB)
        (memcachefs_source / f"part{i}.bin").write_bytes(payload)
        files.append(payload)
    fs = memcachefs_mount(memcachefs_source, capacity="4M", args=["--block-size", "256K"])

    errors: list[str] = []
    peaks: list[int] = []

    def read(i: int) -> None:
        if (fs.path / f"part{i}.bin").read_bytes() != files[i]:
            errors.append(f"part{i}.bin differs")

    def sample() -> None:
        # Watch the budget while the readers run (not only at the end).
        while any(t.is_alive() for t in readers):
            s = fs.stats()
            peaks.append(s["used_bytes"] + s["reserved_bytes"] + s["free_buffer_bytes"])

    readers = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for thread in readers:
        thread.start()
    sampler = threading.Thread(target=sample)
    sampler.start()
    for thread in [*readers, sampler]:
        thread.join(DEADLINE_S * 3)
    assert errors == []

    stats = fs.stats()
    assert stats["source_bytes"] >= 16 * MiB
    assert stats["evictions"] > 0
    assert stats["capacity_bytes"] == capacity
    assert stats["used_bytes"] <= capacity
    assert stats["used_bytes"] + stats["reserved_bytes"] + stats["free_buffer_bytes"] <= capacity
    assert max(peaks, default=0) <= capacity
    assert f"evictions   {stats['evictions']}" in run_cli("stats", fs.path).stdout


def test_stats_of_a_stopped_mount_is_one_line(memcachefs_source: Path, memcachefs_mount) -> None:
    fs = memcachefs_mount(memcachefs_source, capacity="8M")
    fs.unmount()
    result = run_cli("stats", fs.path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1


def test_stats_of_a_killed_daemon_says_the_mount_is_stale(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    fs = memcachefs_mount(memcachefs_source, capacity="8M")
    fs.signal(signal.SIGKILL)
    fs.wait()
    result = run_cli("stats", fs.path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"memcachefs: {fs.path}: the daemon is gone (stale mount; memcachefs umount it)"
    ]
    assert run_cli("umount", fs.path).returncode == 0
