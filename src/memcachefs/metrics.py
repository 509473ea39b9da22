"""Every metric named once: its key, kind and help text, next to the component that counts it.

Each stateful component keeps one statistics object, a dataclass whose fields
are declared with `counter(help)` or `gauge(help)`, and increments its fields
in place (``self.counters.hits += 1``); its `statistics()` returns a copy with
the gauges filled in. `all_metrics()` collects the fields of every component's
class: that list is the contract of `memcachefs stats`, `stats --json`, the
stats xattr and Prometheus ``/metrics``, and the README's key tables are
tested against it. A key belongs to exactly one component.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Literal, Protocol

Kind = Literal["counter", "gauge"]


def counter(help: str) -> Any:
    """A field that only grows (since the mount)."""
    return dataclasses.field(default=0, metadata={"kind": "counter", "help": help})


def gauge(help: str) -> Any:
    """A field that says how things are now."""
    return dataclasses.field(default=0, metadata={"kind": "gauge", "help": help})


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    help: str


class HasStatistics(Protocol):
    def statistics(self) -> Any: ...


def metrics_of(statistics_class: type) -> list[Metric]:
    out = []
    for field in dataclasses.fields(statistics_class):
        if "kind" not in field.metadata:
            raise TypeError(f"{statistics_class.__name__}.{field.name} is not a counter or gauge")
        out.append(Metric(field.name, field.metadata["kind"], field.metadata["help"]))
    return out


# Keys every snapshot carries besides the components' (see StatisticsSnapshot).
PROCESS_METRICS = (
    Metric("pid", "gauge", "the daemon's process id"),
    Metric("rss_bytes", "gauge", "the daemon's resident memory"),
    Metric("uptime_s", "gauge", "seconds since the daemon started"),
)


def statistics_classes() -> dict[str, list[type]]:
    """The statistics classes of every component, by the part of a mount that has them:
    ``local`` (every mount; the page cache's unless --no-page-cache-push), ``cluster``
    (with cluster options) and ``peer_server`` (with --listen)."""
    from memcachefs import (
        blockstore,
        fs,
        handles,
        inodes,
        loader,
        membership,
        metadata,
        pagecache,
        prefetch,
        source,
        warm,
    )
    from memcachefs.peers import client, server

    return {
        "local": [
            blockstore.StoreStatistics,
            loader.LoaderStatistics,
            source.SourceStatistics,
            metadata.MetadataStatistics,
            handles.HandleStatistics,
            fs.FilesystemStatistics,
            inodes.InodeLimitStatistics,
            pagecache.PageCacheStatistics,
            prefetch.PrefetchStatistics,
            warm.WarmStatistics,
        ],
        "cluster": [membership.MembershipStatistics, client.PeerClientStatistics],
        "peer_server": [server.PeerServerStatistics],
    }


def metric_names(part: str) -> set[str]:
    """The keys a snapshot of a mount with `part` carries (see statistics_classes)."""
    return {metric.name for cls in statistics_classes()[part] for metric in metrics_of(cls)}


def all_metrics() -> dict[str, Metric]:
    """Every metric by key; TypeError if two components claim one key."""
    found: dict[str, Metric] = {metric.name: metric for metric in PROCESS_METRICS}
    for classes in statistics_classes().values():
        for statistics_class in classes:
            for metric in metrics_of(statistics_class):
                if metric.name in found:
                    raise TypeError(f"metric {metric.name!r} is declared twice")
                found[metric.name] = metric
    return found


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


class StatisticsSnapshot:
    """Collects `statistics()` of the components into one flat dict."""

    def __init__(self, started_at: float | None = None, **static: Any) -> None:
        self._components: list[HasStatistics] = []
        self._static = static
        self._started_at = time.monotonic() if started_at is None else started_at

    def add(self, component: HasStatistics) -> None:
        self._components.append(component)

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._static)
        for component in self._components:
            out.update(dataclasses.asdict(component.statistics()))
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
        f"errors      {stats.get('read_errors', 0)} source, "
        f"{stats.get('stale_reads', 0)} stale, {stats.get('internal_errors', 0)} internal",
    ]
    if "page_cache_pushed_bytes" in stats:
        lines.append(
            f"page cache  {format_size(stats['page_cache_pushed_bytes'])} pushed on "
            f"{stats.get('page_cache_pushes', 0)} opens"
        )
    if "prefetches" in stats:
        lines.append(
            f"prefetch    {stats['prefetches']} files, {stats.get('prefetch_fills', 0)} blocks "
            f"filled ahead, {stats.get('prefetch_errors', 0)} failed; readahead window "
            f"{stats.get('readahead_window_blocks', 0)} blocks "
            f"({stats.get('readahead_evicted_unread', 0)} evicted unread)"
        )
    if "peer_fetches" in stats:
        lines += _cluster_report(stats)
    return "\n".join(lines)


def _cluster_report(stats: dict[str, Any]) -> list[str]:
    from memcachefs.config import format_size

    errors = ", ".join(
        f"{value} {key.removeprefix('peer_errors_')}"
        for key, value in sorted(stats.items())
        if key.startswith("peer_errors_")
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
