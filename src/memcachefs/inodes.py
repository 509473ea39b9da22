"""Inode numbers for source paths, with the kernel's lookup counts.

Inodes are ours, not the source's. A regular file gets a new inode when the
source file behind its path becomes another version (size or mtime changed):
the kernel keeps a page cache and a size per inode, so one inode per version
keeps an old handle's pages and size apart from a new open's, and a read never
mixes the two. Directories and other files keep their inode while the kernel
knows them. An inode is dropped when the kernel forgets it.

The kernel forgets an inode only when it drops the name (memory pressure, or
when asked), so the number it holds is bounded here: past `limit`, the
InodeLimit asks it to drop the least recently looked-up names
(`invalidate_entry`); it then forgets their inodes, except those in use (open
files, working directories), which stay until they are released.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import pyfuse3
import trio

from memcachefs.metrics import counter, gauge

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE

# What must stay the same for a path to keep its inode.
Identity = tuple[int, ...]


def identity_of(st: os.stat_result) -> Identity:
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        return (kind, st.st_size, st.st_mtime_ns)
    return (kind,)


# The daemon's memory per inode the kernel holds, as measured (benchmarks/README.md
# "Metadata at scale": 1,000,000 entries listed through 200,000 inodes): the record,
# its attributes, their share of the allocator's pages after names came and went.
INODE_BYTES = 1200
INVALIDATE_BATCH = 1024  # names dropped per worker call
LOW_WATER = 0.9  # past the limit, names are dropped until this share of it is held
STOP_WAIT_S = 2.0  # how long shutdown waits for an invalidation the kernel holds up

InvalidateEntry = Callable[[int, bytes], None]  # pyfuse3.invalidate_entry


class Name(NamedTuple):
    """A name for the kernel to drop. FUSE evicts an inode when its last dentry
    goes (and sends its FORGET), unless a file or working directory holds it."""

    parent: int
    name: bytes


@dataclass(frozen=True)
class InodeStatistics:
    inodes: int


class InodeTable:
    def __init__(self) -> None:
        self._paths: dict[int, bytes] = {ROOT_INODE: b""}
        self._inodes: dict[bytes, int] = {b"": ROOT_INODE}
        # The kernel's lookup counts (the root, never forgotten, aside), insertion-
        # ordered: the least recently looked-up inode first. Those it was asked to
        # forget wait in `_asked` (it forgets one in use when it is released).
        self._lookups: dict[int, int] = {}
        self._asked: dict[int, int] = {}
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
        if st is not None:
            self._attributes[inode] = st
        return inode

    def known(self, relpath: bytes) -> int | None:
        """The inode the kernel holds for `relpath` now, if it holds one."""
        inode = self._inodes.get(relpath)
        held = inode == ROOT_INODE or inode in self._lookups or inode in self._asked
        return inode if held else None

    def is_same_version(self, inode: int, st: os.stat_result) -> bool:
        """False if `st` (a path's attributes now) is another version than `inode`'s."""
        known = self._attributes.get(inode)
        return known is None or known is st or identity_of(known) == identity_of(st)

    def attributes(self, inode: int) -> os.stat_result | None:
        """The attributes `inode` was last given with (None for the root)."""
        return self._attributes.get(inode)

    def looked_up(self, inode: int) -> None:
        """The kernel took a reference (lookup, readdirplus entry)."""
        if inode == ROOT_INODE:
            return
        count = self._lookups.pop(inode, None)
        if count is None:  # new, or asked to be forgotten and in use again
            count = self._asked.pop(inode, 0)
        self._lookups[inode] = count + 1  # now the most recent

    def touch(self, inode: int) -> None:
        """`inode` (a directory whose entries are being looked up) is in use: the most
        recent, so the limit does not drop it with all its entries."""
        count = self._lookups.pop(inode, None)
        if count is not None:
            self._lookups[inode] = count

    @property
    def held(self) -> int:
        """Inodes the kernel holds (the root included)."""
        return 1 + len(self._lookups) + len(self._asked)

    @property
    def asked(self) -> int:
        """Inodes the kernel was asked to forget and still holds."""
        return len(self._asked)

    def oldest_names(self, count: int) -> list[Name]:
        """Up to `count` of the least recently looked-up inodes not asked for yet,
        as names to drop; from now on they count as asked."""
        oldest = list(itertools.islice(self._lookups, max(count, 0)))
        names: list[Name] = []
        for inode in oldest:
            self._asked[inode] = self._lookups.pop(inode)
            parent_path, _, name = self._paths[inode].rpartition(b"/")
            parent = self._inodes.get(parent_path)
            if parent is None:  # replaced: the kernel drops it with the old one
                continue
            names.append(Name(parent, name))
        return names

    def forget(self, inode: int, count: int) -> None:
        counts = self._lookups if inode in self._lookups else self._asked
        if inode not in counts:  # the root, or unknown
            return
        counts[inode] -= count
        if counts[inode] <= 0:
            del counts[inode]
            self._attributes.pop(inode, None)
            relpath = self._paths.pop(inode)
            if self._inodes.get(relpath) == inode:  # not replaced by a newer version's
                del self._inodes[relpath]

    def statistics(self) -> InodeStatistics:
        return InodeStatistics(inodes=len(self._paths))


@dataclass
class InodeLimitStatistics:
    inode_limit: int = gauge("inodes the kernel may hold before names are dropped (--inode-limit)")
    inodes_dropped: int = counter("names the kernel was asked to drop to keep within the limit")
    inode_records_bytes: int = gauge("estimated memory of the inodes the kernel holds")


class InodeLimit:
    """Keeps the inodes the kernel holds within `limit` (run() in a nursery)."""

    def __init__(
        self,
        table: InodeTable,
        limit: int | None,
        invalidate_entry: InvalidateEntry = pyfuse3.invalidate_entry,
    ) -> None:
        self._table = table
        self._limit = (1 << 62) if limit is None else limit
        self._invalidate_entry = invalidate_entry
        self._over = trio.Event()
        self._dropping = False  # a pass of run() is under way
        self._stopping = threading.Event()
        self._calling = threading.Lock()  # held while the kernel is being asked
        self.counters = InodeLimitStatistics(inode_limit=self._limit if limit else 0)

    def room(self) -> int:
        """How many more entries a readdir may hand the kernel now: past the limit
        (plus a batch of lag) one at a time, so that a listing of a huge directory
        goes at the pace the kernel drops names, instead of outgrowing the limit."""
        return max(1, self._limit + INVALIDATE_BATCH - self._table.held)

    def check(self) -> None:
        """Called after the kernel took references: wakes run() past the limit."""
        if self._table.held > self._limit:
            self._over.set()

    async def run(self) -> None:
        low_water = int(self._limit * LOW_WATER)
        while True:
            await self._over.wait()
            self._over = trio.Event()
            self._dropping = True
            while not self._stopping.is_set():
                # Those asked for and not forgotten yet are on their way out.
                wanted = self._table.held - self._table.asked - low_water
                names = self._table.oldest_names(min(INVALIDATE_BATCH, wanted))
                if not names:  # within the limit, or all the rest in use
                    break
                # In a worker thread: the kernel takes the directory's lock, which a
                # request being answered on this thread may hold.
                await trio.to_thread.run_sync(self._drop, names, abandon_on_cancel=True)
                self.counters.inodes_dropped += len(names)
            self._dropping = False
            await trio.sleep(0.02)  # let the kernel's FORGETs arrive before looking again

    def settled(self) -> bool:
        """Whether every drop check() asked for is done (none is pending or under way)."""
        return not self._over.is_set() and not self._dropping

    def _drop(self, names: list[Name]) -> None:
        with self._calling:
            for name in names:
                if self._stopping.is_set():
                    return
                try:
                    self._invalidate_entry(*name)
                except FileNotFoundError:
                    pass  # the kernel dropped it already
                except OSError as error:
                    log.debug("invalidate_entry%r: %s", tuple(name), error)

    async def stop(self) -> None:
        """No call into the kernel after this returns, unless one is held up in the
        kernel past STOP_WAIT_S (before the FUSE session closes)."""
        self._stopping.set()
        if await trio.to_thread.run_sync(self._calling.acquire, True, STOP_WAIT_S):
            self._calling.release()

    def statistics(self) -> InodeLimitStatistics:
        return replace(self.counters, inode_records_bytes=self._table.held * INODE_BYTES)
