"""The source: path validation, safe opens, block reads and version checks."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import xxhash

from memcachefs.errors import SourceError, StaleVersion
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.source import (
    IDLE_DESCRIPTORS,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    PathRejected,
    Source,
    _read_exactly,
    validate_relpath,
)

BS = 4096


@pytest.fixture
def payload(make_payload):
    return make_payload


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def source(root: Path) -> Iterator[Source]:
    with Source(root, block_threads=2, metadata_threads=2) as source:
        yield source


@pytest.mark.parametrize(
    "relpath",
    [b"", b"a", b"a/b/c.bin", b"..a", b"a..", b"a/.hidden", b"x" * MAX_NAME_BYTES],
)
def test_validate_relpath_accepts_clean_paths(relpath: bytes) -> None:
    assert validate_relpath(relpath) == relpath


@pytest.mark.parametrize(
    "relpath",
    [
        b"..",
        b"../etc/passwd",
        b"a/../../b",
        b"a/..",
        b"/etc/passwd",
        b"/",
        b"a\0b",
        b"a//b",
        b"a/",
        b"./a",
        b"a/./b",
        b"x" * (MAX_NAME_BYTES + 1),
        b"a/" * (MAX_PATH_BYTES // 2) + b"a",
    ],
)
def test_validate_relpath_rejects_escapes_and_malformed_paths(relpath: bytes) -> None:
    with pytest.raises(PathRejected):
        validate_relpath(relpath)


async def test_open_pins_the_current_version(root: Path, source: Source, payload) -> None:
    (root / "d").mkdir()
    data = payload(3 * BS + 10)
    (root / "d" / "f").write_bytes(data)
    version = await source.open(b"d/f")
    st = os.stat(root / "d" / "f")
    assert version == FileVersion(b"d/f", len(data), st.st_mtime_ns)
    assert source.statistics().open_descriptors == 1
    source.release(version)


async def test_idle_descriptors_stay_within_the_idle_cache(root: Path, source: Source) -> None:
    # Opens whose opener never pins them (it gave up on a stalled source) are idle
    # from the start: they must not pile up past the cache until some release.
    for n in range(IDLE_DESCRIPTORS + 8):
        (root / f"f{n}").write_bytes(b"x")
        await source.open(b"f%d" % n)
    assert source.statistics().open_descriptors == IDLE_DESCRIPTORS
    assert source.statistics().held_descriptors == 0


async def test_a_new_version_lets_the_replaced_ones_idle_descriptor_go(
    root: Path, source: Source
) -> None:
    (root / "f").write_bytes(b"version one")
    old = await source.open(b"f")
    (root / "f.new").write_bytes(b"version two, longer")
    os.rename(root / "f.new", root / "f")
    new = await source.open(b"f")
    assert new != old
    # An idle descriptor of a replaced file would keep its space in use on the source.
    assert source.statistics().open_descriptors == 1
    held = await source.open(b"f")
    assert source.pin(held)
    (root / "f.new").write_bytes(b"version three, longest")
    os.rename(root / "f.new", root / "f")
    await source.open(b"f")
    assert source.statistics().open_descriptors == 2  # the pinned one stays
    assert source.statistics().held_descriptors == 1
    source.release(held)


async def test_open_refuses_a_symlink_to_outside_the_root(
    tmp_path: Path, root: Path, source: Source
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not serve")
    (root / "link").symlink_to(secret)
    with pytest.raises(OSError) as caught:
        await source.open(b"link")
    assert caught.value.errno == errno.ELOOP


async def test_open_refuses_a_symlinked_directory_component(
    tmp_path: Path, root: Path, source: Source
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"do not serve")
    (root / "dir").symlink_to(outside)
    with pytest.raises(OSError) as caught:
        await source.open(b"dir/f")
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    # Also a symlink that stays inside the root: the daemon never follows one.
    (root / "real").mkdir()
    (root / "real" / "f").write_bytes(b"inside")
    (root / "alias").symlink_to("real")
    with pytest.raises(OSError):
        await source.open(b"alias/f")
    assert (await source.open(b"real/f")).size == 6


@pytest.mark.parametrize("relpath", [b"../root/f", b"/etc/passwd", b"a\0b", b"a//f"])
async def test_open_refuses_rejected_paths_with_eacces(
    root: Path, source: Source, relpath: bytes
) -> None:
    (root / "f").write_bytes(b"x")
    with pytest.raises(OSError) as caught:
        await source.open(relpath)
    assert caught.value.errno == errno.EACCES


async def test_open_of_a_fifo_fails_fast_instead_of_hanging(root: Path, source: Source) -> None:
    os.mkfifo(root / "fifo")
    with pytest.raises(OSError) as caught:
        await source.open(b"fifo")
    assert caught.value.errno == errno.EINVAL
    assert source.statistics().open_descriptors == 0


async def test_open_refuses_a_directory(root: Path, source: Source) -> None:
    (root / "d").mkdir()
    with pytest.raises(OSError):
        await source.open(b"d")


def rewrite_in_place(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


async def read(source: Source, version: FileVersion, index: int) -> tuple[bytes, int]:
    key = BlockKey(version, index)
    buffer = bytearray(key.length(BS))
    checksum = await source.read_block(key, memoryview(buffer), BS)
    return bytes(buffer), checksum


async def test_read_block_returns_the_bytes_and_their_xxh3(
    root: Path, source: Source, payload
) -> None:
    data = payload(3 * BS + 100, seed=1)
    (root / "f").write_bytes(data)
    version = await source.open(b"f")
    for index in range(4):
        block, checksum = await read(source, version, index)
        expected = data[index * BS : (index + 1) * BS]
        assert block == expected
        assert checksum == xxhash.xxh3_64_intdigest(expected)
    assert len(block) == 100  # the short last block
    stats = source.statistics()
    assert stats.block_reads == 4


@pytest.fixture
def reads_at_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Block reads wait until four run at once; the descriptors they used."""
    barrier = threading.Barrier(4, timeout=10)
    used: list[int] = []

    def read_exactly(fd: int, *args: object) -> int:
        used.append(fd)
        barrier.wait()
        return _read_exactly(fd, *args)

    monkeypatch.setattr("memcachefs.source._read_exactly", read_exactly)
    return used


