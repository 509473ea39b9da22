"""Inode numbers for source paths, with the kernel's lookup counts.

Inodes are ours, not the source's: a path keeps its inode while the kernel
knows it, even if the source file behind it is replaced (the version tells the
contents apart). An inode is dropped when the kernel forgets it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyfuse3

ROOT_INODE = pyfuse3.ROOT_INODE


@dataclass(frozen=True)
class InodeStatistics:
    inodes: int


class InodeTable:
    def __init__(self) -> None:
        self._paths: dict[int, bytes] = {ROOT_INODE: b""}
        self._inodes: dict[bytes, int] = {b"": ROOT_INODE}
        self._lookups: dict[int, int] = {ROOT_INODE: 1}
        self._next = ROOT_INODE + 1

    def path(self, inode: int) -> bytes:
        """The relative path of `inode`; KeyError if the kernel never got it."""
        return self._paths[inode]

    def child_path(self, parent: int, name: bytes) -> bytes:
        base = self._paths[parent]
        return base + b"/" + name if base else name

    def inode(self, relpath: bytes) -> int:
        """The inode of `relpath`, assigning one if needed (lookup count unchanged)."""
        inode = self._inodes.get(relpath)
        if inode is None:
            inode = self._next
            self._next += 1
            self._inodes[relpath] = inode
            self._paths[inode] = relpath
            self._lookups[inode] = 0
        return inode

    def looked_up(self, inode: int) -> None:
        """The kernel took a reference (lookup, readdirplus entry)."""
        self._lookups[inode] += 1

    def forget(self, inode: int, count: int) -> None:
        if inode == ROOT_INODE or inode not in self._lookups:
            return
        self._lookups[inode] -= count
        if self._lookups[inode] <= 0:
            del self._lookups[inode]
            del self._inodes[self._paths.pop(inode)]

    def statistics(self) -> InodeStatistics:
        return InodeStatistics(inodes=len(self._paths))
