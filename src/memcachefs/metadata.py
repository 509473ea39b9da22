"""Attributes, directory listings, extended attributes and statfs of the source, cached.

A name that is not cached is always asked of the source, so a file added to the
source is visible by name at once; listings, attributes and the filesystem's
statistics are refreshed once their TTL has passed. If a refresh does not
answer within `stale_grace_s` (a stalled source) the previous answer is
served, so metadata of known files stays fast while the refresh continues in
the background (one refresh per key at a time).

Extended attributes are cached with a file's attributes, negative answers
(ENODATA) included, and stay valid while its attributes show the same change
time, size and mtime (setting or removing an xattr changes the ctime). The
first xattr question about an entry of a listed directory asks the source for
the xattr names of a whole chunk of that listing in one worker call, so `ls -l`
of a large directory does not ask the source once per entry and name; likewise,
attributes of an entry of a cached listing are refreshed with those of its
chunk, in one worker call, so a sweep that outlasts the TTL refreshes the
directory chunk by chunk instead of entry by entry. A
question that has no previous answer to fall back on and that the source does
not answer within `unanswered_timeout_s` fails with EIO instead of hanging.

Memory: everything is held in one LRU with an estimated byte budget
(`budget_bytes`); a listing is stored sorted, once, and shared by every open
handle of its directory.
"""

from __future__ import annotations

import bisect
import errno
import functools
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from memcachefs.metrics import counter, gauge
from memcachefs.singleflight import SingleFlight
from memcachefs.source import Listing, Source

V = TypeVar("V")

# Estimated bytes each cached item costs (object headers, the LRU's links, the key).
ATTRIBUTE_BYTES = 420
LISTED_ENTRY_BYTES = 120
LISTING_BYTES = 200
XATTR_NAMES_BYTES = 100
XATTR_CHUNK = 256  # entries of a listing whose xattr names (or attributes) are fetched together

# Namespaces whose listxattr is complete: a name not listed there has no value.
_LISTED_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.posix_acl_")
_LISTING_KEY = b"\0"  # prefix of a listing's key (no path holds a NUL)
_NO_DATA = object()


class _Xattrs:
    """A file's xattr names and the values (or ENODATA) asked so far."""

    __slots__ = ("names", "values")

    def __init__(self, names: tuple[bytes, ...]) -> None:
        self.names = names
        self.values: dict[bytes, object] = {}

    def knows(self, name: bytes) -> bool:
        return name in self.values or (
            name not in self.names and name.startswith(_LISTED_NAMESPACES)
        )

    def answer(self, name: bytes) -> bytes:
        value = self.values.get(name, _NO_DATA)
        if value is _NO_DATA:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        assert isinstance(value, bytes)
        return value

    def size(self) -> int:
        return (
            XATTR_NAMES_BYTES
            + sum(
                len(k) + (len(v) if isinstance(v, bytes) else 0) + 80
                for k, v in self.values.items()
            )
            + sum(len(name) + 40 for name in self.names)
        )


_NO_XATTRS = _Xattrs(())  # shared by every file without xattrs; never written


class _Cached:
    __slots__ = ("fetched_at", "size", "value", "xattrs")

    def __init__(self, value: Any, fetched_at: float, size: int) -> None:
        self.value = value
        self.fetched_at = fetched_at
        self.size = size
        self.xattrs: _Xattrs | None = None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether the xattrs known for `a` still hold for `b` (nothing changed its ctime)."""
    return (a.st_ctime_ns, a.st_mtime_ns, a.st_size, a.st_mode) == (
        b.st_ctime_ns,
        b.st_mtime_ns,
        b.st_size,
        b.st_mode,
    )


class _ByteLRU:
    """An LRU mapping bounded by the estimated bytes of its values; counts evictions."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._items: OrderedDict[bytes, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> _Cached | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def peek(self, key: bytes) -> _Cached | None:
        return self._items.get(key)

    def put(self, key: bytes, item: _Cached) -> None:
        self.pop(key)
        if item.size > self.budget_bytes:
            return
        self._items[key] = item
        self.used_bytes += item.size
        while self.used_bytes > self.budget_bytes:
            _, evicted = self._items.popitem(last=False)
            self.used_bytes -= evicted.size
            self.evictions += 1

    def resize(self, key: bytes, item: _Cached, size: int) -> None:
        if self._items.get(key) is item:
            self.used_bytes += size - item.size
        item.size = size

    def pop(self, key: bytes) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.used_bytes -= item.size

    def count(self, predicate: Callable[[bytes], bool]) -> int:
        return sum(1 for key in self._items if predicate(key))