async def read_at_once(source: Source, version: FileVersion, count: int) -> list[bytes]:
    """Blocks 0..count-1 of `version`, read all at once."""
    blocks: dict[int, bytes] = {}

    async def read_into(index: int) -> None:
        blocks[index] = (await read(source, version, index))[0]

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(read_into, index)
    return [blocks[index] for index in range(count)]


async def test_block_reads_of_one_file_at_once_each_get_a_descriptor(
    root: Path, payload, reads_at_once: list[int]
) -> None:
    # A FUSE client of object storage may serve one read per handle at a time:
    # parallel block reads through one descriptor would not be parallel there.
    data = payload(4 * BS, seed=3)
    (root / "f").write_bytes(data)
    with Source(root, block_threads=4, metadata_threads=2) as source:
        version = await source.open(b"f")
        assert source.pin(version)
        blocks = await read_at_once(source, version, 4)
        assert len(set(reads_at_once)) == 4
        assert blocks == [data[i * BS : (i + 1) * BS] for i in range(4)]
        assert source.statistics().parallel_opens == 3
        # The extra ones are let go once the reads are done; the first stays.
        assert source.statistics().open_descriptors == 1
        source.release(version)


async def test_parallel_reads_of_a_replaced_file_read_the_file_that_was_opened(
    root: Path, payload, reads_at_once: list[int]
) -> None:
    old, new = payload(4 * BS, seed=4), payload(4 * BS, seed=5)
    (root / "f").write_bytes(old)
    with Source(root, block_threads=4, metadata_threads=2) as source:
        version = await source.open(b"f")
        assert source.pin(version)
        (root / "f.new").write_bytes(new)
        os.rename(root / "f.new", root / "f")
        blocks = await read_at_once(source, version, 4)
        assert blocks == [old[i * BS : (i + 1) * BS] for i in range(4)]
        assert len(set(reads_at_once)) == 4
        source.release(version)


