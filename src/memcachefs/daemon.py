"""Builds the service in one nursery, mounts it, and stops it in order.

Shutdown order (SIGTERM/SIGINT): stop taking new work where we can, let the
requests in flight finish (bounded by the grace period), end the FUSE loop,
unmount, then cancel the background tasks (fills, refreshes, peers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from memcachefs import control, mounts
from memcachefs.blockstore import BlockStore
from memcachefs.config import KERNEL_MAX_BACKGROUND, ClusterConfig, MountConfig, format_size
from memcachefs.control import CONFIG_XATTR, CONTROL_XATTR, STATS_XATTR
from memcachefs.controlserver import ControlServer, open_control_socket
from memcachefs.errors import MemcachefsError, MountError
from memcachefs.events import event
from memcachefs.fs import Filesystem, ReaddirReply
from memcachefs.handles import OpenFiles
from memcachefs.httpd import (
    OperatorsApp,
    Readiness,
    default_collectors,
    open_http_socket,
    serve_http,
)
from memcachefs.keys import FileVersion
from memcachefs.loader import Loader
from memcachefs.membership import Membership
from memcachefs.metadata import MetadataCache
from memcachefs.metrics import HasStatistics, StatisticsSnapshot
from memcachefs.pagecache import NotifyStore, PageCachePusher
from memcachefs.patterns import expand_async
from memcachefs.peers import PeerClient, PeerServer
from memcachefs.peers.server import raise_descriptor_limit
from memcachefs.prefetch import Prefetcher
from memcachefs.source import Source
from memcachefs.warm import TIERS, Warmer, WarmJob

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from <malloc.h>
UNMOUNT_POLL_S = 1.0
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SYNCHRONOUS_HANDLERS = 512  # FUSE handlers beyond the background limit (pyfuse3's default: 99)


def fuse_options(config: MountConfig) -> set[str]:
    options = {"fsname=memcachefs", "subtype=memcachefs", "ro", "nosuid", "nodev"}
    options.add("default_permissions")
    if config.allow_other:
        options.add("allow_other")
    return options


def fuse_handlers(config: MountConfig) -> int:
    """How many FUSE requests the daemon handles at once: every background request the
    kernel may send, and room for the synchronous ones (lookups, opens, getattrs) of
    the threads reading the mount. A request waiting on a stalled source holds one;
    once all are held the kernel's requests wait unread, cached or not."""
    return (config.fuse_max_background or KERNEL_MAX_BACKGROUND) + SYNCHRONOUS_HANDLERS


