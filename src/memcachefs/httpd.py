"""The operators' HTTP listener (``--http-address``): metrics, readiness, health, stats.

It serves no file data and takes no commands. Served by hypercorn's trio worker
(h11 parses the requests) in the daemon's nursery; every request is bounded by
deadlines (`http_config`) and its answers are built from snapshots, never
awaiting the source, so a slow or malformed client cannot reach the FUSE loop
or the peer server.

``GET /metrics``  Prometheus text format, generated from `metrics.all_metrics()`
                  by `SnapshotCollector` (no second list of names), plus the
                  latency histograms the measuring components own.
``GET /ready``    200 once `readiness()` says so, else 503; JSON either way.
``GET /healthz``  200 if a stat of the mountpoint from a worker thread answers
                  within HEALTH_DEADLINE_S (the FUSE loop answers), else 503.
``GET /stats``    the object `memcachefs stats --json` prints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memcachefs.errors import MountError
from memcachefs.metrics import all_metrics

log = logging.getLogger(__name__)

PREFIX = "memcachefs_"
HEALTH_DEADLINE_S = 2.0
REQUEST_READ_TIMEOUT_S = 5  # a client that sends nothing for this long is dropped
KEEP_ALIVE_TIMEOUT_S = 5.0
BACKLOG = 64
MAX_INCOMPLETE_BYTES = 8 * 1024  # a request head larger than this is refused

Readiness = Callable[[], tuple[bool, dict[str, Any]]]

# A key ending in _<kind> of one of these families is one labelled series of the family:
# peer_errors_timeout -> memcachefs_peer_errors_total{kind="timeout"}. Tier counters
# (memory_bytes, peer_bytes, source_bytes) keep their own names: they are not a family
# whose sum means anything the registry does not already count.
_LABELLED = re.compile(r"^(?P<family>peer_errors)_(?P<label>[a-z0-9_]+)$")


def metric_name(key: str, kind: str) -> str:
    """The Prometheus name of a registry key: ``_s`` -> ``_seconds``, counters end ``_total``."""
    name = PREFIX + key
    if name.endswith("_s"):
        name = name[: -len("_s")] + "_seconds"
    return name + "_total" if kind == "counter" else name


class SnapshotCollector(Collector):
    """One sample per key of a statistics snapshot, named and typed by the registry."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        registry = all_metrics()
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for key, metric in registry.items():
            value = stats.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            match = _LABELLED.match(key)
            if match is None:
                cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
                # Family names go without _total: the client library appends it.
                yield cls(metric_name(key, "gauge"), metric.help, value=value)
                continue
            family = match["family"]
            if family not in families:
                cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
                help_text = f"{family.replace('_', ' ')} by kind"
                families[family] = cls(PREFIX + family, help_text, labels=["kind"])
            families[family].add_metric([match["label"]], value)
        yield from families.values()


def build_registry(
    snapshot: Callable[[], dict[str, Any]], extra: tuple[Collector, ...] = ()
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    for collector in extra:
        registry.register(collector)
    return registry


def default_collectors() -> tuple[Collector, ...]:
    """The latency histograms owned by the components that measure them."""
    from memcachefs import source
    from memcachefs.peers import client

    return (source.SOURCE_READ_SECONDS, client.PEER_FETCH_SECONDS)


# -- the ASGI application -----------------------------------------------------------------
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class OperatorsApp:
    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        mountpoint: Path,
        readiness: Readiness,
        collectors: tuple[Collector, ...] = (),
    ) -> None:
        self._snapshot = snapshot
        self._mountpoint = mountpoint
        self._readiness = readiness
        self._registry = build_registry(snapshot, collectors)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await _reply(send, 405, b"only GET\n", "text/plain")
            return
        if path == "/metrics":
            body = generate_latest(self._registry)
            await _reply(send, 200, body, "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/stats":
            await _json(send, 200, self._snapshot())
        elif path == "/ready":
            ready, progress = self._readiness()
            await _json(send, 200 if ready else 503, {"ready": ready, **progress})
        elif path == "/healthz":
            healthy = await self._stat_answers()
            await _json(send, 200 if healthy else 503, {"healthy": healthy})
        else:
            await _reply(send, 404, b"not found\n", "text/plain")

    async def _stat_answers(self) -> bool:
        with trio.move_on_after(HEALTH_DEADLINE_S):
            try:
                # Abandoned on timeout: a hung loop must not hold the request.
                await trio.to_thread.run_sync(os.stat, self._mountpoint, abandon_on_cancel=True)
            except OSError:
                return False
            return True
        return False


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _json(send: Send, status: int, data: dict[str, Any]) -> None:
    body = (json.dumps(data, sort_keys=True) + "\n").encode()
    await _reply(send, status, body, "application/json")


async def _reply(send: Send, status: int, body: bytes, content_type: str) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def open_http_socket(address: tuple[str, int]) -> socket.socket:
    """The listening socket, bound before the mount; MountError (one line) if it cannot be."""
    host, port = address
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise MountError(f"cannot serve HTTP on {host}:{port}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        raise MountError(f"cannot serve HTTP on {host}:{port}: {error.strerror or error}") from None
    return sock


def http_config(sock: socket.socket) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the descriptor from here
    config.backlog = BACKLOG
    config.read_timeout = REQUEST_READ_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.h11_max_incomplete_size = MAX_INCOMPLETE_BYTES
    config.accesslog = None
    config.errorlog = logging.getLogger("memcachefs.http")
    config.graceful_timeout = 0.5
    return config


async def serve_http(
    app: OperatorsApp,
    sock: socket.socket,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on the listening `sock` (see open_http_socket) until `stop` is set."""
    from hypercorn.trio import serve

    await serve(
        app,  # type: ignore[arg-type]
        http_config(sock),
        shutdown_trigger=stop.wait,
        task_status=task_status,
    )
