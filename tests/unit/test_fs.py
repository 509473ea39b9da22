"""The pyfuse3 Operations driven directly, without a kernel or a mount."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import xxhash

from memcachefs import handles
from memcachefs import source as source_module
from memcachefs.blockstore import BlockStore
from memcachefs.control import STATS_XATTR
from memcachefs.daemon import Service, build_service
from memcachefs.fs import Filesystem
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.loader import Loader
from memcachefs.source import Source

BS = 4096
TTL_S = 1.0
ROOT = pyfuse3.ROOT_INODE


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    root: Path
    fs: Filesystem
    service: Service
    clock: ManualClock
    listed: list[tuple[bytes, pyfuse3.EntryAttributes, int]]

    @property
    def store(self) -> BlockStore:
        return self.service.store

    @property
    def loader(self) -> Loader:
        return self.service.loader

    @property
    def source(self) -> Source:
        return self.service.source

    async def inode(self, relpath: str) -> int:
        inode = ROOT
        for name in relpath.split("/"):
            inode = (await self.fs.lookup(inode, name.encode())).st_ino
        return inode

    async def read_all(self, relpath: str, off: int = 0, size: int = 1 << 30) -> bytes:
        fh = (await self.fs.open(await self.inode(relpath), os.O_RDONLY)).fh
        try:
            return bytes(await self.fs.read(fh, off, size))
        finally:
            await self.fs.release(fh)


@asynccontextmanager
async def serving(
    root: Path,
    *,
    capacity_blocks: int = 64,
    read_ahead_blocks: int = 4,
    stale_grace_s: float = 60.0,
    metadata_cache_bytes: int = 64 * 1024 * 1024,
) -> AsyncIterator[Served]:
    clock = ManualClock()
    listed: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = []

    def reply(token: Any, name: bytes, entry: pyfuse3.EntryAttributes, next_id: int) -> bool:
        listed.append((name, entry, next_id))
        return token is None or len(listed) < token

    with Source(root, block_threads=4, metadata_threads=4) as source:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            # A long grace by default: opens never fall back to unpinned versions.
            service = build_service(
                source,
                nursery,
                capacity_bytes=capacity_blocks * BS,
                block_size_bytes=BS,
                read_ahead_blocks=read_ahead_blocks,
                attr_timeout_s=TTL_S,
                push_page_cache=False,
                stale_grace_s=stale_grace_s,
                metadata_cache_bytes=metadata_cache_bytes,
                clock=clock,
                readdir_reply=reply,
            )
            yield Served(root, service.fs, service, clock, listed)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    root = tmp_path / "root"
    root.mkdir()
    async with serving(root) as served:
        yield served


async def expect_errno(value: int, call: Any) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await call
    assert caught.value.errno == value


# -- attributes -------------------------------------------------------------------
async def test_lookup_and_getattr_mirror_the_source(served: Served) -> None:
    path = served.root / "f"
    path.write_bytes(b"x" * 1234)
    os.chmod(path, 0o640)
    owner = (1234, 5678) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(path, *owner)
    os.utime(path, ns=(1_000_000_000, 1_234_567_891_000))
    st = os.lstat(path)
    entry = await served.fs.lookup(ROOT, b"f")
    for attributes in (entry, await served.fs.getattr(entry.st_ino)):
        assert attributes.st_ino == entry.st_ino
        assert attributes.st_mode == st.st_mode
        assert stat.S_IMODE(attributes.st_mode) == 0o640
        assert attributes.st_size == 1234
        assert attributes.st_mtime_ns == 1_234_567_891_000
        assert (attributes.st_uid, attributes.st_gid) == owner
        assert attributes.st_nlink == st.st_nlink
    assert (await served.fs.lookup(ROOT, b"f")).st_ino == entry.st_ino  # stable inode


async def test_lookup_of_a_symlink_and_a_directory_does_not_follow(served: Served) -> None:
    (served.root / "d").mkdir()
    (served.root / "link").symlink_to("/etc/passwd")
    assert stat.S_ISDIR((await served.fs.lookup(ROOT, b"d")).st_mode)
    link = await served.fs.lookup(ROOT, b"link")
    assert stat.S_ISLNK(link.st_mode)
    assert link.st_size == len("/etc/passwd")


async def test_lookup_of_a_missing_name_is_enoent_and_a_slash_is_einval(served: Served) -> None:
    await expect_errno(errno.ENOENT, served.fs.lookup(ROOT, b"missing"))
    await expect_errno(errno.EINVAL, served.fs.lookup(ROOT, b"a/b"))
    await expect_errno(errno.ESTALE, served.fs.getattr(999_999))


async def test_a_new_file_is_found_by_name_at_once(served: Served) -> None:
    await expect_errno(errno.ENOENT, served.fs.lookup(ROOT, b"late"))
    (served.root / "late").write_bytes(b"hello")
    assert (await served.fs.lookup(ROOT, b"late")).st_size == 5


async def test_forgotten_inode_is_estale(served: Served) -> None:
    (served.root / "f").write_bytes(b"x")
    inode = await served.inode("f")
    await served.fs.forget([(inode, 1)])
    await expect_errno(errno.ESTALE, served.fs.getattr(inode))
    await expect_errno(errno.ESTALE, served.fs.open(inode, os.O_RDONLY))


async def test_lookup_in_a_subdirectory(served: Served) -> None:
    (served.root / "a" / "b").mkdir(parents=True)
    (served.root / "a" / "b" / "c").write_bytes(b"abc")
    inode = await served.inode("a/b/c")
    assert served.fs.inodes.path(inode) == b"a/b/c"
    assert (await served.fs.getattr(inode)).st_size == 3


# -- directories --------------------------------------------------------------------
async def test_readdir_lists_every_entry_with_its_attributes(served: Served) -> None:
    names = [f"file{i:03d}".encode() for i in range(50)]
    for name in names:
        (served.root / name.decode()).write_bytes(name)
    (served.root / "sub").mkdir()
    (served.root / "sym").symlink_to("file000")
    fh = await served.fs.opendir(ROOT)
    await served.fs.readdir(fh, 0, None)
    await served.fs.releasedir(fh)
    listed = {name: entry for name, entry, _ in served.listed}
    assert sorted(listed) == sorted([*names, b"sub", b"sym"])
    assert listed[b"file007"].st_size == 7
    assert stat.S_ISDIR(listed[b"sub"].st_mode)
    assert stat.S_ISLNK(listed[b"sym"].st_mode)
    assert len({entry.st_ino for entry in listed.values()}) == len(listed)


async def test_readdir_resumes_where_the_kernel_buffer_filled(served: Served) -> None:
    for i in range(10):
        (served.root / f"f{i}").write_bytes(b"")
    fh = await served.fs.opendir(ROOT)
    await served.fs.readdir(fh, 0, 4)  # the reply refuses the 4th entry
    accepted = served.listed[:3]
    resume_at = accepted[-1][2]
    served.listed.clear()
    await served.fs.readdir(fh, resume_at, None)
    names = [name for name, _, _ in accepted] + [name for name, _, _ in served.listed]
    assert names == [f"f{i}".encode() for i in range(10)]


async def _list_like_the_kernel(served: Served, fh: int, per_call: int) -> list[bytes]:
    """readdir until an empty answer, each buffer taking `per_call` - 1 entries."""
    names: list[bytes] = []
    offset = 0
    while True:
        served.listed.clear()
        await served.fs.readdir(fh, offset, per_call)  # the reply refuses the last
        accepted = served.listed[: per_call - 1]
        if not accepted:
            return names
        names += [name for name, _, _ in accepted]
        offset = accepted[-1][2]


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_directory_too_large_to_cache_is_read_from_the_source_in_chunks(
    tmp_path: Path, wait_for
) -> None:
    """Its listing is not held (in the cache or by the handle): a chunk at a time."""
    from memcachefs.metadata import LISTED_ENTRY_BYTES
    from memcachefs.source import STREAM_CHUNK

    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    names = [f"f{i:05d}".encode() for i in range(2 * STREAM_CHUNK + 100)]
    for name in names:
        (root / "d" / name.decode()).write_bytes(name[-2:])
    async with serving(root, metadata_cache_bytes=100 * LISTED_ENTRY_BYTES) as served:
        directory = await served.inode("d")
        descriptors = _open_descriptors()
        fh = await served.fs.opendir(directory)
        listed = await _list_like_the_kernel(served, fh, 500)
        assert sorted(listed) == names  # each once
        assert served.fs._dirs[fh].entries is None  # the handle holds one chunk, no listing
        assert served.service.metadata.statistics().cached_listings == 0
        assert await _list_like_the_kernel(served, fh, 700) == listed  # rewound: again
        served.listed.clear()
        await served.fs.readdir(fh, len(names) - 1, None)  # the last entry, with attributes
        assert [(n, e.st_size) for n, e, _ in served.listed] == [(listed[-1], 2)]
        await served.fs.releasedir(fh)
        await wait_for(  # the source directory is closed in a worker thread
            lambda: _open_descriptors() <= descriptors, "the source directory to be closed"
        )


async def test_readlink_returns_the_target_verbatim(served: Served) -> None:
    (served.root / "abs").symlink_to("/somewhere/outside")
    (served.root / "rel").symlink_to("../../up/there")
    (served.root / "dangling").symlink_to("no such file")
    for name, target in [
        ("abs", b"/somewhere/outside"),
        ("rel", b"../../up/there"),
        ("dangling", b"no such file"),
    ]:
        assert await served.fs.readlink(await served.inode(name)) == target


# -- reading ---------------------------------------------------------------------------
async def test_read_returns_exact_bytes_across_block_boundaries(
    served: Served, make_payload
) -> None:
    data = make_payload(5 * BS + 77, seed=11)
    (served.root / "model.bin").write_bytes(data)
    fh = (await served.fs.open(await served.inode("model.bin"), os.O_RDONLY)).fh
    for off, size in [
        (0, len(data)),
        (0, 1),
        (BS - 1, 2),
        (BS, BS),
        (BS - 100, 3 * BS + 200),
        (5 * BS, 77),
        (5 * BS + 70, 1000),  # past EOF: short read
        (3, 4 * BS),
    ]:
        assert bytes(await served.fs.read(fh, off, size)) == data[off : off + size]
    assert bytes(await served.fs.read(fh, len(data), 10)) == b""
    assert bytes(await served.fs.read(fh, len(data) + BS, 10)) == b""
    await served.fs.release(fh)
    assert served.service.files.statistics().open_files == 0


async def test_a_second_read_comes_from_memory(served: Served, make_payload) -> None:
    data = make_payload(3 * BS, seed=12)
    (served.root / "f").write_bytes(data)
    assert await served.read_all("f") == data
    reads = served.source.statistics().block_reads
    assert await served.read_all("f") == data
    assert served.source.statistics().block_reads == reads
    assert served.loader.statistics().hits >= 3


async def test_an_empty_file_reads_as_empty(served: Served) -> None:
    (served.root / "empty").write_bytes(b"")
    assert await served.read_all("empty") == b""


async def test_open_handle_keeps_its_version_when_the_file_is_replaced(
    served: Served, make_payload
) -> None:
    old, new = make_payload(2 * BS, seed=13), make_payload(3 * BS, seed=14)
    (served.root / "f").write_bytes(old)
    fh = (await served.fs.open(await served.inode("f"), os.O_RDONLY)).fh
    (served.root / "f.tmp").write_bytes(new)
    os.rename(served.root / "f.tmp", served.root / "f")
    assert bytes(await served.fs.read(fh, 0, 10 * BS)) == old
    await served.fs.release(fh)
    served.clock.now += TTL_S
    assert await served.read_all("f") == new


async def test_read_after_an_in_place_rewrite_is_estale_never_new_bytes(
    tmp_path: Path, make_payload
) -> None:
    path = tmp_path / "f"
    path.write_bytes(make_payload(2 * BS, seed=15))
    st = os.stat(path)
    # No readahead: which blocks are in memory is then up to the test alone.
    async with serving(tmp_path, read_ahead_blocks=0) as served:
        fh = (await served.fs.open(await served.inode("f"), os.O_RDONLY)).fh
        first = bytes(await served.fs.read(fh, 0, BS))
        path.write_bytes(make_payload(2 * BS + 1, seed=16))  # O_TRUNC: same inode
        assert bytes(await served.fs.read(fh, 0, BS)) == first  # in memory: old version
        assert BlockKey(FileVersion(b"f", st.st_size, st.st_mtime_ns), 1) not in served.store
        await expect_errno(errno.ESTALE, served.fs.read(fh, BS, BS))
        await served.fs.release(fh)


async def test_concurrent_readers_under_capacity_pressure_get_the_right_bytes(
    tmp_path: Path, make_payload, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_payload(8 * BS + 100, seed=20)
    (tmp_path / "f").write_bytes(data)
    wrong: list[int] = []
    async with serving(tmp_path, capacity_blocks=2) as served:
        # Blocks from memory at trio speed, no threads: many fills finish in one
        # scheduling batch, which is when an evicted buffer can be handed to a
        # new fill before the readers of its old block have woken up.
        async def read_block(key: BlockKey, buffer: memoryview, block_size: int) -> int:
            await trio.lowlevel.checkpoint()
            start = key.offset(block_size)
            buffer[:] = data[start : start + len(buffer)]
            return xxhash.xxh3_64_intdigest(buffer)

        monkeypatch.setattr(served.source, "read_block", read_block)
        inode = await served.inode("f")
        rng = random.Random(1)

        async def reader(offsets: list[int]) -> None:
            fh = (await served.fs.open(inode, os.O_RDONLY)).fh
            for off in offsets:
                size = BS if off % 2 else BS + 10  # one block, or a straddling read
                # Copy at once, as pyfuse3 does when it replies.
                if bytes(await served.fs.read(fh, off, size)) != data[off : off + size]:
                    wrong.append(off)
                stats = served.store.statistics()
                total = stats.used_bytes + stats.reserved_bytes + stats.free_buffer_bytes
                assert total <= 2 * BS
            await served.fs.release(fh)

        async with trio.open_nursery() as readers:
            for _ in range(16):
                offsets = [rng.randrange(9) * BS + rng.choice([0, 1]) for _ in range(20)]
                readers.start_soon(reader, offsets)
        assert served.store.statistics().evictions > 0
    assert wrong == []


# -- read-only -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("setattr", (ROOT, pyfuse3.EntryAttributes(), None, None, None)),
        ("mknod", (ROOT, b"n", 0o644, 0, None)),
        ("mkdir", (ROOT, b"d", 0o755, None)),
        ("unlink", (ROOT, b"f", None)),
        ("rmdir", (ROOT, b"d", None)),
        ("symlink", (ROOT, b"s", b"f", None)),
        ("rename", (ROOT, b"f", ROOT, b"g", 0, None)),
        ("link", (ROOT, ROOT, b"l", None)),
        ("write", (1, 0, b"data")),
        ("create", (ROOT, b"new", 0o644, os.O_WRONLY | os.O_CREAT, None)),
        ("setxattr", (ROOT, b"user.x", b"v", None)),
        ("removexattr", (ROOT, b"user.x", None)),
    ],
)
async def test_every_mutating_operation_is_erofs(
    served: Served, method: str, args: tuple[Any, ...]
) -> None:
    (served.root / "f").write_bytes(b"keep")
    (served.root / "d").mkdir()
    await expect_errno(errno.EROFS, getattr(served.fs, method)(*args))
    assert sorted(p.name for p in served.root.iterdir()) == ["d", "f"]
    assert (served.root / "f").read_bytes() == b"keep"


@pytest.mark.parametrize(
    "flags",
    [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND],
)
async def test_open_for_writing_is_erofs(served: Served, flags: int) -> None:
    (served.root / "f").write_bytes(b"keep")
    await expect_errno(errno.EROFS, served.fs.open(await served.inode("f"), flags))
    assert (served.root / "f").read_bytes() == b"keep"
    assert served.service.files.statistics().open_files == 0


# -- errors ------------------------------------------------------------------------------
async def test_unexpected_exception_becomes_eio_and_is_counted(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (served.root / "f").write_bytes(b"x")
    inode = await served.inode("f")

    async def broken(relpath: bytes) -> os.stat_result:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(served.fs._metadata, "lstat", broken)
    with caplog.at_level(logging.ERROR, logger="memcachefs.fs"):
        await expect_errno(errno.EIO, served.fs.getattr(inode))
    assert served.fs.counters.internal_errors == 1
    assert served.fs.counters.requests_in_flight == 0
    assert [r.levelno for r in caplog.records if r.name == "memcachefs.fs"] == [logging.ERROR]
    monkeypatch.undo()
    assert (await served.fs.getattr(inode)).st_size == 1  # still serving


async def test_source_read_error_becomes_eio(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    (served.root / "f").write_bytes(b"y" * 3 * BS)
    fh = (await served.fs.open(await served.inode("f"), os.O_RDONLY)).fh

    def failing_read(*args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(source_module, "_read_exactly", failing_read)
    await expect_errno(errno.EIO, served.fs.read(fh, 0, BS))
    assert served.fs.counters.internal_errors == 0
    assert served.source.statistics().read_errors >= 1
    monkeypatch.undo()
    assert bytes(await served.fs.read(fh, 0, BS)) == b"y" * BS  # the next read retries


async def test_open_of_a_missing_file_is_enoent(served: Served) -> None:
    (served.root / "f").write_bytes(b"x")
    inode = await served.inode("f")
    os.unlink(served.root / "f")
    await expect_errno(errno.ENOENT, served.fs.open(inode, os.O_RDONLY))


# -- extended attributes and statistics ------------------------------------------
async def test_stats_xattr_on_the_root_is_json(served: Served) -> None:
    (served.root / "f").write_bytes(b"z" * BS)
    await served.read_all("f")
    stats = json.loads(await served.fs.getxattr(ROOT, STATS_XATTR))
    assert stats["capacity_bytes"] == 64 * BS
    assert stats["misses"] >= 1
    assert stats["internal_errors"] == 0
    assert stats["pid"] == os.getpid()


async def test_stats_xattr_on_another_inode_is_not_there(served: Served) -> None:
    (served.root / "f").write_bytes(b"x")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await served.fs.getxattr(await served.inode("f"), STATS_XATTR)
    # ENOATTR; EOPNOTSUPP where the test directory's filesystem has no user xattrs.
    assert caught.value.errno in (pyfuse3.ENOATTR, errno.EOPNOTSUPP)


async def test_security_and_system_xattrs_are_not_supported_on_the_mount(
    served: Served,
) -> None:
    """Labels, capabilities and ACLs would not be in effect on the mount: their
    namespaces answer EOPNOTSUPP without asking the source (so ls -l, which caches
    that per device, stops asking), and listxattr leaves them out."""
    path = served.root / "f"
    path.write_bytes(b"x")
    try:
        os.setxattr(path, "user.kept", b"1")
        os.setxattr(path, "security.memcachefs-test", b"2")
    except OSError as error:
        pytest.skip(f"the test directory's filesystem takes no such xattrs: {error}")
    inode = await served.inode("f")
    assert await served.fs.listxattr(inode) == [b"user.kept"]
    asked = served.service.metadata.statistics().xattr_source_calls
    for name in (b"security.selinux", b"security.memcachefs-test", b"system.posix_acl_access"):
        await expect_errno(errno.EOPNOTSUPP, served.fs.getxattr(inode, name))
    assert served.service.metadata.statistics().xattr_source_calls == asked
    assert await served.fs.getxattr(inode, b"user.kept") == b"1"


async def test_statfs_reports_the_source(served: Served) -> None:
    data = await served.fs.statfs()
    assert data.f_bsize == os.statvfs(served.root).f_bsize


# -- the kernel page cache ----------------------------------------------------------
async def test_each_version_is_its_own_inode_and_keeps_its_page_cache(served: Served) -> None:
    path = served.root / "f"
    path.write_bytes(b"version one")
    inode = await served.inode("f")
    first = await served.fs.open(inode, os.O_RDONLY)
    second = await served.fs.open(inode, os.O_RDONLY)
    # An inode never holds another version, so its pages never need dropping.
    assert first.keep_cache is True and second.keep_cache is True
    await served.fs.release(first.fh)
    await served.fs.release(second.fh)
    path.write_bytes(b"version two, longer")
    served.clock.now += TTL_S
    # The old inode is the old version: an open of it is ESTALE, which makes the
    # kernel look the name up again and open the new version's inode.
    await expect_errno(errno.ESTALE, served.fs.open(inode, os.O_RDONLY))
    assert (await served.fs.getattr(inode)).st_size == len(b"version one")
    new_inode = await served.inode("f")
    assert new_inode != inode
    changed = await served.fs.open(new_inode, os.O_RDONLY)
    assert bytes(await served.fs.read(changed.fh, 0, 100)) == b"version two, longer"
    assert (await served.fs.getattr(new_inode)).st_size == len(b"version two, longer")


async def test_a_version_held_for_a_retried_open_is_let_go_when_it_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait_for
) -> None:
    monkeypatch.setattr(handles, "WAITING_VERSION_S", 0.05)
    (tmp_path / "f").write_bytes(b"version one")
    async with serving(tmp_path) as served:
        inode = await served.inode("f")
        (tmp_path / "f.new").write_bytes(b"version two, longer")
        os.rename(tmp_path / "f.new", tmp_path / "f")
        served.clock.now += TTL_S
        await expect_errno(errno.ESTALE, served.fs.open(inode, os.O_RDONLY))
        assert served.source.statistics().held_descriptors == 1  # for the kernel's retry
        # The retry never comes (the opener gave up): no later open must be needed
        # to let the replaced file go.
        await wait_for(
            lambda: served.source.statistics().held_descriptors == 0, "the held version to expire"
        )


async def test_open_on_a_stalled_source_serves_cached_blocks_unpinned(
    tmp_path: Path, make_payload, monkeypatch: pytest.MonkeyPatch, autojump_clock: Any
) -> None:
    data = make_payload(2 * BS, seed=30)
    (tmp_path / "f").write_bytes(data)
    async with serving(tmp_path, read_ahead_blocks=0, stale_grace_s=0.5) as served:
        inode = await served.inode("f")  # attributes known from the lookup
        version = await served.source.open(b"f")
        await served.loader.block(BlockKey(version, 0), BS)  # block 0 cached
        served.source.release(version)
        unstall = trio.Event()
        real_open = served.source.open

        async def stalled_open(relpath: bytes) -> FileVersion:
            await unstall.wait()
            return await real_open(relpath)

        monkeypatch.setattr(served.source, "open", stalled_open)
        started = trio.current_time()
        fh = (await served.fs.open(inode, os.O_RDONLY)).fh
        assert trio.current_time() - started == pytest.approx(0.5)  # the grace, not forever
        assert served.service.files.statistics().unpinned_opens == 1
        assert bytes(await served.fs.read(fh, 0, BS)) == data[:BS]
        # A block that needs the source is read by path and checked against the version.
        assert bytes(await served.fs.read(fh, BS, BS)) == data[BS:]
        await served.fs.release(fh)
        unstall.set()