def pin_malloc_mmap_threshold() -> None:
    """Keep glibc from keeping large temporary allocations in fragmented heaps.

    Block buffers are anonymous mmaps and never touch malloc; what remains are
    the temporary buffers of a read that spans two blocks and of peer traffic.
    glibc raises its mmap threshold after large frees, after which such buffers
    stay in its heaps; a fixed threshold (MALLOC_MMAP_THRESHOLD_=131072) returns
    them to the kernel at once. Measured with the mmap buffers (benchmarks/run.py
    rss, 256 MiB capacity, 16 readers, 15 s, two runs each): peak RSS 299 MiB
    with it, 307-309 MiB without.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; RSS may exceed the cache budget more")


async def serve(
    config: MountConfig,
    on_ready: Callable[[], None] = lambda: None,
    readiness: Readiness | None = None,
) -> None:
    """Mount and serve until unmounted or signalled. Raises MountError if it cannot mount.

    `readiness` answers /ready (default: ready once the mount serves)."""
    try:
        await _serve(config, on_ready, readiness)
    except BaseExceptionGroup as group:
        # The nursery wraps a failure to mount in a group; callers want the error itself.
        errors = group.exceptions
        if len(errors) == 1 and isinstance(errors[0], MemcachefsError):
            raise errors[0] from None
        raise


@dataclass
class Service:
    """The components of one mount, wired together (without the cluster)."""

    source: Source
    store: BlockStore
    metadata: MetadataCache
    loader: Loader
    files: OpenFiles
    prefetcher: Prefetcher | None
    pusher: PageCachePusher | None
    fs: Filesystem
    warmer: Warmer
    statistics: StatisticsSnapshot

    def components(self) -> list[HasStatistics]:
        parts: list[HasStatistics] = [self.store, self.loader, self.source, self.metadata]
        parts += [self.files, self.fs, self.fs.inode_limit, self.warmer]
        return parts + [part for part in (self.prefetcher, self.pusher) if part is not None]


def build_service(
    source: Source,
    nursery: trio.Nursery,
    *,
    capacity_bytes: int,
    block_size_bytes: int,
    read_ahead_blocks: int,
    attr_timeout_s: float,
    push_page_cache: bool,
    metadata_cache_bytes: int = 64 * 1024 * 1024,
    metadata_timeout_s: float = 10.0,
    inode_limit: int | None = None,
    prefetch_patterns: tuple[str, ...] | None = None,
    prefetch_window_bytes: int = 64 * 1024 * 1024,
    stale_grace_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    notify_store: NotifyStore = pyfuse3.notify_store,
    readdir_reply: ReaddirReply | None = None,
    mountpoint: Path | None = None,
    static_statistics: dict[str, Any] | None = None,
    pin_limit_bytes: int = 0,
) -> Service:
    """The one place the mount's components are built (the daemon and the unit tests)."""
    store = BlockStore(
        capacity_bytes,
        block_size_bytes,
        pin_limit_bytes=pin_limit_bytes,
        on_protected_evicted=_report_protected_eviction,
    )
    metadata = MetadataCache(
        source,
        nursery,
        ttl_s=attr_timeout_s,
        stale_grace_s=stale_grace_s,
        budget_bytes=metadata_cache_bytes,
        unanswered_timeout_s=metadata_timeout_s,
        clock=clock,
    )
    loader = Loader(store, source, nursery, read_ahead_blocks=read_ahead_blocks)
    prefetcher = (
        None
        if prefetch_patterns is None
        else Prefetcher(
            loader,
            metadata,
            nursery,
            patterns=prefetch_patterns,
            window_bytes=prefetch_window_bytes,
        )
    )
    files = OpenFiles(source, metadata, loader, nursery, prefetcher)
    loader.set_reader_guard(files.about_to_read)
    pusher = (
        PageCachePusher(
            store,
            nursery,
            notify_store=notify_store,
            reader_position=files.reader_position,
            mountpoint=mountpoint,
        )
        if push_page_cache
        else None
    )
    statistics = StatisticsSnapshot(block_size_bytes=block_size_bytes, **(static_statistics or {}))
    fs = Filesystem(
        source,
        metadata,
        files,
        block_size=block_size_bytes,
        attr_timeout_s=attr_timeout_s,
        root_xattrs={STATS_XATTR: lambda: json.dumps(statistics(), sort_keys=True).encode()},
        readdir_reply=readdir_reply,
        pusher=pusher,
        inode_limit=inode_limit,
    )
    nursery.start_soon(fs.inode_limit.run)
    warmer = Warmer(
        loader,
        metadata,
        window_bytes=prefetch_window_bytes,
        on_resident=fs.push_resident,
        on_evicted=fs.drop_pages,
    )
    service = Service(
        source, store, metadata, loader, files, prefetcher, pusher, fs, warmer, statistics
    )
    for component in service.components():
        statistics.add(component)
    return service


def _report_protected_eviction(version: FileVersion, pinned: bool) -> None:
    event(
        "pinned_file_evicted" if pinned else "warm_file_evicted",
        level=logging.WARNING,
        path=os.fsdecode(version.relpath),
        size_bytes=version.size,
    )


