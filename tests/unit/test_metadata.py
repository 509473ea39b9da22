"""Attributes and listings: cached for a TTL, new names at once, stale answers on a stall."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from memcachefs.metadata import MetadataCache
from memcachefs.source import Source

TTL_S = 1.0


class ManualClock:
    """The cache's clock, moved only by the test: TTL checks without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def source(root: Path) -> Iterator[Source]:
    with Source(root, block_threads=2, metadata_threads=2) as source:
        yield source


def source_calls(source: Source) -> int:
    return source.statistics().metadata_calls


async def test_second_lstat_within_ttl_does_not_ask_the_source(root: Path, source: Source) -> None:
    (root / "f").write_bytes(b"abc")
    clock = ManualClock()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=clock)
        assert (await cache.lstat(b"f")).st_size == 3
        (root / "f").write_bytes(b"abcdef")
        clock.now += TTL_S / 2
        assert (await cache.lstat(b"f")).st_size == 3  # cached answer
        assert source_calls(source) == 1
        clock.now += TTL_S
        assert (await cache.lstat(b"f")).st_size == 6  # refreshed after the TTL
        assert source_calls(source) == 2
        assert cache.statistics().refreshes == 2


async def test_a_new_name_is_visible_at_once(root: Path, source: Source) -> None:
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=ManualClock())
        with pytest.raises(FileNotFoundError):
            await cache.lstat(b"new")
        (root / "new").write_bytes(b"x")
        assert (await cache.lstat(b"new")).st_size == 1  # misses are not cached


async def test_listing_shows_new_files_after_ttl_or_forget(root: Path, source: Source) -> None:
    (root / "a").write_bytes(b"a")
    clock = ManualClock()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=clock)

        async def names() -> list[bytes]:
            return sorted(name for name, _ in await cache.listdir(b""))

        assert await names() == [b"a"]
        (root / "b").write_bytes(b"b")
        assert await names() == [b"a"]  # within the TTL
        cache.forget(b"")
        assert await names() == [b"a", b"b"]
        (root / "c").write_bytes(b"c")
        clock.now += TTL_S
        assert await names() == [b"a", b"b", b"c"]


async def test_listing_primes_the_attributes_of_its_entries(root: Path, source: Source) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"12345")
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=ManualClock())
        await cache.listdir(b"d")
        calls = source_calls(source)
        assert (await cache.lstat(b"d/f")).st_size == 5
        assert source_calls(source) == calls
        assert cache.last_known(b"d/f") is not None


async def test_a_deleted_file_disappears_after_the_ttl(root: Path, source: Source) -> None:
    (root / "f").write_bytes(b"x")
    clock = ManualClock()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=clock)
        await cache.lstat(b"f")
        os.unlink(root / "f")
        clock.now += TTL_S
        with pytest.raises(FileNotFoundError):
            await cache.lstat(b"f")
        assert cache.last_known(b"f") is None


async def test_remember_records_a_fresh_answer(root: Path, source: Source) -> None:
    (root / "f").write_bytes(b"xyz")
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=ManualClock())
        cache.remember(b"f", os.lstat(root / "f"))
        assert (await cache.lstat(b"f")).st_size == 3
        assert source_calls(source) == 0


class StallingSource:
    """A source whose lstat can be frozen, like a hung NFS server or bucket."""

    def __init__(self) -> None:
        self.sizes: dict[bytes, int] = {}
        self.calls = 0
        self.unstall: trio.Event | None = None

    async def lstat(self, relpath: bytes) -> Any:
        self.calls += 1
        if self.unstall is not None:
            await self.unstall.wait()
        else:
            await trio.lowlevel.checkpoint()
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, self.sizes[relpath], 0, 0, 0))


