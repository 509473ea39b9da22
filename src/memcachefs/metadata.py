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
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from memcachefs.metrics import counter, gauge
from memcachefs.singleflight import SingleFlight
from memcachefs.source import Listing, ListingTooLarge, Source, unchanged

V = TypeVar("V")

# Estimated bytes each cached item costs (object headers, the LRU's links, the key).
ATTRIBUTE_BYTES = 420
LISTED_ENTRY_BYTES = 300  # its tuple, the name's header, compact attributes, a slot
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
    __slots__ = ("chunks_checked_at", "fetched_at", "size", "value", "xattrs")

    def __init__(self, value: Any, fetched_at: float, size: int) -> None:
        self.value = value
        self.fetched_at = fetched_at
        self.size = size
        self.xattrs: _Xattrs | None = None
        # Of a listing: when a chunk's attributes were confirmed after fetched_at.
        self.chunks_checked_at: dict[int, float] | None = None

    def listed_at(self, index: int) -> float:
        """When the attributes of entry `index` of this listing were last confirmed."""
        checked = self.chunks_checked_at
        if checked is None:
            return self.fetched_at
        return checked.get(index // XATTR_CHUNK, self.fetched_at)


# An entry of a cached listing: (directory, the listing, the entry's index in it).
_Listed = tuple[bytes, _Cached, int]


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether the xattrs known for `a` still hold for `b` (nothing changed its ctime)."""
    return (a.st_ctime_ns, a.st_mtime_ns, a.st_size, a.st_mode) == (
        b.st_ctime_ns,
        b.st_mtime_ns,
        b.st_size,
        b.st_mode,
    )


def _kind(key: bytes, item: _Cached) -> str:
    if not key.startswith(_LISTING_KEY):
        return "attributes"
    return "too large" if item.value is None else "listing"


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

    def tally(self, kind: Callable[[bytes, _Cached], str]) -> Counter[str]:
        """How many items there are of each `kind` (one pass)."""
        return Counter(kind(key, item) for key, item in self._items.items())


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
        st, _ = await self._attributes(relpath)
        return st

    async def _attributes(self, relpath: bytes) -> tuple[os.stat_result, float]:
        """The attributes of `relpath` and when the source gave them."""
        known = self._newest(relpath)
        if known is not None and self._clock() - known[1] < self._ttl_s:
            return known
        # An entry of a cached listing, stale: refreshed with its chunk (single-flight),
        # so a sweep of a directory slower than the TTL asks the source once per chunk,
        # not once per entry.
        listed = self._listed(relpath)
        if listed is not None and known is not None:
            head, listing, index = listed
            number = index // XATTR_CHUNK
            fetch = functools.partial(self._fetch_attr_chunk, head, listing, number)
            if await self._ask(("attr-chunk", head, number), fetch, True) is None:
                self._stale_answers += 1
                return known
            fresh = self._newest(relpath)
            if fresh is not None and self._clock() - fresh[1] < self._ttl_s:
                return fresh
        # Not listed, or gone from its chunk: asked alone.
        cached = await self._lookup(relpath, relpath, self._fetch_attr)
        return cached.value, cached.fetched_at

    def _newest(self, relpath: bytes) -> tuple[os.stat_result, float] | None:
        """The newest answer for `relpath`, however old: its own, or its listing's.

        The entries of a listing are answered from the listing itself: a listed
        directory of 100,000 files costs no attribute record per file.
        """
        cached = self._cache.get(relpath)
        known = None if cached is None else (cached.value, cached.fetched_at)
        listed = self._listed(relpath)
        if listed is not None:
            _, listing, index = listed
            listed_at = listing.listed_at(index)
            if known is None or listed_at > known[1]:
                known = (listing.value[index][1], listed_at)
        return known

    def _listed(self, relpath: bytes) -> _Listed | None:
        """Where `relpath` is in its directory's cached listing, if it is listed."""
        if not relpath:
            return None
        head, _, name = relpath.rpartition(b"/")
        listing = self._cache.get(_LISTING_KEY + head)  # in use: the last to be evicted
        if listing is None or listing.value is None:  # not cached, or too large
            return None
        index = bisect.bisect_left(listing.value, name, key=lambda entry: entry[0])
        if index < len(listing.value) and listing.value[index][0] == name:
            return head, listing, index
        return None

    async def _fetch_attr_chunk(self, head: bytes, listing: _Cached, chunk: int) -> bool:
        self._refreshes += 1
        entries = listing.value[chunk * XATTR_CHUNK : (chunk + 1) * XATTR_CHUNK]
        found = await self._source.lstat_many(head, [name for name, _ in entries])
        now, prefix = self._clock(), head + b"/" if head else b""
        complete = None not in found
        for (name, listed), st in zip(entries, found, strict=True):
            relpath = prefix + name
            if st is None:
                self._cache.pop(relpath)
            elif not complete or not unchanged(listed, st) or self._cache.peek(relpath):
                self._store_attr(relpath, st, now)
        if complete:  # the listing's entries of this chunk hold: confirmed as they are
            if listing.chunks_checked_at is None:
                listing.chunks_checked_at = {}
            listing.chunks_checked_at[chunk] = now
        return True

    async def listdir(self, relpath: bytes) -> Listing | None:
        """The directory's entries sorted by name (the same list for every caller);
        None for a directory with more entries than the budget holds (stream it)."""
        key = _LISTING_KEY + relpath
        cached = await self._lookup(key, key, lambda _: self._fetch_listing(relpath))
        return cached.value  # type: ignore[no-any-return]

    def last_known(self, relpath: bytes) -> os.stat_result | None:
        """The last answer for `relpath`, however old (no source access)."""
        known = self._newest(relpath)
        return None if known is None else known[0]

    def remember(self, relpath: bytes, st: os.stat_result) -> None:
        """Record attributes learned elsewhere (an open's fstat) as fresh."""
        self._store_attr(relpath, st, self._clock())

    def forget(self, relpath: bytes) -> None:
        """Ask the source again about `relpath` (and its listing, if a directory)."""
        self._cache.pop(relpath)
        self._cache.pop(_LISTING_KEY + relpath)
        listed = self._listed(relpath)
        if listed is not None:  # its listing's entry is no answer either
            _, listing, index = listed
            if listing.chunks_checked_at is None:
                listing.chunks_checked_at = {}
            listing.chunks_checked_at[index // XATTR_CHUNK] = -math.inf

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
        cached = await self._record(relpath)
        if cached.xattrs is not None:
            return cached.xattrs
        listed = self._listed(relpath)
        if listed is not None:
            head, listing, index = listed
            number = index // XATTR_CHUNK
            await self._ask(
                ("xattr-chunk", head, number),
                lambda: self._fetch_xattr_chunk(head, listing, number),
                False,
            )
            chunked = self._cache.peek(relpath)
            if chunked is not None and chunked.xattrs is not None:
                return chunked.xattrs
        names = await self._ask(("xattr-names", relpath), lambda: self._fetch_names(relpath), False)
        assert isinstance(names, tuple)
        xattrs = _Xattrs(names) if names else _NO_XATTRS
        self._attach(relpath, xattrs)
        return xattrs

    async def _record(self, relpath: bytes) -> _Cached:
        """The attribute record of `relpath`, fresh: the one xattrs are kept with."""
        st, fetched_at = await self._attributes(relpath)
        cached = self._cache.peek(relpath)
        if cached is None or cached.value is not st:  # answered from its listing
            cached = self._store_attr(relpath, st, fetched_at)
        return cached

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
        with trio.move_on_after(self._grace_left_s(flight_key)):
            return await self._flight.do(flight_key, lambda: fetch(key))  # type: ignore[no-any-return]
        self._stale_answers += 1
        return cached

    async def _ask(
        self, key: object, fetch: Callable[[], Awaitable[V]], has_fallback: bool
    ) -> V | None:
        """The answer of the one `fetch` for `key`; None after the grace period if
        `has_fallback`, else EIO after `unanswered_timeout_s`."""
        limit = self._grace_left_s(key) if has_fallback else self._unanswered_timeout_s
        with trio.move_on_after(limit):
            return await self._flight.do(key, fetch)  # type: ignore[no-any-return]
        if has_fallback:
            return None
        self._unanswered_timeouts += 1
        raise OSError(errno.EIO, "the source did not answer in time")

    def _grace_left_s(self, key: object) -> float:
        """The grace counts from the start of the refresh, not of each request: once a
        refresh has stalled past it, every request for that key is answered at once
        (a walk of /a/b/c otherwise paid the grace again at every component)."""
        return max(0.0, self._stale_grace_s - self._flight.running_for_s(key))

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
        most = (self._cache.budget_bytes - LISTING_BYTES) // LISTED_ENTRY_BYTES
        try:  # the entries of `previous` that did not change are kept as they are
            listing: Listing | None = await self._source.listdir(relpath, previous, most)
        except FileNotFoundError:
            self._cache.pop(key)
            raise
        except ListingTooLarge:
            listing = None  # remembered as such for the TTL (no scan up to `most` each time)
        now = self._clock()
        size = LISTING_BYTES + sum(len(name) + LISTED_ENTRY_BYTES for name, _ in listing or ())
        item = _Cached(listing, now, size)
        self._cache.put(key, item)  # its entries' attributes: newer than their own records
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

    async def _fetch_xattr_chunk(self, head: bytes, listing: _Cached, chunk: int) -> None:
        start = chunk * XATTR_CHUNK
        prefix = head + b"/" if head else b""
        wanted = []
        for index, (name, st) in enumerate(listing.value[start : start + XATTR_CHUNK], start):
            cached = self._cache.peek(prefix + name)
            if cached is None:
                cached = self._store_attr(prefix + name, st, listing.listed_at(index))
            if cached.xattrs is None and _same_file(cached.value, st):
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
        kinds = self._cache.tally(_kind)
        return MetadataStatistics(
            cached_attributes=kinds["attributes"],
            cached_listings=kinds["listing"],  # not those remembered as too large
            metadata_cache_bytes=self._cache.used_bytes,
            metadata_cache_budget_bytes=self._cache.budget_bytes,
            metadata_evictions=self._cache.evictions,
            refreshes=self._refreshes,
            stale_answers=self._stale_answers,
            xattr_answers=self._xattr_answers,
            xattr_source_calls=self._xattr_source_calls,
            unanswered_timeouts=self._unanswered_timeouts,
        )