async def fill_pinned(
    source_root: Path, patterns: tuple[str, ...], store: BlockStore, warmer: Warmer
) -> None:
    """Pin the files the patterns name and warm them (the Warmer: one fill path)."""
    found = await expand_async(source_root, patterns)
    relpaths = sorted({relpath for hits in found.values() for relpath, _ in hits})
    versions = []
    for relpath in relpaths:
        try:
            version = await warmer.version(os.fsencode(relpath))
        except OSError as error:
            event("source_error", level=logging.WARNING, path=relpath, error=str(error))
            continue
        store.pin(version)
        versions.append(version)
    event("pinned", files=len(versions), bytes=sum(version.size for version in versions))
    job = await warmer.warm(versions, WarmJob())
    for path, problem in job.errors.items():
        event("source_error", level=logging.WARNING, path=path, error=problem)
    event("pinned_filled", files=job.files_done, bytes=store.statistics().pinned_bytes)


async def _serve(
    config: MountConfig, on_ready: Callable[[], None], readiness: Readiness | None
) -> None:
    pin_malloc_mmap_threshold()
    cache = config.cache
    cluster = config.cluster
    # Bound before anything else: a busy peer port is a clear error and nothing is mounted.
    listeners = await open_peer_listeners(cluster)
    http_socket = None
    control_path = control.socket_path(config.mountpoint)
    control_socket = None
    try:
        warm_set = await warm_set_of(config)
        control_socket = open_control_socket(control_path)
        if config.http_address is not None:
            http_socket = open_http_socket(config.http_address)
        with Source(
            config.source,
            block_threads=cache.source_threads,
            metadata_threads=cache.metadata_threads,
        ) as source:
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run)
                service = build_service(
                    source,
                    nursery,
                    capacity_bytes=cache.capacity_bytes,
                    block_size_bytes=cache.block_size_bytes,
                    read_ahead_blocks=cache.read_ahead_blocks,
                    attr_timeout_s=config.attr_timeout_s,
                    push_page_cache=cache.push_page_cache,
                    mountpoint=config.mountpoint,
                    metadata_cache_bytes=cache.metadata_cache_bytes,
                    metadata_timeout_s=cache.metadata_timeout_s,
                    inode_limit=cache.inode_limit,
                    prefetch_patterns=None if cache.no_prefetch else cache.prefetch_patterns,
                    prefetch_window_bytes=cache.prefetch_window_bytes,
                    static_statistics={
                        "mountpoint": str(config.mountpoint),
                        "source": str(config.source),
                    },
                    pin_limit_bytes=int(cache.pin_share * cache.capacity_bytes),
                )
                fs = service.fs
                config_json = json.dumps(config.public_dump(), sort_keys=True).encode()
                fs.add_root_xattr(CONFIG_XATTR, lambda: config_json)
                fs.add_root_xattr(CONTROL_XATTR, lambda: os.fsencode(control_path))
                startup_job = WarmJob() if config.cache.warm_patterns else None
                peer_server, client = await _start_cluster(
                    cluster, service.loader, listeners, nursery, service.statistics
                )
                _mount(fs, config)
                http_stop = trio.Event()
                mounted = trio.Event()
                try:
                    with trio.CancelScope() as fuse_loop:
                        nursery.start_soon(_announce_ready, config, on_ready, mounted)
                        control_server = ControlServer(
                            control_socket, service.warmer, lambda: startup_job
                        )
                        nursery.start_soon(control_server.run)
                        nursery.start_soon(
                            _warm_at_start, service.warmer, warm_set, startup_job, mounted
                        )
                        if config.ready_file is not None:
                            nursery.start_soon(
                                _create_ready_file, config.ready_file, mounted, startup_job
                            )
                        if cache.pin_patterns:
                            nursery.start_soon(
                                fill_pinned,
                                config.source,
                                cache.pin_patterns,
                                service.store,
                                service.warmer,
                            )
                        if http_socket is not None:
                            app = OperatorsApp(
                                service.statistics,
                                config.mountpoint,
                                readiness or _readiness(mounted, startup_job),
                                default_collectors(),
                            )
                            nursery.start_soon(serve_http, app, http_socket, http_stop)
                        nursery.start_soon(
                            _stop_on_signal, fs, config, peer_server, fuse_loop, http_stop
                        )
                        nursery.start_soon(_end_after_unmount, config, fuse_loop)
                        nursery.start_soon(_ignore_other_signals)
                        await pyfuse3.main(max_tasks=fuse_handlers(config))
                    if fuse_loop.cancelled_caught:
                        log.warning("requests still in flight were abandoned (they get an error)")
                finally:
                    http_stop.set()
                    with trio.CancelScope(shield=True):  # no kernel call once it is closed
                        await fs.inode_limit.stop()
                    if service.pusher is not None:
                        # No thread may store pages once the FUSE session is closed.
                        with trio.CancelScope(shield=True):
                            await service.pusher.stop_all()
                    still_mounted = mounts.find_mount(config.mountpoint) is not None
                    pyfuse3.close(unmount=still_mounted)
                    if service.pusher is not None:
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(service.pusher.close)
                    nursery.cancel_scope.cancel()
                    if client is not None:
                        client.close()
    finally:
        for listener in listeners:
            listener.socket.close()
        if http_socket is not None:
            http_socket.close()  # a no-op once hypercorn took it
        if control_socket is not None:
            control_socket.close()
            control_path.unlink(missing_ok=True)
        if config.ready_file is not None:
            config.ready_file.unlink(missing_ok=True)
    event("unmounted", mountpoint=str(config.mountpoint))