async def test_a_parallel_read_of_a_file_rewritten_in_place_is_stale(
    root: Path, payload, monkeypatch: pytest.MonkeyPatch, wait_for
) -> None:
    old = payload(4 * BS, seed=6)
    (root / "f").write_bytes(old)
    first_entered, first_may_go = threading.Event(), threading.Event()

    def read_exactly(fd: int, *args: object) -> int:
        if not first_entered.is_set():  # the first read holds its descriptor
            first_entered.set()
            first_may_go.wait(timeout=10)
        return _read_exactly(fd, *args)

    monkeypatch.setattr("memcachefs.source._read_exactly", read_exactly)
    with Source(root, block_threads=4, metadata_threads=2) as source:
        version = await source.open(b"f")
        assert source.pin(version)
        async with trio.open_nursery() as nursery:

            async def read_first() -> None:
                with pytest.raises(StaleVersion):
                    await read(source, version, 0)

            nursery.start_soon(read_first)
            await wait_for(first_entered.is_set, "the first read")
            (root / "f").write_bytes(payload(5 * BS, seed=7))  # O_TRUNC: the same file
            # The first descriptor is busy: this read opens another of the same file,
            # and sees it is no longer the version it was asked for.
            with pytest.raises(StaleVersion):
                await read(source, version, 1)
            first_may_go.set()
        assert source.statistics().parallel_opens == 0
        source.release(version)


async def test_read_block_without_open_checks_the_version(
    root: Path, source: Source, payload
) -> None:
    data = payload(BS, seed=2)
    (root / "f").write_bytes(data)
    st = os.stat(root / "f")
    version = FileVersion(b"f", st.st_size, st.st_mtime_ns)
    assert (await read(source, version, 0))[0] == data
    wrong = FileVersion(b"f", st.st_size, st.st_mtime_ns + 1)
    with pytest.raises(StaleVersion):
        await read(source, wrong, 0)
    assert source.statistics().stale_reads == 1


async def test_read_block_of_a_file_changed_before_the_read_is_stale(
    root: Path, source: Source, payload
) -> None:
    path = root / "f"
    path.write_bytes(payload(2 * BS, seed=3))
    st = os.stat(path)
    version = FileVersion(b"f", st.st_size, st.st_mtime_ns)
    path.write_bytes(payload(2 * BS, seed=4))  # rewritten, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(StaleVersion):
        await read(source, version, 0)


async def test_read_through_an_open_handle_after_in_place_rewrite_is_stale(
    root: Path, source: Source, payload
) -> None:
    path = root / "f"
    path.write_bytes(payload(2 * BS, seed=5))
    version = await source.open(b"f")
    rewrite_in_place(path, b"new bytes")  # the pinned descriptor sees the new bytes
    os.utime(path, ns=(0, version.mtime_ns + 1_000_000))
    with pytest.raises(StaleVersion):
        await read(source, version, 0)
    assert source.statistics().stale_reads == 1


