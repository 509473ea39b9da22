"""Inode numbers for source paths, with the kernel's lookup counts.

Inodes are ours, not the source's. A regular file gets a new inode when the
source file behind its path becomes another version (size or mtime changed):
the kernel keeps a page cache and a size per inode, so one inode per version
keeps an old handle's pages and size apart from a new open's, and a read never
mixes the two. Directories and other files keep their inode while the kernel
knows them. An inode is dropped when the kernel forgets it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import pyfuse3

ROOT_INODE = pyfuse3.ROOT_INODE

# What must stay the same for a path to keep its inode.
Identity = tuple[int, ...]


def identity_of(st: os.stat_result) -> Identity:
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        return (kind, st.st_size, st.st_mtime_ns)
    return (kind,)


@dataclass(frozen=True)
class InodeStatistics:
    inodes: int


class InodeTable:
    def __init__(self) -> None:
        self._paths: dict[int, bytes] = {ROOT_INODE: b""}
        self._inodes: dict[bytes, int] = {b"": ROOT_INODE}
        self._lookups: dict[int, int] = {ROOT_INODE: 1}
        self._attributes: dict[int, os.stat_result] = {}
        self._next = ROOT_INODE + 1

    def path(self, inode: int) -> bytes:
        """The relative path of `inode`; KeyError if the kernel never got it."""
        return self._paths[inode]

    def child_path(self, parent: int, name: bytes) -> bytes:
        base = self._paths[parent]
        return base + b"/" + name if base else name

    def inode(self, relpath: bytes, st: os.stat_result | None = None) -> int:
        """The inode of `relpath` as `st` describes it (lookup count unchanged).

        A new inode when the path now holds another version of a file, or
        another kind of file, than its inode was given for.
        """
        inode = self._inodes.get(relpath)
        if inode is not None and (
            st is None or inode == ROOT_INODE or self.is_same_version(inode, st)
        ):
            if st is not None and inode != ROOT_INODE:
                self._attributes[inode] = st
            return inode
        inode = self._next
        self._next += 1
        self._inodes[relpath] = inode
        self._paths[inode] = relpath
        self._lookups[inode] = 0
        if st is not None:
            self._attributes[inode] = st
        return inode

    def known(self, relpath: bytes) -> int | None:
        """The inode the kernel holds for `relpath` now, if it holds one."""
        inode = self._inodes.get(relpath)
        return inode if inode is not None and self._lookups.get(inode, 0) > 0 else None

    def is_same_version(self, inode: int, st: os.stat_result) -> bool:
        """False if `st` (a path's attributes now) is another version than `inode`'s."""
        known = self._attributes.get(inode)
        return known is None or known is st or identity_of(known) == identity_of(st)

    def attributes(self, inode: int) -> os.stat_result | None:
        """The attributes `inode` was last given with (None for the root)."""
        return self._attributes.get(inode)

    def looked_up(self, inode: int) -> None:
        """The kernel took a reference (lookup, readdirplus entry)."""
        self._lookups[inode] += 1

    def forget(self, inode: int, count: int) -> None:
        if inode == ROOT_INODE or inode not in self._lookups:
            return
        self._lookups[inode] -= count
        if self._lookups[inode] <= 0:
            del self._lookups[inode]
            self._attributes.pop(inode, None)
            relpath = self._paths.pop(inode)
            if self._inodes.get(relpath) == inode:  # not replaced by a newer version's
                del self._inodes[relpath]

    def statistics(self) -> InodeStatistics:
        return InodeStatistics(inodes=len(self._paths))
