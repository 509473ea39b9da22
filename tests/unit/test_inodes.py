"""Inode numbers and the kernel's lookup counts."""

from __future__ import annotations

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