async def test_read_through_an_open_handle_after_truncation_is_stale(
    root: Path, source: Source, payload
) -> None:
    path = root / "f"
    path.write_bytes(payload(2 * BS, seed=6))
    version = await source.open(b"f")
    os.truncate(path, BS // 2)
    with pytest.raises(StaleVersion):
        await read(source, version, 1)


async def test_read_through_an_open_handle_after_replacement_keeps_the_old_file(
    root: Path, source: Source, payload
) -> None:
    old = payload(2 * BS, seed=7)
    (root / "f").write_bytes(old)
    version = await source.open(b"f")
    (root / "f.tmp").write_bytes(payload(3 * BS, seed=8))
    os.rename(root / "f.tmp", root / "f")
    assert (await read(source, version, 1))[0] == old[BS:]


async def test_read_block_of_a_vanished_file_is_a_source_error(root: Path, source: Source) -> None:
    (root / "f").write_bytes(b"x" * 10)
    st = os.stat(root / "f")
    os.unlink(root / "f")
    with pytest.raises(SourceError):
        await read(source, FileVersion(b"f", 10, st.st_mtime_ns), 0)
    assert source.statistics().read_errors == 1


async def test_metadata_calls_do_not_follow_symlinks(
    tmp_path: Path, root: Path, source: Source
) -> None:
    (tmp_path / "target").write_bytes(b"12345")
    (root / "link").symlink_to(tmp_path / "target")
    (root / "f").write_bytes(b"abc")
    st = await source.lstat(b"link")
    assert os.path.stat.S_ISLNK(st.st_mode)  # type: ignore[attr-defined]
    assert await source.readlink(b"link") == os.fsencode(tmp_path / "target")
    names = sorted(name for name, _ in await source.listdir(b""))
    assert names == [b"f", b"link"]


async def test_metadata_never_follows_a_symlinked_directory_component(
    tmp_path: Path, root: Path, source: Source
) -> None:
    # A directory swapped for a symlink must not expose what lies outside the root.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"1234567")
    (outside / "link").symlink_to("/target")
    (root / "dir").symlink_to(outside)
    for call in (source.lstat, source.readlink, source.listxattr):
        with pytest.raises(OSError) as caught:
            await call(b"dir/secret" if call is not source.readlink else b"dir/link")
        assert caught.value.errno in (errno.ENOTDIR, errno.ELOOP)
    with pytest.raises(OSError):
        await source.getxattr(b"dir/secret", b"user.x")
    with pytest.raises(OSError) as caught:
        await source.lstat(b"../outside/secret")
    assert caught.value.errno == errno.EACCES


async def test_metadata_of_nested_paths_and_the_root(root: Path, source: Source) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"12345")
    (root / "a" / "b" / "l").symlink_to("f")
    assert (await source.lstat(b"a/b/f")).st_size == 5
    assert await source.readlink(b"a/b/l") == b"f"
    assert os.path.stat.S_ISDIR((await source.lstat(b"")).st_mode)  # type: ignore[attr-defined]
    with pytest.raises(FileNotFoundError):
        await source.lstat(b"a/missing/f")


async def test_xattrs_pass_through_read_only(root: Path, source: Source) -> None:
    (root / "d").mkdir()
    path = root / "d" / "f"
    path.write_bytes(b"x")
    try:
        os.setxattr(path, b"user.origin", b"bucket")
    except OSError as error:
        pytest.skip(f"no user xattrs on {root}: {error.strerror}")
    assert await source.getxattr(b"d/f", b"user.origin") == b"bucket"
    assert "user.origin" in await source.listxattr(b"d/f")
    with pytest.raises(OSError) as caught:
        await source.getxattr(b"d/f", b"user.missing")
    assert caught.value.errno == errno.ENODATA


async def test_two_scans_of_the_root_at_once_each_see_every_entry(
    root: Path, source: Source
) -> None:
    """A streamed listing of the root and a full one may run together (a stream and
    a refresh of its listing): each reads its own descriptor, not the root's (a
    duplicate of it shares the file offset: 116,000 duplicate names in `ls` of
    300,000 entries)."""
    from memcachefs.source import STREAM_CHUNK, DirectoryStream

    names = sorted(f"f{i:05d}".encode() for i in range(3 * STREAM_CHUNK))
    for name in names:
        (root / name.decode()).write_bytes(b"")
    stream = DirectoryStream(source, b"")
    first, chunk = await stream.entries_from(0)
    streamed = [name for name, _ in chunk]
    assert [name for name, _ in await source.listdir(b"")] == names
    while chunk:
        first, chunk = await stream.entries_from(first + len(chunk))
        streamed += [name for name, _ in chunk]
    stream.close()
    assert sorted(streamed) == names
