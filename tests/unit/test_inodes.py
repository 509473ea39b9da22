"""Inode numbers and the kernel's lookup counts."""

from __future__ import annotations

import os
import stat

import pytest

from memcachefs.inodes import ROOT_INODE, InodeTable


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