async def test_stalled_source_gets_the_previous_answer_after_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = StallingSource()
    source.sizes[b"f"] = 10
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(
            source,  # type: ignore[arg-type]
            nursery,
            ttl_s=TTL_S,
            stale_grace_s=0.5,
            clock=trio.current_time,
        )
        assert (await cache.lstat(b"f")).st_size == 10
        await trio.sleep(TTL_S * 2)
        source.sizes[b"f"] = 20
        source.unstall = trio.Event()
        started = trio.current_time()
        results: list[int] = []

        async def ask() -> None:
            results.append((await cache.lstat(b"f")).st_size)

        async with trio.open_nursery() as askers:
            for _ in range(3):
                askers.start_soon(ask)
        # Answered from the previous result once the grace period passed, not later.
        assert results == [10, 10, 10]
        assert trio.current_time() - started == pytest.approx(0.5)
        assert cache.statistics().stale_answers == 3
        assert source.calls == 2  # one refresh, shared, still running

        source.unstall.set()
        await trio.testing.wait_all_tasks_blocked()
        source.unstall = None
        assert (await cache.lstat(b"f")).st_size == 20  # the refresh landed
        assert source.calls == 2


async def test_stalled_source_with_nothing_cached_waits_for_the_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = StallingSource()
    source.sizes[b"f"] = 10
    source.unstall = trio.Event()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(
            source,  # type: ignore[arg-type]
            nursery,
            ttl_s=TTL_S,
            stale_grace_s=0.5,
            clock=trio.current_time,
        )
        with trio.move_on_after(60) as scope:
            await cache.lstat(b"f")
        assert scope.cancelled_caught  # no previous answer to fall back on
        source.unstall.set()
        assert (await cache.lstat(b"f")).st_size == 10
        assert cache.statistics().stale_answers == 0


# -- issue 10: xattrs, statfs, a byte budget ---------------------------------------------
async def test_xattrs_and_their_absence_are_cached_with_the_attributes(
    root: Path, source: Source
) -> None:
    (root / "d").mkdir()
    for i in range(10):
        (root / "d" / f"f{i}").write_bytes(b"x")
    os.setxattr(root / "d" / "f3", "user.origin", b"bucket")
    clock = ManualClock()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=clock)
        await cache.listdir(b"d")
        calls = source_calls(source)
        for i in range(10):
            with pytest.raises(OSError) as raised:
                await cache.getxattr(b"d/f%d" % i, b"security.selinux")
            assert raised.value.errno == errno.ENODATA
        # One source call for the xattr names of the whole listing chunk.
        assert source_calls(source) == calls + 1
        assert await cache.getxattr(b"d/f3", b"user.origin") == b"bucket"
        assert await cache.getxattr(b"d/f3", b"user.origin") == b"bucket"
        assert await cache.listxattr(b"d/f3") == [b"user.origin"]
        assert source_calls(source) == calls + 2  # the value, once
        # Past the TTL, the attributes are refreshed; the same ctime keeps the xattrs.
        clock.now += TTL_S * 2
        await cache.lstat(b"d/f3")
        calls = source_calls(source)
        assert await cache.getxattr(b"d/f3", b"user.origin") == b"bucket"
        assert source_calls(source) == calls
        # Setting an xattr changes the ctime: the new value is seen after the TTL.
        os.setxattr(root / "d" / "f3", "user.origin", b"disk")
        clock.now += TTL_S * 2
        assert await cache.getxattr(b"d/f3", b"user.origin") == b"disk"


async def test_statfs_is_cached_for_the_ttl(root: Path, source: Source) -> None:
    clock = ManualClock()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=clock)
        first = await cache.statvfs()
        assert (await cache.statvfs()) is first
        assert source_calls(source) == 1
        clock.now += TTL_S * 2
        await cache.statvfs()
        assert source_calls(source) == 2


async def test_the_cache_stays_within_its_byte_budget_and_counts_evictions(
    root: Path, source: Source
) -> None:
    for i in range(200):
        (root / f"f{i}").write_bytes(b"x")
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(
            source, nursery, ttl_s=TTL_S, clock=ManualClock(), budget_bytes=50 * 1024
        )
        for i in range(200):
            await cache.lstat(b"f%d" % i)
        stats = cache.statistics()
        assert stats.metadata_cache_bytes <= 50 * 1024
        assert stats.metadata_evictions > 0
        assert stats.cached_attributes < 200


