"""Inode numbers and the kernel's lookup counts."""

from __future__ import annotations

import os
import stat

import pytest
import trio

from memcachefs.inodes import ROOT_INODE, InodeLimit, InodeTable


def test_paths_get_stable_distinct_inodes() -> None:
    table = InodeTable()
    a, b = table.inode(b"a"), table.inode(b"a/b")
    assert a != b
    assert ROOT_INODE not in (a, b)
    assert table.inode(b"a") == a
    assert table.path(b) == b"a/b"
    assert table.path(ROOT_INODE) == b""
    assert table.child_path(ROOT_INODE, b"x") == b"x"
    assert table.child_path(a, b"x") == b"a/x"


def test_forget_drops_an_inode_when_its_lookups_reach_zero() -> None:
    table = InodeTable()
    inode = table.inode(b"f")
    table.looked_up(inode)
    table.looked_up(inode)
    table.forget(inode, 1)
    assert table.path(inode) == b"f"
    table.forget(inode, 1)
    with pytest.raises(KeyError):
        table.path(inode)
    assert table.inode(b"f") != inode  # a new number: the kernel may still hold the old one
    table.forget(inode, 5)  # an unknown inode is ignored


def test_the_root_is_never_forgotten() -> None:
    table = InodeTable()
    table.forget(ROOT_INODE, 100)
    assert table.path(ROOT_INODE) == b""
    assert table.statistics().inodes == 1


def _stat(size: int, mtime_ns: int, mode: int = stat.S_IFREG | 0o644) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, 0, mtime_ns))


def test_a_new_version_of_a_file_gets_a_new_inode_and_the_old_one_lives_on() -> None:
    table = InodeTable()
    old = table.inode(b"m", _stat(10, 1))
    table.looked_up(old)
    assert table.inode(b"m", _stat(10, 1)) == old  # same version: same inode
    new = table.inode(b"m", _stat(20, 2))
    table.looked_up(new)
    assert new != old
    assert table.path(old) == table.path(new) == b"m"
    assert not table.is_same_version(old, _stat(20, 2))
    old_attributes = table.attributes(old)
    assert old_attributes is not None and old_attributes.st_size == 10
    table.forget(old, 1)  # the old inode goes; the path keeps its new inode
    assert table.inode(b"m", _stat(20, 2)) == new


def test_a_directory_keeps_its_inode_when_its_mtime_changes() -> None:
    table = InodeTable()
    directory = stat.S_IFDIR | 0o755
    inode = table.inode(b"d", _stat(4096, 1, directory))
    assert table.inode(b"d", _stat(4096, 2, directory)) == inode
    assert table.inode(b"d", _stat(10, 3)) != inode  # now a regular file


async def _settle(limit: InodeLimit, wait_for) -> None:
    """Let run() act on what check() found, to the end of its pass."""
    limit.check()
    await wait_for(limit.settled, "the limit's pass")


async def test_past_the_limit_the_least_recently_looked_up_names_are_dropped(
    nursery: trio.Nursery,
    wait_for,
) -> None:
    table = InodeTable()
    directory = table.inode(b"d")
    table.looked_up(directory)
    files = [table.inode(b"d/f%d" % i) for i in range(200)]
    for inode in files:
        table.looked_up(inode)
    table.looked_up(files[0])  # used again: now the most recent
    asked: list[tuple[int, bytes]] = []
    limit = InodeLimit(table, 150, lambda parent, name: asked.append((parent, name)))
    nursery.start_soon(limit.run)
    await _settle(limit, wait_for)
    # Down to 90% of the limit (135 of 202 held), the oldest first, the root and
    # the directory (looked up first, but the parent of them all) included in order.
    assert asked[0] == (ROOT_INODE, b"d")
    assert asked[1:] == [(directory, b"f%d" % i) for i in range(1, 67)]
    assert limit.statistics().inodes_dropped == 67
    await _settle(limit, wait_for)
    assert len(asked) == 67  # asked once: the kernel has not forgotten them yet
    for inode in files[1:41]:  # the kernel forgets what it can, not the files in use
        table.forget(inode, 1)
    await _settle(limit, wait_for)
    assert len(asked) == 67  # 162 held, 27 of them on their way out (forgotten at release)
    for inode in files[41:67]:
        table.forget(inode, 1)
    for i in range(200, 250):
        table.looked_up(table.inode(b"d/f%d" % i))
    await _settle(limit, wait_for)  # 186 held, the directory on its way out: the 50 oldest go
    assert asked[67:] == [(directory, b"f%d" % i) for i in range(67, 117)]


async def test_a_stopped_limit_asks_the_kernel_nothing(nursery: trio.Nursery, wait_for) -> None:
    table = InodeTable()
    for i in range(300):
        table.looked_up(table.inode(b"f%d" % i))
    asked: list[tuple[int, bytes]] = []
    limit = InodeLimit(table, 100, lambda parent, name: asked.append((parent, name)))
    nursery.start_soon(limit.run)
    await limit.stop()
    await _settle(limit, wait_for)
    assert asked == []


def test_no_limit_means_nothing_is_dropped() -> None:
    table = InodeTable()
    for i in range(300):
        table.looked_up(table.inode(b"f%d" % i))
    limit = InodeLimit(table, None, lambda parent, name: None)
    limit.check()
    assert limit.statistics().inode_limit == 0


async def test_a_directory_whose_entries_are_looked_up_is_not_dropped(
    nursery: trio.Nursery,
    wait_for,
) -> None:
    table = InodeTable()
    old, busy = table.inode(b"old"), table.inode(b"busy")
    table.looked_up(old)
    table.looked_up(busy)
    for i in range(150):
        table.looked_up(table.inode(b"busy/f%d" % i))
        table.touch(busy)  # as a lookup in it does
    asked: list[tuple[int, bytes]] = []
    limit = InodeLimit(table, 140, lambda parent, name: asked.append((parent, name)))
    nursery.start_soon(limit.run)
    await _settle(limit, wait_for)
    # 153 held, down to 126: "old" first, never "busy" (the parent of all the rest).
    assert asked == [(ROOT_INODE, b"old")] + [(busy, b"f%d" % i) for i in range(26)]
