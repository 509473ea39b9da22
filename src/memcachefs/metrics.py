"""Metric names in one place: the statistics snapshot `memcachefs stats` prints.

Every stateful component has a `statistics()` method returning a frozen
dataclass; this module flattens them into one dict with stable key names
(the JSON contract of `memcachefs stats --json`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Protocol


class HasStatistics(Protocol):
    def statistics(self) -> Any: ...


# Keys documented in the README; `stats --json` always carries at least these.
REQUIRED_KEYS = (
    "capacity_bytes",
    "used_bytes",
    "hits",
    "misses",
    "source_bytes",
    "evictions",
)

# Keys a mount with cluster options adds (see peers.py, README "Cluster").
CLUSTER_KEYS = (
    "peer_hits",
    "peer_bytes",
    "peer_fetches",
    "peer_errors_timeout",
    "peer_errors_refused",
    "peer_errors_closed",
    "peer_errors_auth",
    "peer_errors_checksum",
    "peer_errors_version",
    "peer_errors_protocol",
    "blocks_served_to_peers",
    "deduplicated_fills",
    "members",
)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


class StatisticsSnapshot:
    """Collects `statistics()` of the named components into one flat dict."""

    def __init__(self, started_at: float | None = None, **static: Any) -> None:
        self._components: dict[str, HasStatistics] = {}
        self._static = static
        self._started_at = time.monotonic() if started_at is None else started_at

    def add(self, prefix: str, component: HasStatistics) -> None:
        """Add a component; its fields appear as-is, or as `prefix_field` on a clash."""
        self._components[prefix] = component

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._static)
        for prefix, component in self._components.items():
            for field, value in dataclasses.asdict(component.statistics()).items():
                out[field if field not in out else f"{prefix}_{field}"] = value
        out["pid"] = os.getpid()
        out["rss_bytes"] = rss_bytes()
        out["uptime_s"] = round(time.monotonic() - self._started_at, 3)
        return out


def format_report(stats: dict[str, Any]) -> str:
    """A human-readable summary of a snapshot."""
    from memcachefs.config import format_size

    lookups = stats.get("hits", 0) + stats.get("misses", 0)
    hit_rate = f"{100 * stats['hits'] / lookups:.1f}%" if lookups else "-"
    lines = [
        f"mount       {stats.get('mountpoint', '?')}  (source {stats.get('source', '?')}, "
        f"pid {stats['pid']})",
        f"memory      {format_size(stats['used_bytes'])} used of "
        f"{format_size(stats['capacity_bytes'])} in {stats.get('blocks', 0)} blocks "
        f"(rss {format_size(stats['rss_bytes'])})",
        f"reads       {stats['hits']} hits, {stats['misses']} misses (hit rate {hit_rate})",
        f"bytes       {format_size(stats.get('memory_bytes', 0))} from memory, "
        f"{format_size(stats['source_bytes'])} from the source, "
        f"{format_size(stats.get('peer_bytes', 0))} from peers",
        f"evictions   {stats['evictions']}",
        f"fills       {stats.get('fills_in_flight', 0)} in flight, "
        f"{stats.get('deduplicated_fills', 0)} deduplicated, "
        f"{stats.get('readahead_fills', 0)} readahead",
        f"errors      {stats.get('source_errors', 0)} source, "
        f"{stats.get('stale_reads', 0)} stale, {stats.get('internal_errors', 0)} internal",
    ]
    if "page_cache_pushed_bytes" in stats:
        lines.append(
            f"page cache  {format_size(stats['page_cache_pushed_bytes'])} pushed on "
            f"{stats.get('page_cache_pushes', 0)} opens"
        )
    if "peer_fetches" in stats:
        lines += _cluster_report(stats)
    return "\n".join(lines)


def _cluster_report(stats: dict[str, Any]) -> list[str]:
    from memcachefs.config import format_size

    errors = ", ".join(
        f"{stats.get(f'peer_errors_{kind}', 0)} {kind}"
        for kind in ("timeout", "refused", "closed", "auth", "checksum", "version", "protocol")
    )
    return [
        f"peers       {stats.get('members', 0)} known, {stats.get('peers_down', 0)} down; "
        f"{stats.get('peer_hits', 0)} hits of {stats['peer_fetches']} asked "
        f"({format_size(stats.get('peer_bytes', 0))})",
        f"peer errors {errors}",
        f"served      {stats.get('blocks_served_to_peers', 0)} blocks "
        f"({format_size(stats.get('bytes_served_to_peers', 0))}) to peers, "
        f"{stats.get('peer_auth_failures', 0)} unauthenticated requests refused",
    ]