async def test_a_listing_is_sorted_once_and_shared(root: Path, source: Source) -> None:
    for name in ("c", "a", "b"):
        (root / name).write_bytes(b"")
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=ManualClock())
        first = await cache.listdir(b"")
        assert [name for name, _ in first] == [b"a", b"b", b"c"]
        assert (await cache.listdir(b"")) is first


class StallingXattrSource(StallingSource):
    async def listxattr(self, relpath: bytes) -> list[str]:
        if self.unstall is not None:
            await self.unstall.wait()
        return []

    async def getxattr(self, relpath: bytes, name: bytes) -> bytes:
        if self.unstall is not None:
            await self.unstall.wait()
        raise OSError(errno.ENODATA, "no data")

    async def statvfs(self) -> Any:
        if self.unstall is not None:
            await self.unstall.wait()
        return os.statvfs("/")


async def test_a_stall_answers_xattrs_and_statfs_from_the_previous_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = StallingXattrSource()
    source.sizes[b"f"] = 10
    source.sizes[b"g"] = 10
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(
            source,  # type: ignore[arg-type]
            nursery,
            ttl_s=TTL_S,
            clock=trio.current_time,
            unanswered_timeout_s=5.0,
        )
        assert await cache.listxattr(b"f") == []
        await cache.statvfs()
        await cache.lstat(b"g")
        await trio.sleep(TTL_S * 2)
        source.unstall = trio.Event()
        started = trio.current_time()
        with pytest.raises(OSError) as raised:
            await cache.getxattr(b"f", b"user.x")
        assert raised.value.errno == errno.ENODATA
        assert await cache.listxattr(b"f") == []
        await cache.statvfs()
        # The grace once for f (its refresh then stalled: listxattr answers at once), once
        # for statfs.
        assert trio.current_time() - started == pytest.approx(1.0)
        # Nothing known about g's xattrs: EIO once the timeout passed, not a hang.
        with pytest.raises(OSError) as raised:
            await cache.listxattr(b"g")
        assert raised.value.errno == errno.EIO
        assert cache.statistics().unanswered_timeouts == 1
        source.unstall.set()


async def test_stale_attributes_of_a_listed_directory_are_refreshed_by_chunk(
    root: Path, source: Source
) -> None:
    """A sweep of a large listed directory after the TTL (ls -l outlasting it) asks the
    source once per chunk of the listing, not once per entry; a change and a removal
    found by the chunk refresh are seen."""
    from memcachefs.metadata import XATTR_CHUNK

    (root / "d").mkdir()
    names = [f"f{i:05d}".encode() for i in range(2 * XATTR_CHUNK + 10)]
    for name in names:
        (root / "d" / name.decode()).write_bytes(b"")
    clock = ManualClock()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=clock)
        await cache.listdir(b"d")
        clock.now += TTL_S * 2  # every attribute is stale now
        (root / "d" / "f00001").write_bytes(b"abc")
        (root / "d" / "f00002").unlink()
        calls = source_calls(source)
        sizes = {}
        for name in names:
            try:
                sizes[name] = (await cache.lstat(b"d/" + name)).st_size
            except FileNotFoundError:
                sizes[name] = None
        # 3 chunks; for the removed entry its chunk again and the lstat that confirms it
        assert source_calls(source) - calls == 3 + 2
        assert sizes[b"f00001"] == 3 and sizes[b"f00002"] is None
        assert sum(1 for size in sizes.values() if size == 0) == len(names) - 2
        calls = source_calls(source)
        await cache.lstat(b"d/f00300")  # fresh from its chunk: no new call
        assert source_calls(source) == calls


