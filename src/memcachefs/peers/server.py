"""The peer server: answers authenticated block requests from memory or its own source.

For every authenticated request it validates the path, then answers from
memory or, as the owner, fills the block from its own source through the
loader's single-flight (never from a third peer: no A->B->A loops). The block
is sent straight from the store's buffer, pinned while it is on the wire.
Unauthenticated or malformed requests get the connection closed with nothing
sent. Connections are accepted by `trio.serve_listeners` (which backs off on
EMFILE, ENFILE, ENOMEM) and it alone closes the listeners. On `drain()` the
server stops accepting connections and requests, closes idle connections and
waits for the answers in flight.

The peer port cannot starve the mount: connections are bounded (at most
MAX_CONNECTIONS, and never more than the descriptor limit less
RESERVED_DESCRIPTORS, kept for FUSE, the source and this instance's own peer
connections); a new connection must bring an authenticated request within
FIRST_REQUEST_S. At the bound, a new connection displaces the oldest one not
yet authenticated (so a flood of idle connections cannot lock a peer out), or
is closed if every connection has authenticated. Warnings about it (and
trio's about accept failing for lack of descriptors) are logged at most once
every WARNING_INTERVAL_S.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import trio

from memcachefs import protocol
from memcachefs.blockstore import Block
from memcachefs.errors import ReadError, StaleVersion
from memcachefs.loader import Loader
from memcachefs.metrics import counter, gauge
from memcachefs.peers.wire import Closed, receive_exactly
from memcachefs.protocol import (
    BLOCK_SIZE,
    ERROR,
    HIT,
    MISS,
    REQUEST_HEADER_BYTES,
    AuthError,
    ProtocolError,
    Request,
)
from memcachefs.source import PathRejected, validate_relpath

log = logging.getLogger(__name__)

IDLE_CONNECTION_S = 60.0  # the server closes kept-alive connections idle this long
FIRST_REQUEST_S = 5.0  # a new connection's first authenticated request must come within this
MAX_CONNECTIONS = 1024  # peer connections served at once
RESERVED_DESCRIPTORS = 512  # kept free for FUSE, the source and outgoing peer connections
WARNING_INTERVAL_S = 60.0  # at most one warning about the connection bound this often


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(descriptor_limit: int) -> int:
    """Peer connections served at once under a descriptor limit."""
    return max(1, min(MAX_CONNECTIONS, descriptor_limit - RESERVED_DESCRIPTORS))


class _RateLimit(logging.Filter):
    """Lets one record through every `interval_s` (trio's accept-failure errors)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval_s
        return True


@dataclass(frozen=True)
class PeerServerStatistics:
    peer_requests_served: int = counter("authenticated peer requests answered")
    blocks_served_to_peers: int = counter("blocks sent to peers")
    bytes_served_to_peers: int = counter("bytes sent to peers")
    peer_misses_served: int = counter("peer requests answered 'not here'")
    peer_requests_refused: int = counter(
        "authenticated requests refused: bad path, block size or index"
    )
    peer_auth_failures: int = counter("requests refused unanswered: unauthenticated or replayed")
    peer_protocol_errors: int = counter("malformed requests (connection closed)")
    peer_connections: int = gauge("peer connections open now")
    peer_requests_in_flight: int = gauge("peer requests being answered now")
    peer_connections_displaced: int = counter(
        "unauthenticated connections closed to admit a newer one"
    )
    peer_connections_rejected: int = counter(
        "connections closed at once: the bound reached, all authenticated"
    )


class PeerServer:
    def __init__(
        self,
        loader: Loader,
        listeners: Sequence[trio.SocketListener],
        *,
        secret: bytes,
        timeout_s: float,
    ) -> None:
        self._loader = loader
        self._listeners = list(listeners)
        self._secret = secret
        self._timeout_s = timeout_s
        self._block_size = loader.block_size
        self._replay = protocol.ReplayGuard()
        self._accept_scope = trio.CancelScope()
        self._idle_scopes: set[trio.CancelScope] = set()
        self._draining = False
        self._quiet = trio.Event()
        self._quiet.set()
        self._requests = 0
        self._blocks_served = 0
        self._bytes_served = 0
        self._misses = 0
        self._refused = 0
        self._auth_failures = 0
        self._protocol_errors = 0
        self._connections = 0
        self._in_flight = 0
        self._max_connections = connection_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        # Connections not authenticated yet, oldest first: their scopes (FIRST_REQUEST_S).
        self._unauthenticated: dict[trio.CancelScope, trio.Event] = {}
        self._displaced = 0
        self._rejected = 0
        self._next_warning = 0.0

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for listener in self._listeners:
            host, port = listener.socket.getsockname()[:2]
            out.append((str(host), int(port)))
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; after `drain()`, until the answers in flight are sent."""
        accept_errors = logging.getLogger("trio.serve_listeners")
        quiet = _RateLimit(WARNING_INTERVAL_S)
        accept_errors.addFilter(quiet)
        try:
            async with trio.open_nursery() as connections:
                await connections.start(self._accept, connections)
                task_status.started()
        finally:
            accept_errors.removeFilter(quiet)

    async def _accept(
        self,
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with self._accept_scope:  # cancelled by drain(); serve_listeners closes the listeners
            serve = partial(trio.serve_listeners, handler_nursery=connections)
            await serve(self._serve_connection, self._listeners, task_status=task_status)

    async def drain(self) -> None:
        """Stop taking connections and requests; return once the answers in flight are sent."""
        self._draining = True
        self._accept_scope.cancel()
        for scope in list(self._idle_scopes):
            scope.cancel()
        await self._quiet.wait()

    async def _make_room(self) -> bool:
        """Whether a new connection may be served: displace the oldest unauthenticated one.

        A displaced connection is waited for until it has closed, so the connections
        open never exceed the limit, not even for a moment."""
        while self._connections >= self._max_connections:
            if not self._unauthenticated:
                self._rejected += 1
                self._warn_full("rejecting new ones")
                return False
            oldest = next(iter(self._unauthenticated))
            closed = self._unauthenticated.pop(oldest)
            oldest.cancel()
            self._displaced += 1
            self._warn_full("displacing connections not yet authenticated")
            await closed.wait()
        return True

    def _warn_full(self, action: str) -> None:
        now = trio.current_time()
        if now >= self._next_warning:
            self._next_warning = now + WARNING_INTERVAL_S
            log.warning(
                "%d peer connections (the limit): %s; %d displaced, %d rejected so far",
                self._connections,
                action,
                self._displaced,
                self._rejected,
            )

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection (serve_listeners closes it afterwards)."""
        if not await self._make_room():
            return
        self._connections += 1
        closed = trio.Event()
        try:
            with trio.CancelScope(deadline=trio.current_time() + FIRST_REQUEST_S) as first:
                self._unauthenticated[first] = closed
                try:
                    await self._serve_requests(stream, first)
                finally:
                    self._unauthenticated.pop(first, None)
        finally:
            self._connections -= 1
            closed.set()

    async def _serve_requests(self, stream: trio.SocketStream, first: trio.CancelScope) -> None:
        header = bytearray(REQUEST_HEADER_BYTES)
        try:
            while not self._draining:
                with trio.CancelScope(deadline=trio.current_time() + IDLE_CONNECTION_S) as idle:
                    self._idle_scopes.add(idle)
                    try:
                        await receive_exactly(stream.socket, memoryview(header))
                    finally:
                        self._idle_scopes.discard(idle)
                if idle.cancelled_caught:
                    return
                self._in_flight += 1
                self._quiet = trio.Event() if self._in_flight == 1 else self._quiet
                try:
                    keep_open = await self._answer(stream, header, first)
                finally:
                    self._in_flight -= 1
                    if self._in_flight == 0:
                        self._quiet.set()
                if not keep_open:
                    return
        except (Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _answer(
        self, stream: trio.SocketStream, raw_header: bytearray, first: trio.CancelScope
    ) -> bool:
        """Read the rest of one request and answer it; False to close the connection."""
        try:
            header = protocol.parse_request_header(raw_header)
        except ProtocolError:
            self._protocol_errors += 1
            return False
        trailer = bytearray(header.trailer_bytes)  # bounded by the header check
        with trio.move_on_after(self._timeout_s) as scope:
            await receive_exactly(stream.socket, memoryview(trailer))
        if scope.cancelled_caught:
            return False
        try:
            request = protocol.finish_request(header, trailer, self._secret)
            self._replay.check(request.timestamp_ns, request.nonce)
        except AuthError as error:
            self._auth_failures += 1
            log.debug("peer request refused: %s", error)
            return False
        if first in self._unauthenticated:
            del self._unauthenticated[first]
            first.deadline = math.inf  # authenticated: only the idle deadline applies now
        self._requests += 1
        status, block = await self._lookup(request)
        key = request.key
        if block is None:
            if status == MISS:
                self._misses += 1
            await self._send(stream, protocol.encode_response_header(key, request.nonce, status))
            return True
        block.pins += 1  # keep the buffer from being recycled while it is on the wire
        try:
            head = protocol.encode_response_header(
                key, request.nonce, HIT, block.length, block.checksum
            )
            sent = await self._send(stream, head, block.view)
        finally:
            block.pins -= 1
        if sent:
            self._blocks_served += 1
            self._bytes_served += block.length
        return sent

    async def _send(self, stream: trio.SocketStream, *parts: bytes | memoryview) -> bool:
        with trio.move_on_after(self._timeout_s) as scope:
            for part in parts:
                await stream.send_all(part)
        return not scope.cancelled_caught

    async def _lookup(self, request: Request) -> tuple[int, Block | None]:
        key = request.key
        version = key.version
        if request.block_size != self._block_size:
            self._refused += 1
            return BLOCK_SIZE, None
        try:
            validate_relpath(version.relpath)
        except PathRejected:
            self._refused += 1
            return ERROR, None
        if not version.relpath or version.size <= 0:
            self._refused += 1
            return ERROR, None
        if not 0 <= key.index < version.block_count(self._block_size):
            self._refused += 1
            return ERROR, None
        if request.memory_only:
            block = self._loader.cached(key)
            return (HIT, block) if block is not None else (MISS, None)
        try:
            return HIT, await self._loader.fill_for_peer(key)
        except StaleVersion:
            return MISS, None  # our source holds another version of the file
        except (ReadError, OSError):
            return ERROR, None

    def statistics(self) -> PeerServerStatistics:
        return PeerServerStatistics(
            peer_requests_served=self._requests,
            blocks_served_to_peers=self._blocks_served,
            bytes_served_to_peers=self._bytes_served,
            peer_misses_served=self._misses,
            peer_requests_refused=self._refused,
            peer_auth_failures=self._auth_failures,
            peer_protocol_errors=self._protocol_errors,
            peer_connections=self._connections,
            peer_requests_in_flight=self._in_flight,
            peer_connections_displaced=self._displaced,
            peer_connections_rejected=self._rejected,
        )