async def warm_set_of(config: MountConfig) -> list[tuple[bytes, int]]:
    """The files --warm names, found on the source before mounting; MountError if
    they do not fit in the capacity. A pattern that names nothing is a warning."""
    patterns = config.cache.warm_patterns
    if not patterns:
        return []
    found = await expand_async(config.source, patterns)
    for pattern, hits in found.items():
        if not hits:
            log.warning("--warm %s names no file in %s", pattern, config.source)
    unique = {os.fsencode(relpath): size for hits in found.values() for relpath, size in hits}
    total = sum(unique.values())
    if total > config.cache.capacity_bytes:
        raise MountError(
            f"--warm names {len(unique)} files of {format_size(total)}: more than the "
            f"capacity {format_size(config.cache.capacity_bytes)}"
        )
    return sorted(unique.items())


def _warm_done(job: WarmJob | None) -> bool:
    return job is None or job.resident


def _readiness(
    mounted: trio.Event, job: WarmJob | None
) -> Callable[[], tuple[bool, dict[str, Any]]]:
    def readiness() -> tuple[bool, dict[str, Any]]:
        progress = {"mounted": mounted.is_set(), "warm": None if job is None else job.snapshot()}
        return mounted.is_set() and _warm_done(job), progress

    return readiness


async def _warm_at_start(
    warmer: Warmer, warm_set: list[tuple[bytes, int]], job: WarmJob | None, mounted: trio.Event
) -> None:
    if job is None:
        return
    await mounted.wait()
    versions = []
    for relpath, _ in warm_set:
        try:
            versions.append(await warmer.version(relpath))
        except OSError as error:
            log.warning("--warm: %s is gone (%s)", os.fsdecode(relpath), error.strerror)
    total = sum(version.size for version in versions)
    event("warm_started", files=len(versions), bytes=total)
    await warmer.warm_until_resident(versions, job)
    tiers = {f"{tier}_bytes": job.tier_bytes[tier] for tier in TIERS}
    event(
        "warm_finished", files=job.files_done, bytes=total, seconds=round(job.seconds, 3), **tiers
    )