async def test_a_directory_larger_than_the_budget_is_swept_by_chunks(
    root: Path, source: Source
) -> None:
    """The entries of a cached listing are answered from it, with no record of their
    own, and a sweep of their xattrs asks the source once per chunk, not once per
    entry, even when the records it needs do not all fit the budget (an ls -l of
    300,000 entries made one source call per entry and per xattr name)."""
    from memcachefs.metadata import ATTRIBUTE_BYTES, LISTED_ENTRY_BYTES, LISTING_BYTES, XATTR_CHUNK

    (root / "d").mkdir()
    names = [f"f{i:05d}".encode() for i in range(4 * XATTR_CHUNK)]
    for name in names:
        (root / "d" / name.decode()).write_bytes(b"")
    listing_bytes = LISTING_BYTES + sum(len(name) + LISTED_ENTRY_BYTES for name in names)
    budget = listing_bytes + 2 * XATTR_CHUNK * (ATTRIBUTE_BYTES + 8)  # half the entries
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, budget_bytes=budget)
        await cache.listdir(b"d")
        calls = source_calls(source)
        for name in names:
            assert (await cache.lstat(b"d/" + name)).st_size == 0
        assert source_calls(source) == calls
        assert cache.statistics().cached_attributes == 0  # all answered by the listing
        xattr_calls = cache.statistics().xattr_source_calls
        for name in names:
            assert await cache.listxattr(b"d/" + name) == []
        stats = cache.statistics()
        assert stats.metadata_cache_bytes <= budget
        assert stats.metadata_evictions > 0  # the records of one half evict the other's
        assert stats.cached_listings == 1  # in use: not evicted
        assert source_calls(source) - calls == 4  # each chunk once for its xattr names
        assert stats.xattr_source_calls - xattr_calls == 4


async def test_a_rescan_keeps_the_unchanged_entries_and_sees_the_changed(
    root: Path, source: Source
) -> None:
    """A listing refreshed after the TTL reuses the entries that did not change (no
    second copy of a large directory in memory) and has new attributes for the rest."""
    for name in ("a", "b", "c"):
        (root / name).write_bytes(b"x")
    clock = ManualClock()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=clock)
        first = {entry[0]: entry for entry in await cache.listdir(b"")}
        (root / "b").write_bytes(b"longer")
        (root / "c").unlink()
        (root / "d").write_bytes(b"")
        clock.now += TTL_S
        second = {entry[0]: entry for entry in await cache.listdir(b"")}
        assert sorted(second) == [b"a", b"b", b"d"]
        assert second[b"a"] is first[b"a"]
        assert second[b"b"][1].st_size == 6
        assert (await cache.lstat(b"b")).st_size == 6


async def test_forget_of_a_listed_entry_asks_the_source_again(root: Path, source: Source) -> None:
    """An open that found another version than its inode forgets the path: the next
    lookup must not get the old attributes back from the cached listing (the kernel
    would retry the open with the old inode and fail it with ESTALE)."""
    (root / "f").write_bytes(b"old")
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, clock=ManualClock())
        await cache.listdir(b"")
        (root / "f").write_bytes(b"newer")
        assert (await cache.lstat(b"f")).st_size == 3  # the listing, within the TTL
        cache.forget(b"f")
        assert (await cache.lstat(b"f")).st_size == 5
        assert (await cache.lstat(b"f")).st_size == 5


async def test_a_directory_with_more_entries_than_the_budget_holds_is_not_listed(
    root: Path, source: Source
) -> None:
    """Its scan stops at what the budget holds (no listing of it in memory at all),
    and that it is too large is remembered for the TTL: no scan again meanwhile."""
    from memcachefs.metadata import LISTED_ENTRY_BYTES

    (root / "d").mkdir()
    for i in range(150):
        (root / "d" / f"f{i:03d}").write_bytes(b"")
    (root / "small").mkdir()
    async with trio.open_nursery() as nursery:
        cache = MetadataCache(source, nursery, ttl_s=TTL_S, budget_bytes=100 * LISTED_ENTRY_BYTES)
        assert await cache.listdir(b"d") is None
        calls = source_calls(source)
        assert await cache.listdir(b"d") is None
        assert source_calls(source) == calls
        assert await cache.listdir(b"small") == []
        stats = cache.statistics()
        assert (stats.cached_listings, stats.cached_attributes) == (1, 0)
        nursery.cancel_scope.cancel()
