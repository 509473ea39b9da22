"""Builds the service in one nursery, mounts it, and stops it in order.

Shutdown order (SIGTERM/SIGINT): stop taking new work where we can, let the
requests in flight finish (bounded by the grace period), end the FUSE loop,
unmount, then cancel the background tasks (fills, refreshes, peers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
from collections.abc import Callable

import pyfuse3
import trio

from memcachefs import mounts
from memcachefs.blockstore import BlockStore
from memcachefs.config import ClusterConfig, MountConfig
from memcachefs.errors import MemcachefsError, MountError
from memcachefs.fs import Filesystem
from memcachefs.loader import Loader
from memcachefs.membership import Membership
from memcachefs.metadata import MetadataCache
from memcachefs.metrics import HasStatistics, StatisticsSnapshot
from memcachefs.peers import PeerClient, PeerServer
from memcachefs.source import Source

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from <malloc.h>


def fuse_options(config: MountConfig) -> set[str]:
    options = {"fsname=memcachefs", "subtype=memcachefs", "ro", "nosuid", "nodev"}
    options.add("default_permissions")
    if config.allow_other:
        options.add("allow_other")
    return options


def pin_malloc_mmap_threshold() -> None:
    """Keep glibc from serving block-sized buffers out of its heap.

    glibc raises its mmap threshold after large frees, after which freed block
    buffers stay in fragmented heaps and RSS drifts above the budget. A fixed
    threshold (the same as MALLOC_MMAP_THRESHOLD_=131072) returns them to the
    kernel at once.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; RSS may exceed the cache budget more")


async def serve(config: MountConfig, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount and serve until unmounted or signalled. Raises MountError if it cannot mount."""
    try:
        await _serve(config, on_ready)
    except BaseExceptionGroup as group:
        # The nursery wraps a failure to mount in a group; callers want the error itself.
        errors = group.exceptions
        if len(errors) == 1 and isinstance(errors[0], MemcachefsError):
            raise errors[0] from None
        raise


async def _serve(config: MountConfig, on_ready: Callable[[], None]) -> None:
    pin_malloc_mmap_threshold()
    cache = config.cache
    cluster = config.cluster
    # Bound before anything else: a busy peer port is a clear error and nothing is mounted.
    listeners = await open_peer_listeners(cluster)
    try:
        with Source(
            config.source,
            block_threads=cache.source_threads,
            metadata_threads=cache.metadata_threads,
        ) as source:
            store = BlockStore(cache.capacity_bytes, cache.block_size_bytes)
            async with trio.open_nursery() as nursery:
                metadata = MetadataCache(
                    source,
                    nursery,
                    ttl_s=config.attr_timeout_s,
                    budget_bytes=cache.metadata_cache_bytes,
                    unanswered_timeout_s=cache.metadata_timeout_s,
                )
                loader = Loader(store, source, nursery, read_ahead_blocks=cache.read_ahead_blocks)
                statistics = StatisticsSnapshot(
                    mountpoint=str(config.mountpoint),
                    source=str(config.source),
                    block_size_bytes=cache.block_size_bytes,
                )
                fs = Filesystem(
                    source,
                    metadata,
                    loader,
                    attr_timeout_s=config.attr_timeout_s,
                    statistics=statistics,
                    nursery=nursery,
                    push_page_cache=cache.push_page_cache,
                )
                components: list[tuple[str, HasStatistics]] = [
                    ("store", store),
                    ("loader", loader),
                    ("source", source),
                    ("metadata", metadata),
                    ("fs", fs),
                    *([("page_cache", fs.pusher)] if fs.pusher is not None else []),
                ]
                peer_server, client = await _start_cluster(
                    cluster, loader, listeners, nursery, components
                )
                for name, component in components:
                    statistics.add(name, component)
                _mount(fs, config)
                try:
                    nursery.start_soon(_announce_ready, config, on_ready)
                    nursery.start_soon(_stop_on_signal, fs, config.shutdown_grace_s, peer_server)
                    await pyfuse3.main()
                finally:
                    if fs.pusher is not None:
                        # No thread may store pages once the FUSE session is closed.
                        with trio.CancelScope(shield=True):
                            await fs.pusher.stop_all()
                    still_mounted = mounts.find_mount(config.mountpoint) is not None
                    pyfuse3.close(unmount=still_mounted)
                    nursery.cancel_scope.cancel()
                    if client is not None:
                        client.close()
    finally:
        for listener in listeners:
            listener.socket.close()
    log.info("unmounted %s", config.mountpoint)


async def open_peer_listeners(cluster: ClusterConfig) -> list[trio.SocketListener]:
    """Listeners on the --listen address; MountError (one line) if it cannot be bound."""
    if cluster.listen is None:
        return []
    host, port = cluster.listen
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        raise MountError(
            f"cannot listen for peers on {host}:{port}: {error.strerror or error}"
        ) from None


async def _start_cluster(
    cluster: ClusterConfig,
    loader: Loader,
    listeners: list[trio.SocketListener],
    nursery: trio.Nursery,
    components: list[tuple[str, HasStatistics]],
) -> tuple[PeerServer | None, PeerClient | None]:
    """Membership, the peer client (wired into the loader) and the peer server."""
    if not cluster.enabled:
        return None, None
    secret = cluster.secret or b""
    membership = Membership(cluster)
    await nursery.start(membership.run)
    client = PeerClient(
        membership,
        block_size=loader.block_size,
        secret=secret,
        timeout_s=cluster.peer_timeout_s,
    )
    loader.set_peers(client)
    components += [("membership", membership), ("peers", client)]
    server = None
    if listeners:
        server = PeerServer(loader, listeners, secret=secret, timeout_s=cluster.peer_timeout_s)
        await nursery.start(server.run)
        components.append(("peer_server", server))
        log.info(
            "serving peers on %s (%s)",
            ", ".join(f"{host}:{port}" for host, port in server.addresses),
            "authenticated" if cluster.secret else "loopback, no secret",
        )
    return server, client


def _mount(fs: Filesystem, config: MountConfig) -> None:
    try:
        pyfuse3.init(fs, os.fspath(config.mountpoint), fuse_options(config))
    except RuntimeError as error:
        raise MountError(f"cannot mount {config.mountpoint}: {error}") from None


async def _announce_ready(config: MountConfig, on_ready: Callable[[], None]) -> None:
    # A stat from another thread is answered by the FUSE loop: once it returns,
    # the kernel has completed INIT and the mount serves requests.
    await trio.to_thread.run_sync(os.stat, config.mountpoint)
    entry = mounts.find_mount(config.mountpoint)
    if entry is not None and config.kernel_read_ahead_bytes:
        await trio.to_thread.run_sync(
            mounts.set_read_ahead, entry.device, config.kernel_read_ahead_bytes // 1024
        )
    log.info("mounted %s at %s", config.source, config.mountpoint)
    on_ready()


async def _stop_on_signal(fs: Filesystem, grace_s: float, peer_server: PeerServer | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info(
                "received %s: finishing reads in flight, then unmounting",
                signal.Signals(signum).name,
            )
            with trio.move_on_after(grace_s) as scope:
                if peer_server is not None:
                    # No new peer requests from here on; the answers in flight are sent.
                    await peer_server.drain()
                await fs.wait_idle()
            if scope.cancelled_caught:
                stats = fs.statistics()
                log.warning(
                    "%d requests in flight and %d open files after %.1fs; unmounting anyway",
                    stats.requests_in_flight,
                    stats.open_files,
                    grace_s,
                )
            pyfuse3.terminate()
            return