async def _create_ready_file(path: Path, mounted: trio.Event, job: WarmJob | None) -> None:
    await mounted.wait()
    if job is not None:
        await job.wait_resident()
    await trio.to_thread.run_sync(path.write_text, f"{os.getpid()}\n")
    event("ready", ready_file=str(path))


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
    statistics: StatisticsSnapshot,
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
    statistics.add(membership)
    statistics.add(client)
    server = None
    if listeners:
        raise_descriptor_limit()  # the connection bound is taken from it
        server = PeerServer(loader, listeners, secret=secret, timeout_s=cluster.peer_timeout_s)
        await nursery.start(server.run)
        statistics.add(server)
        log.info(
            "serving peers on %s (authenticated)",
            ", ".join(f"{host}:{port}" for host, port in server.addresses),
        )
    return server, client


def _mount(fs: Filesystem, config: MountConfig) -> None:
    try:
        pyfuse3.init(fs, os.fspath(config.mountpoint), fuse_options(config))
    except RuntimeError as error:
        raise MountError(f"cannot mount {config.mountpoint}: {error}") from None


async def _announce_ready(
    config: MountConfig, on_ready: Callable[[], None], mounted: trio.Event
) -> None:
    # A stat from another thread is answered by the FUSE loop: once it returns,
    # the kernel has completed INIT and the mount serves requests.
    await trio.to_thread.run_sync(os.stat, config.mountpoint)
    entry = mounts.find_mount(config.mountpoint)
    if entry is not None and config.kernel_read_ahead_bytes:
        await trio.to_thread.run_sync(
            mounts.set_read_ahead, entry.device, config.kernel_read_ahead_bytes // 1024
        )
    if entry is not None and config.fuse_max_background:
        # After INIT: its reply would set the kernel default again.
        await trio.to_thread.run_sync(
            mounts.set_fuse_background, entry.device, config.fuse_max_background
        )
    event("mounted", source=str(config.source), mountpoint=str(config.mountpoint))
    mounted.set()
    on_ready()


async def _stop_on_signal(
    fs: Filesystem,
    config: MountConfig,
    peer_server: PeerServer | None,
    fuse_loop: trio.CancelScope,
    http_stop: trio.Event,
) -> None:
    grace_s = config.shutdown_grace_s
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info(
                "received %s: finishing reads in flight, then unmounting",
                signal.Signals(signum).name,
            )
            http_stop.set()  # the operators' listener goes first
            with trio.move_on_after(grace_s) as scope:
                if peer_server is not None:
                    # No new peer requests from here on; the answers in flight are sent.
                    await peer_server.drain()
                await fs.wait_idle()
            pyfuse3.terminate()
            if scope.cancelled_caught:
                log.warning(
                    "%d requests in flight and %d open files after %.1fs; unmounting anyway",
                    fs.counters.requests_in_flight,
                    fs.open_files,
                    grace_s,
                )
                # pyfuse3.main() waits for its handlers: end those stuck on the source.
                fuse_loop.cancel()
            return


async def _ignore_other_signals() -> None:
    """SIGHUP and SIGUSR1/2 would kill the daemon and leave a dead mount: log and go on."""
    with trio.open_signal_receiver(*IGNORED_SIGNALS) as signals:
        async for signum in signals:
            log.info("received %s: ignored (SIGTERM unmounts)", signal.Signals(signum).name)


async def _end_after_unmount(config: MountConfig, fuse_loop: trio.CancelScope) -> None:
    """Once the mount is gone (unmounted from outside), give the requests still in
    flight the grace period, then end them: a stalled source must not keep the
    daemon alive after its mount is gone."""
    # Polled: the kernel tells no one when a mount goes away.
    while await trio.to_thread.run_sync(mounts.find_mount, config.mountpoint) is not None:  # noqa: ASYNC110
        await trio.sleep(UNMOUNT_POLL_S)
    log.info("%s was unmounted", config.mountpoint)
    await trio.sleep(config.shutdown_grace_s)
    fuse_loop.cancel()