@dataclass(frozen=True)
class MetadataStatistics:
    cached_attributes: int = gauge("attribute answers cached")
    cached_listings: int = gauge("directory listings cached")
    metadata_cache_bytes: int = gauge("estimated bytes of cached attributes, listings, xattrs")
    metadata_cache_budget_bytes: int = gauge("the budget of the metadata cache (--metadata-cache)")
    metadata_evictions: int = counter("metadata entries evicted for the budget")
    refreshes: int = counter("metadata answers fetched from the source")
    stale_answers: int = counter(
        "previous answers served because the source did not answer in time"
    )
    xattr_answers: int = counter("xattr requests answered from the cache")
    xattr_source_calls: int = counter("xattr calls made to the source")
    unanswered_timeouts: int = counter(
        "metadata requests failed with EIO after --metadata-timeout (nothing known)"
    )


class MetadataCache:
    def __init__(
        self,
        source: Source,
        nursery: trio.Nursery,
        *,
        ttl_s: float,
        stale_grace_s: float = 0.5,
        budget_bytes: int = 64 * 1024 * 1024,
        unanswered_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._stale_grace_s = stale_grace_s
        self._unanswered_timeout_s = unanswered_timeout_s
        self._clock = clock
        self._cache = _ByteLRU(budget_bytes)
        self._statfs: _Cached | None = None
        self._flight: SingleFlight[Any, Any] = SingleFlight(nursery)
        self._refreshes = 0
        self._stale_answers = 0
        self._xattr_answers = 0
        self._xattr_source_calls = 0
        self._unanswered_timeouts = 0

    @property
    def stale_grace_s(self) -> float:
        return self._stale_grace_s

    # -- attributes and listings ---------------------------------------------------
    async def lstat(self, relpath: bytes) -> os.stat_result:
        cached = self._cache.get(relpath)
        if cached is not None and self._clock() - cached.fetched_at < self._ttl_s:
            return cached.value  # type: ignore[no-any-return]
        # An entry of a cached listing, stale or evicted for the budget: refreshed with
        # its chunk (single-flight), so a sweep of a directory larger than the budget
        # or slower than the TTL asks the source once per chunk, not once per entry.
        chunk = self._listed_chunk(relpath)
        if chunk is not None:
            head, listing, number = chunk
            fetch = functools.partial(self._fetch_attr_chunk, head, listing, number)
            key = ("attr-chunk", head, number)
            if cached is None:
                await self._flight.do(key, fetch)
            elif await self._ask(key, fetch, True) is None:
                self._stale_answers += 1
                return cached.value  # type: ignore[no-any-return]
            fresh = self._cache.get(relpath)
            if fresh is not None and self._clock() - fresh.fetched_at < self._ttl_s:
                return fresh.value  # type: ignore[no-any-return]
        # Not listed, or gone from its chunk: asked alone.
        cached = await self._lookup(relpath, relpath, self._fetch_attr)
        return cached.value  # type: ignore[no-any-return]

    def _listed_chunk(self, relpath: bytes) -> tuple[bytes, Listing, int] | None:
        """(directory, its cached listing, the chunk number of `relpath` in it), if listed."""
        if not relpath:
            return None
        head, _, name = relpath.rpartition(b"/")
        listing = self._cache.get(_LISTING_KEY + head)  # in use: the last to be evicted
        if listing is None:
            return None
        index = bisect.bisect_left(listing.value, name, key=lambda entry: entry[0])
        if index < len(listing.value) and listing.value[index][0] == name:
            return head, listing.value, index // XATTR_CHUNK
        return None

    async def _fetch_attr_chunk(self, head: bytes, listing: Listing, chunk: int) -> bool:
        self._refreshes += 1
        names = [name for name, _ in listing[chunk * XATTR_CHUNK : (chunk + 1) * XATTR_CHUNK]]
        found = await self._source.lstat_many(head, names)
        now, prefix = self._clock(), head + b"/" if head else b""
        for name, st in zip(names, found, strict=True):
            if st is None:
                self._cache.pop(prefix + name)
            else:
                self._store_attr(prefix + name, st, now)
        return True

    async def listdir(self, relpath: bytes) -> Listing:
        """The directory's entries sorted by name (the same list for every caller)."""
        key = _LISTING_KEY + relpath
        cached = await self._lookup(key, key, lambda _: self._fetch_listing(relpath))
        return cached.value  # type: ignore[no-any-return]

    def last_known(self, relpath: bytes) -> os.stat_result | None:
        """The last answer for `relpath`, however old (no source access)."""
        cached = self._cache.peek(relpath)
        return None if cached is None else cached.value

    def remember(self, relpath: bytes, st: os.stat_result) -> None:
        """Record attributes learned elsewhere (an open's fstat) as fresh."""
        self._store_attr(relpath, st, self._clock())

    def forget(self, relpath: bytes) -> None:
        self._cache.pop(relpath)
        self._cache.pop(_LISTING_KEY + relpath)

    async def statvfs(self) -> os.statvfs_result:
        """The source filesystem's statistics (cached for the TTL, stale on a stall)."""
        cached = self._statfs
        if cached is not None and self._clock() - cached.fetched_at < self._ttl_s:
            return cached.value  # type: ignore[no-any-return]
        fresh = await self._ask(b"statfs", self._fetch_statfs, cached is not None)
        if fresh is None:
            assert cached is not None
            self._stale_answers += 1
            return cached.value  # type: ignore[no-any-return]
        return fresh

    # -- extended attributes ---------------------------------------------------------
    async def getxattr(self, relpath: bytes, name: bytes) -> bytes:
        """The value of xattr `name`; OSError(ENODATA) if the file has none of that name."""
        xattrs = await self._xattrs(relpath)
        if xattrs.knows(name):
            self._xattr_answers += 1
            return xattrs.answer(name)
        value = await self._ask(
            ("xattr", relpath, name), lambda: self._fetch_xattr(relpath, name), False
        )
        assert isinstance(value, bytes)
        return value

    async def listxattr(self, relpath: bytes) -> list[bytes]:
        xattrs = await self._xattrs(relpath)
        self._xattr_answers += 1
        return list(xattrs.names)

    async def _xattrs(self, relpath: bytes) -> _Xattrs:
        await self.lstat(relpath)
        cached = self._cache.peek(relpath)
        if cached is not None and cached.xattrs is not None:
            return cached.xattrs
        chunk = self._listed_chunk(relpath)
        if chunk is not None:
            head, listing, number = chunk
            await self._ask(
                ("xattr-chunk", head, number),
                lambda: self._fetch_xattr_chunk(head, listing, number),
                False,
            )
            cached = self._cache.peek(relpath)
            if cached is not None and cached.xattrs is not None:
                return cached.xattrs
        names = await self._ask(("xattr-names", relpath), lambda: self._fetch_names(relpath), False)
        assert isinstance(names, tuple)
        xattrs = _Xattrs(names) if names else _NO_XATTRS
        self._attach(relpath, xattrs)
        return xattrs

    def _attach(self, relpath: bytes, xattrs: _Xattrs) -> None:
        cached = self._cache.peek(relpath)
        if cached is not None:
            cached.xattrs = xattrs
            if xattrs is not _NO_XATTRS:
                self._cache.resize(relpath, cached, ATTRIBUTE_BYTES + len(relpath) + xattrs.size())

    # -- the source, single-flight, with deadlines --------------------------------------
    async def _lookup(
        self, key: bytes, flight_key: bytes, fetch: Callable[[bytes], Awaitable[_Cached]]
    ) -> _Cached:
        cached = self._cache.get(key)
        if cached is not None and self._clock() - cached.fetched_at < self._ttl_s:
            return cached
        if cached is None:
            return await self._flight.do(flight_key, lambda: fetch(key))  # type: ignore[no-any-return]
        with trio.move_on_after(self._stale_grace_s):
            return await self._flight.do(flight_key, lambda: fetch(key))  # type: ignore[no-any-return]
        self._stale_answers += 1
        return cached

    async def _ask(
        self, key: object, fetch: Callable[[], Awaitable[V]], has_fallback: bool
    ) -> V | None:
        """The answer of the one `fetch` for `key`; None after the grace period if
        `has_fallback`, else EIO after `unanswered_timeout_s`."""
        limit = self._stale_grace_s if has_fallback else self._unanswered_timeout_s
        with trio.move_on_after(limit):
            return await self._flight.do(key, fetch)  # type: ignore[no-any-return]
        if has_fallback:
            return None
        self._unanswered_timeouts += 1
        raise OSError(errno.EIO, "the source did not answer in time")

    async def _fetch_attr(self, relpath: bytes) -> _Cached:
        self._refreshes += 1
        try:
            st = await self._source.lstat(relpath)
        except FileNotFoundError:
            self._cache.pop(relpath)
            raise
        return self._store_attr(relpath, st, self._clock())

    def _store_attr(self, relpath: bytes, st: os.stat_result, now: float) -> _Cached:
        old = self._cache.peek(relpath)
        item = _Cached(st, now, ATTRIBUTE_BYTES + len(relpath))
        if old is not None and old.xattrs is not None and _same_file(old.value, st):
            item.xattrs = old.xattrs
            if old.xattrs is not _NO_XATTRS:
                item.size += old.xattrs.size()
        self._cache.put(relpath, item)
        return item

    async def _fetch_listing(self, relpath: bytes) -> _Cached:
        self._refreshes += 1
        key = _LISTING_KEY + relpath
        cached = self._cache.peek(key)
        previous: Listing | None = None if cached is None else cached.value
        try:  # the entries of `previous` that did not change are kept as they are
            listing = await self._source.listdir(relpath, previous)
        except FileNotFoundError:
            self._cache.pop(key)
            raise
        now = self._clock()
        size = LISTING_BYTES + sum(len(name) + LISTED_ENTRY_BYTES for name, _ in listing)
        item = _Cached(listing, now, size)
        prefix = relpath + b"/" if relpath else b""
        for name, st in listing:
            cached = self._cache.get(prefix + name)
            if cached is not None and cached.value is st:  # unchanged since the last scan
                cached.fetched_at = now
            else:
                self._store_attr(prefix + name, st, now)
        # Stored after its entries: a directory with more entries than the budget holds
        # evicts its first entries' attributes, not its listing (its chunks need it).
        self._cache.put(key, item)
        return item

    async def _fetch_statfs(self) -> os.statvfs_result:
        vfs = await self._source.statvfs()
        self._statfs = _Cached(vfs, self._clock(), 0)
        return vfs

    async def _fetch_names(self, relpath: bytes) -> tuple[bytes, ...]:
        self._xattr_source_calls += 1
        try:
            names = await self._source.listxattr(relpath)
        except OSError as error:
            if error.errno not in (errno.ENOTSUP, errno.ENODATA):
                raise
            names = []
        return tuple(os.fsencode(name) for name in names)

    async def _fetch_xattr_chunk(self, head: bytes, listing: Listing, chunk: int) -> None:
        entries = listing[chunk * XATTR_CHUNK : (chunk + 1) * XATTR_CHUNK]
        prefix = head + b"/" if head else b""
        wanted = []
        for name, st in entries:
            cached = self._cache.peek(prefix + name)
            if cached is not None and cached.xattrs is None and _same_file(cached.value, st):
                wanted.append(name)
        if not wanted:
            return
        self._xattr_source_calls += 1
        found = await self._source.listxattr_many(head, wanted)
        for name, names in zip(wanted, found, strict=True):
            if names is not None:
                self._attach(prefix + name, _Xattrs(names) if names else _NO_XATTRS)

    async def _fetch_xattr(self, relpath: bytes, name: bytes) -> bytes:
        self._xattr_source_calls += 1
        cached = self._cache.peek(relpath)
        try:
            value = await self._source.getxattr(relpath, name)
        except OSError as error:
            if error.errno in (errno.ENODATA, errno.ENOTSUP) and cached is not None:
                self._remember_xattr(relpath, cached, name, _NO_DATA)
            raise
        if cached is not None:
            self._remember_xattr(relpath, cached, name, value)
        return value

    def _remember_xattr(self, relpath: bytes, cached: _Cached, name: bytes, value: object) -> None:
        xattrs = cached.xattrs
        if xattrs is None or self._cache.peek(relpath) is not cached:
            return
        if xattrs is _NO_XATTRS:
            xattrs = _Xattrs(())
            cached.xattrs = xattrs
        if value is not _NO_DATA:
            xattrs.values[name] = value
        elif name in xattrs.names:
            xattrs.values[name] = _NO_DATA
        else:
            return  # an unlisted name: not remembered (another namespace may answer later)
        self._cache.resize(relpath, cached, ATTRIBUTE_BYTES + len(relpath) + xattrs.size())

    def statistics(self) -> MetadataStatistics:
        listings = self._cache.count(lambda key: key.startswith(_LISTING_KEY))
        return MetadataStatistics(
            cached_attributes=len(self._cache) - listings,
            cached_listings=listings,
            metadata_cache_bytes=self._cache.used_bytes,
            metadata_cache_budget_bytes=self._cache.budget_bytes,
            metadata_evictions=self._cache.evictions,
            refreshes=self._refreshes,
            stale_answers=self._stale_answers,
            xattr_answers=self._xattr_answers,
            xattr_source_calls=self._xattr_source_calls,
            unanswered_timeouts=self._unanswered_timeouts,
        )
