"""Attributes and directory listings of the source, cached for a TTL.

A name that is not cached is always asked of the source, so a file added to the
source is visible by name at once; listings and attributes are refreshed once
their TTL has passed. If a refresh does not answer within `stale_grace_s` (a
stalled source) the previous answer is served, so metadata of known files stays
fast while the refresh continues in the background.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio
from cachetools import LRUCache

from memcachefs.metrics import counter, gauge
from memcachefs.singleflight import SingleFlight
from memcachefs.source import Source

V = TypeVar("V")
Listing = list[tuple[bytes, os.stat_result]]


@dataclass(frozen=True, slots=True)
class _Cached(Generic[V]):
    value: V
    fetched_at: float


@dataclass(frozen=True)
class MetadataStatistics:
    cached_attributes: int = gauge("attribute answers cached")
    cached_listings: int = gauge("directory listings cached")
    refreshes: int = counter("metadata answers fetched from the source")
    stale_answers: int = counter(
        "previous answers served because the source did not answer in time"
    )


class MetadataCache:
    def __init__(
        self,
        source: Source,
        nursery: trio.Nursery,
        *,
        ttl_s: float,
        stale_grace_s: float = 0.5,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._stale_grace_s = stale_grace_s
        self._clock = clock
        self._attrs: LRUCache[bytes, _Cached[os.stat_result]] = LRUCache(max_entries)
        self._listings: LRUCache[bytes, _Cached[Listing]] = LRUCache(max_entries // 100 + 1)
        self._attr_flight: SingleFlight[bytes, os.stat_result] = SingleFlight(nursery)
        self._list_flight: SingleFlight[bytes, Listing] = SingleFlight(nursery)
        self._refreshes = 0
        self._stale_answers = 0

    async def lstat(self, relpath: bytes) -> os.stat_result:
        return await self._lookup(self._attrs, self._attr_flight, relpath, self._fetch_attr)

    async def listdir(self, relpath: bytes) -> Listing:
        return await self._lookup(self._listings, self._list_flight, relpath, self._fetch_listing)

    @property
    def stale_grace_s(self) -> float:
        return self._stale_grace_s

    def last_known(self, relpath: bytes) -> os.stat_result | None:
        """The last answer for `relpath`, however old (no source access)."""
        cached = self._attrs.get(relpath)
        return None if cached is None else cached.value

    def remember(self, relpath: bytes, st: os.stat_result) -> None:
        """Record attributes learned elsewhere (an open's fstat) as fresh."""
        self._attrs[relpath] = _Cached(st, self._clock())

    def forget(self, relpath: bytes) -> None:
        self._attrs.pop(relpath, None)
        self._listings.pop(relpath, None)

    async def _lookup(
        self,
        cache: LRUCache[bytes, _Cached[V]],
        flight: SingleFlight[bytes, V],
        relpath: bytes,
        fetch: Callable[[bytes], Awaitable[V]],
    ) -> V:
        cached = cache.get(relpath)
        if cached is not None and self._clock() - cached.fetched_at < self._ttl_s:
            return cached.value
        if cached is None:
            return await flight.do(relpath, lambda: fetch(relpath))
        with trio.move_on_after(self._stale_grace_s):
            return await flight.do(relpath, lambda: fetch(relpath))
        self._stale_answers += 1
        return cached.value

    async def _fetch_attr(self, relpath: bytes) -> os.stat_result:
        self._refreshes += 1
        try:
            st = await self._source.lstat(relpath)
        except FileNotFoundError:
            self._attrs.pop(relpath, None)
            raise
        self._attrs[relpath] = _Cached(st, self._clock())
        return st

    async def _fetch_listing(self, relpath: bytes) -> Listing:
        self._refreshes += 1
        try:
            listing = await self._source.listdir(relpath)
        except FileNotFoundError:
            self._listings.pop(relpath, None)
            raise
        now = self._clock()
        self._listings[relpath] = _Cached(listing, now)
        prefix = relpath + b"/" if relpath else b""
        for name, st in listing:
            self._attrs[prefix + name] = _Cached(st, now)
        return listing

    def statistics(self) -> MetadataStatistics:
        return MetadataStatistics(
            cached_attributes=len(self._attrs),
            cached_listings=len(self._listings),
            refreshes=self._refreshes,
            stale_answers=self._stale_answers,
        )
