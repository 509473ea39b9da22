"""Issue 2, item 8: the kernel page cache serves repeat reads (keep_cache) and is
dropped when the source file changes, so a new open never sees stale pages."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from support import drop_page_cache, wait_until

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def _lookups(fs) -> int:
    stats = fs.stats()
    return stats["hits"] + stats["misses"]


def test_repeat_reads_come_from_the_page_cache(memcachefs_source: Path, memcachefs_mount) -> None:
    payload = random.Random(1).randbytes(8 * MiB)
    (memcachefs_source / "model.bin").write_bytes(payload)
    fs = memcachefs_mount(memcachefs_source, capacity="32M", args=["--block-size", "1M"])
    path = fs.path / "model.bin"
    assert path.read_bytes() == payload
    first = _lookups(fs)
    assert first >= 8
    for _ in range(3):
        assert path.read_bytes() == payload
    # Each repeat read opened the file again (same version: keep_cache), and the
    # kernel answered it: the daemon saw (almost) no block lookups.
    assert _lookups(fs) - first <= 2
    assert fs.stats()["source_bytes"] == len(payload)


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "new-size"])
def test_changed_file_is_read_fresh_after_the_ttl(
    memcachefs_source: Path, memcachefs_mount, same_size: bool
) -> None:
    old = random.Random(2).randbytes(3 * MiB)
    new = random.Random(3).randbytes(3 * MiB if same_size else 2 * MiB + 77)
    source_file = memcachefs_source / "model.bin"
    source_file.write_bytes(old)
    os.utime(source_file, ns=(10**18, 10**18))
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="32M",
        args=["--block-size", "256K", "--attr-timeout", "0.3"],
    )
    path = fs.path / "model.bin"
    assert path.read_bytes() == old  # now in the page cache and in memory
    assert path.read_bytes() == old

    # Replace it in the source (a new file renamed over), with a different mtime.
    staging = memcachefs_source / ".staging"
    staging.write_bytes(new)
    os.utime(staging, ns=(2 * 10**18, 2 * 10**18))
    staging.rename(source_file)

    wait_until(lambda: os.stat(path).st_mtime_ns == 2 * 10**18, "the mount to show the new mtime")
    assert os.stat(path).st_size == len(new)
    data = path.read_bytes()
    assert data == new, "a new open after the TTL read stale pages or a mix"
    assert path.read_bytes() == new


def test_rewritten_in_place_is_read_fresh_after_the_ttl(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    old = bytes(range(256)) * 8192  # 2 MiB
    new = bytes(reversed(range(256))) * 8192
    source_file = memcachefs_source / "model.bin"
    source_file.write_bytes(old)
    os.utime(source_file, ns=(10**18, 10**18))
    fs = memcachefs_mount(memcachefs_source, capacity="32M", args=["--attr-timeout", "0.3"])
    path = fs.path / "model.bin"
    assert path.read_bytes() == old
    with open(source_file, "r+b") as f:  # same inode, same size
        f.write(new)
    os.utime(source_file, ns=(3 * 10**18, 3 * 10**18))
    wait_until(lambda: os.stat(path).st_mtime_ns == 3 * 10**18, "the new mtime")
    assert path.read_bytes() == new


def test_open_pushes_cached_blocks_into_the_page_cache(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    payload = random.Random(4).randbytes(8 * MiB + 123)  # a short last block
    (memcachefs_source / "model.bin").write_bytes(payload)
    fs = memcachefs_mount(memcachefs_source, capacity="32M", args=["--block-size", "1M"])
    path = fs.path / "model.bin"
    assert path.read_bytes() == payload
    drop_page_cache(path)

    with path.open("rb") as f:  # an open of a file held in memory starts the push
        wait_until(
            lambda: fs.stats()["page_cache_pushed_bytes"] == len(payload), "the push to finish"
        )
        before = _lookups(fs)
        assert f.read() == payload
    assert os.stat(path).st_size == len(payload)  # never stored past the end
    # The pages were already there: the daemon was asked for (almost) no block.
    # (The kernel may reclaim page cache at any time, so allow a stray READ.)
    assert _lookups(fs) - before <= 2


def test_without_push_a_cold_page_cache_reads_through_the_daemon(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    payload = random.Random(5).randbytes(4 * MiB)
    (memcachefs_source / "model.bin").write_bytes(payload)
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="32M",
        args=["--block-size", "1M", "--no-page-cache-push"],
    )
    path = fs.path / "model.bin"
    assert path.read_bytes() == payload
    drop_page_cache(path)
    before = _lookups(fs)
    assert path.read_bytes() == payload
    assert _lookups(fs) - before >= 4
    assert "page_cache_pushed_bytes" not in fs.stats()


def test_a_repeat_open_pushes_only_the_pages_the_kernel_dropped(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    payload = random.Random(6).randbytes(6 * MiB + 321)  # a short last block
    (memcachefs_source / "model.bin").write_bytes(payload)
    fs = memcachefs_mount(memcachefs_source, capacity="32M", args=["--block-size", "1M"])
    path = fs.path / "model.bin"
    assert path.read_bytes() == payload  # every block in memory, every page resident

    def open_and_wait() -> None:
        pushes = fs.stats()["page_cache_pushes"]
        with path.open("rb") as f:
            wait_until(
                lambda: (
                    fs.stats()["page_cache_pushes"] > pushes
                    and fs.stats()["page_cache_pushes_in_flight"] == 0
                ),
                "the push to finish",
            )
            assert f.read() == payload

    # An fd held throughout, to drop pages without an open (an open starts a push).
    keeper = os.open(path, os.O_RDONLY)
    try:
        wait_until(lambda: fs.stats()["page_cache_pushes_in_flight"] == 0, "the push to finish")
        assert fs.stats()["page_cache_pushed_bytes"] == 0  # all resident: nothing copied
        os.posix_fadvise(keeper, 0, 0, os.POSIX_FADV_DONTNEED)
        open_and_wait()
        assert fs.stats()["page_cache_pushed_bytes"] == len(payload)

        resident_before = fs.stats()["page_cache_resident_bytes"]
        open_and_wait()  # the pages are still there: a repeat open copies nothing
        assert fs.stats()["page_cache_pushed_bytes"] == len(payload)
        assert fs.stats()["page_cache_resident_bytes"] - resident_before == len(payload)

        # The kernel drops one block's pages: only that block is pushed again.
        os.posix_fadvise(keeper, 2 * MiB, MiB, os.POSIX_FADV_DONTNEED)
        open_and_wait()
        assert fs.stats()["page_cache_pushed_bytes"] == len(payload) + MiB
    finally:
        os.close(keeper)
    assert os.stat(path).st_size == len(payload)  # never stored past the end
