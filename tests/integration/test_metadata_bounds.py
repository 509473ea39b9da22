"""Issue 10 item 4 (README "Semantics" 6): the daemon's metadata memory is bounded
however many entries are listed: the inodes the kernel holds stay within
`--inode-limit` (past it the kernel is asked to drop the least recently looked-up
names), and what is dropped is looked up again, with the same content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import wait_until

pytestmark = pytest.mark.fuse

FILES = 1500
LIMIT = 300


def _content(i: int) -> bytes:
    return b"file %d\n" % i * (1 + i % 7)


def test_the_inodes_the_kernel_holds_stay_within_the_limit(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    listed = memcachefs_source / "many"
    listed.mkdir()
    for i in range(FILES):
        (listed / f"f{i:04d}").write_bytes(_content(i))
    fs = memcachefs_mount(
        memcachefs_source,
        args=["--inode-limit", str(LIMIT), "--attr-timeout", "60"],
        expected_log=[],
    )
    many = fs.path / "many"
    with open(many / "f0000", "rb") as held:  # open while its name is dropped
        names = sorted(os.listdir(many))
        assert len(names) == FILES
        for name in names:  # what `ls -l` does: every entry looked up
            os.lstat(many / name)
        stats = wait_until(
            lambda: (s := fs.stats())["inodes"] <= LIMIT and s, "inodes back within the limit"
        )
        assert stats["inodes_dropped"] >= FILES - LIMIT
        assert held.read() == _content(0)
    for i, name in enumerate(names):  # dropped names are looked up again
        assert (many / name).read_bytes() == _content(i)
    assert wait_until(lambda: fs.stats()["inodes"] <= LIMIT, "inodes within the limit again")
