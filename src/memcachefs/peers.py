"""Peers share their memory: a server answering block requests, a client asking them.

PeerServer: for every authenticated request it validates the path, then answers
from memory or, as the owner, fills the block from its own source through the
loader's single-flight (never from a third peer: no A->B->A loops). The block
is sent straight from the store's buffer, pinned while it is on the wire.
Unauthenticated or malformed requests get the connection closed with nothing
sent. On `drain()` it stops accepting connections and requests, closes idle
connections and waits for the answers in flight.

PeerClient implements the loader's PeerFetcher: on a miss it asks the owner of
the block (rendezvous hash over the live members) under a deadline, reads the
payload straight into the fill's buffer and verifies the key and the xxh3
checksum. When this instance owns the block itself it asks the member ranked
second (the owner before this instance joined) for the block *from memory
only*, so an instance added to a warm cluster reads nothing from the source for
blocks the others hold. The client also remembers, per file version, which
members answered a hit for one of its blocks (a member that served one block of
a file very likely holds the others): when such a holder has fewer of this
client's requests in flight than the peer chosen above, it is asked first, from
memory only; on its miss or failure the chosen peer is asked as usual, within
the same deadline (at most one extra round trip). So a new instance reads from
every warm peer, not only from the owners. A holder that misses is not asked
for that file again until it serves one of its blocks from memory. Any failure
is counted by kind and returns None (the loader reads the source); a failing
peer is left out of the ring for a backoff that doubles with each failure
(0.5 s up to 30 s), then probed by one request.
Connections are kept alive in a pool per peer; a connection is used by one
task at a time.
"""

from __future__ import annotations

import logging
import os
import random
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio
import xxhash
from cachetools import LRUCache
from prometheus_client import Histogram

from memcachefs import protocol
from memcachefs.blockstore import Block
from memcachefs.errors import PeerError, ReadError, StaleVersion
from memcachefs.hashring import HashRing
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.loader import Loader
from memcachefs.membership import Membership, split_member_id
from memcachefs.metrics import counter, gauge
from memcachefs.protocol import (
    ERROR,
    HIT,
    MISS,
    REQUEST_HEADER_BYTES,
    RESPONSE_HEADER_BYTES,
    AuthError,
    ProtocolError,
    Request,
)
from memcachefs.source import PathRejected, validate_relpath

# Exposed on /metrics (httpd.default_collectors); not in a global registry.
PEER_FETCH_SECONDS = Histogram(
    "memcachefs_peer_fetch_seconds", "time one block request to a peer took", registry=None
)

log = logging.getLogger(__name__)

IDLE_CONNECTION_S = 60.0  # the server closes kept-alive connections idle this long
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_IDLE_CONNECTIONS_PER_PEER = 8
THREADED_PAYLOAD_BYTES = 256 * 1024  # larger payloads are received in a worker thread
PEER_THREADS = 8
HOLDER_VERSIONS = 4096  # file versions whose holders a client remembers (LRU)
ERROR_KINDS = ("timeout", "refused", "closed", "auth", "checksum", "version", "protocol", "remote")


class _Closed(Exception):
    """The connection ended (EOF or reset) after `received` bytes of a read."""

    def __init__(self, received: int, reset: bool) -> None:
        super().__init__(f"connection closed after {received} bytes")
        self.received = received
        self.reset = reset


async def _recv_exactly(sock: trio.socket.SocketType, view: memoryview) -> None:
    """Fill `view` from the socket (no intermediate copy)."""
    received = 0
    while received < len(view):
        try:
            count = await sock.recv_into(view[received:])
        except OSError as error:
            raise _Closed(received, reset=True) from error
        if count == 0:
            raise _Closed(received, reset=False)
        received += count


def _receive_payload(fd: int, buffer: memoryview, timeout_s: float) -> int:
    """Fill `buffer` from a (non-blocking) socket in a worker thread; its xxh3-64.

    The caller owns the socket exclusively while this runs (one task per
    connection). Gives up with a timeout PeerError after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    received = 0
    while received < len(buffer):
        try:
            count = os.readv(fd, [buffer[received:]])
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError("payload not received in time", kind="timeout") from None
            poller.poll(max(1, int(remaining * 1000)))
            continue
        except OSError:
            raise _Closed(received, reset=True) from None
        if count == 0:
            raise _Closed(received, reset=False)
        received += count
    return xxhash.xxh3_64_intdigest(buffer)


# -- server -----------------------------------------------------------------------


@dataclass(frozen=True)
class PeerServerStatistics:
    peer_requests_served: int = counter("authenticated peer requests answered")
    blocks_served_to_peers: int = counter("blocks sent to peers")
    bytes_served_to_peers: int = counter("bytes sent to peers")
    peer_misses_served: int = counter("peer requests answered 'not here'")
    peer_requests_refused: int = counter(
        "authenticated requests refused: a bad path, block size or index"
    )
    peer_auth_failures: int = counter("requests refused unanswered: unauthenticated or replayed")
    peer_protocol_errors: int = counter("malformed requests (connection closed)")
    peer_connections: int = gauge("peer connections open now")
    peer_requests_in_flight: int = gauge("peer requests being answered now")


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
        self._accept_scope: trio.CancelScope | None = None
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

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for listener in self._listeners:
            host, port = listener.socket.getsockname()[:2]
            out.append((str(host), int(port)))
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; after `drain()`, until the answers in flight are sent."""
        try:
            async with trio.open_nursery() as connections:
                with trio.CancelScope() as accepting:
                    self._accept_scope = accepting
                    async with trio.open_nursery() as acceptors:
                        for listener in self._listeners:
                            acceptors.start_soon(self._accept, listener, connections)
                        task_status.started()
                self._close_listeners()
        finally:
            self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.socket.close()

    async def drain(self) -> None:
        """Stop taking connections and requests; return once the answers in flight are sent."""
        self._draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for scope in list(self._idle_scopes):
            scope.cancel()
        await self._quiet.wait()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as error:  # EMFILE and friends: back off, keep serving
                log.warning("peer listener: %s", error)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        self._connections += 1
        sock = stream.socket
        header = bytearray(REQUEST_HEADER_BYTES)
        try:
            while not self._draining:
                with trio.CancelScope(deadline=trio.current_time() + IDLE_CONNECTION_S) as idle:
                    self._idle_scopes.add(idle)
                    try:
                        await _recv_exactly(sock, memoryview(header))
                    finally:
                        self._idle_scopes.discard(idle)
                if idle.cancelled_caught:
                    return
                self._in_flight += 1
                self._quiet = trio.Event() if self._in_flight == 1 else self._quiet
                try:
                    keep_open = await self._answer(stream, header)
                finally:
                    self._in_flight -= 1
                    if self._in_flight == 0:
                        self._quiet.set()
                if not keep_open:
                    return
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream, raw_header: bytearray) -> bool:
        """Read the rest of one request and answer it; False to close the connection."""
        try:
            header = protocol.parse_request_header(raw_header)
        except ProtocolError:
            self._protocol_errors += 1
            return False
        trailer = bytearray(header.trailer_bytes)  # bounded by the header check
        with trio.move_on_after(self._timeout_s) as scope:
            await _recv_exactly(stream.socket, memoryview(trailer))
        if scope.cancelled_caught:
            return False
        try:
            request = protocol.finish_request(header, trailer, self._secret)
            self._replay.check(request.timestamp_ns, request.nonce)
        except AuthError as error:
            self._auth_failures += 1
            log.debug("peer request refused: %s", error)
            return False
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
            return ERROR, None
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
        )


# -- client -----------------------------------------------------------------------


class _Unanswered(Exception):
    """The peer closed (or reset) the connection before sending any answer."""

    def __init__(self, reset: bool) -> None:
        super().__init__("connection closed before an answer")
        self.reset = reset


class _Peer:
    def __init__(self, member: str) -> None:
        self.member = member
        self.host, self.port = split_member_id(member)
        self.idle: list[trio.SocketStream] = []
        self.failures = 0
        self.down_until = 0.0
        self.probing = False
        self.in_flight = 0  # this client's requests to it now

    def is_down(self, now: float) -> bool:
        return self.failures > 0 and (now < self.down_until or self.probing)

    def close_idle(self) -> None:
        for stream in self.idle:
            stream.socket.close()
        self.idle.clear()


@dataclass(frozen=True)
class PeerClientStatistics:
    peer_fetches: int = counter("requests sent to peers")
    peer_fetch_misses: int = counter("peer requests answered 'not here'")
    peer_errors_timeout: int = counter("peer requests past the deadline")
    peer_errors_refused: int = counter("peer connections refused")
    peer_errors_closed: int = counter("peer connections reset or dropped mid-answer")
    peer_errors_auth: int = counter(
        "peer connections closed without an answer (wrong secret, clock skew)"
    )
    peer_errors_checksum: int = counter("peer payloads whose checksum did not match")
    peer_errors_version: int = counter("peer answers for another block or file version")
    peer_errors_protocol: int = counter("malformed peer answers")
    peer_errors_remote: int = counter("peers that could not produce the block")
    peer_holder_fetches: int = counter(
        "requests sent to a less loaded known holder instead of the owner"
    )
    peer_holder_hits: int = counter("blocks known holders served")
    peers_down: int = gauge("peers in backoff now")
    peer_connections_opened: int = counter("connections opened to peers")


class PeerClient:
    def __init__(
        self,
        membership: Membership,
        *,
        block_size: int,
        secret: bytes,
        timeout_s: float,
    ) -> None:
        self._membership = membership
        self._block_size = block_size
        self._secret = secret
        self._timeout_s = timeout_s
        self._peers: dict[str, _Peer] = {}
        self._membership_version = -1
        self._ring = HashRing([])
        self._ring_members: frozenset[str] = frozenset()
        self._fetches = 0
        self._misses = 0
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._connections_opened = 0
        self._holder_fetches = 0
        self._holder_hits = 0
        # file version -> {member: True if it served a block of it, False if it then
        # missed one asked from memory (after that only a hit from memory counts)}
        self._holders: LRUCache[FileVersion, dict[str, bool]] = LRUCache(maxsize=HOLDER_VERSIONS)
        self._limiter = trio.CapacityLimiter(PEER_THREADS)

    # -- choosing a peer -----------------------------------------------------------
    def _sync_members(self) -> None:
        membership = self._membership
        if membership.version == self._membership_version:
            return
        self._membership_version = membership.version
        for member in list(self._peers):
            if member not in membership.peers:
                self._peers.pop(member).close_idle()
        for member in membership.peers:
            self._peers.setdefault(member, _Peer(member))

    def choose(self, key: BlockKey) -> tuple[_Peer, bool] | None:
        """(peer, memory_only) to ask for `key`, or None to read the source."""
        self._sync_members()
        now = trio.current_time()
        live = {member for member, peer in self._peers.items() if not peer.is_down(now)}
        self_id = self._membership.self_id
        if self_id is not None:
            live.add(self_id)
        if live != self._ring_members:
            self._ring_members = frozenset(live)
            self._ring = HashRing(live)
        ranked = self._ring.ranked(key)
        if not ranked:
            return None
        if ranked[0] != self_id:
            return self._peers[ranked[0]], False
        if len(ranked) > 1:
            # We own it; the member ranked second owned it before we joined.
            return self._peers[ranked[1]], True
        return None

    def holder_for(self, key: BlockKey, chosen: _Peer) -> _Peer | None:
        """A known holder of `key`'s file less loaded than `chosen`, to ask first; or None.

        Load is this client's requests in flight to each peer; a tie goes to `chosen`.
        """
        holders = self._holders.get(key.version)
        if not holders:
            return None
        now = trio.current_time()
        best = chosen
        for member, holds in holders.items():
            peer = self._peers.get(member)
            if (
                holds
                and peer is not None
                and not peer.is_down(now)
                and peer.in_flight < best.in_flight
            ):
                best = peer
        return best if best is not chosen else None

    def _remember(
        self, version: FileVersion, member: str, *, hit: bool | None, memory_only: bool
    ) -> None:
        """Learn from an answer: a hit (True), a miss (False) or a failure (None).

        A hit makes `member` a known holder of the file. A miss from memory
        means it does not hold all of it: only another hit from memory makes it
        a holder again, not a hit it filled from its source as the owner (so in
        a cold start, where owners hold only what they fill, a member is asked
        in vain at most once per file). A failure forgets it.
        """
        holders = self._holders.get(version)
        if holders is None:
            if hit:
                self._holders[version] = {member: True}
        elif hit is None:
            holders.pop(member, None)
        elif not hit:
            holders[member] = False
        elif memory_only or holders.get(member, True):
            holders[member] = True

    # -- PeerFetcher ---------------------------------------------------------------
    async def fetch_into(self, key: BlockKey, buffer: memoryview) -> int | None:
        choice = self.choose(key)
        if choice is None:
            return None
        peer, memory_only = choice
        deadline = trio.current_time() + self._timeout_s
        holder = self.holder_for(key, peer)
        if holder is not None:
            # Ask the less loaded holder from memory; half the deadline, so the
            # chosen peer still has time if the holder stalls.
            self._holder_fetches += 1
            checksum = await self._ask(
                holder, key, buffer, memory_only=True, deadline=deadline - self._timeout_s / 2
            )
            if checksum is not None:
                self._holder_hits += 1
                return checksum
        return await self._ask(peer, key, buffer, memory_only=memory_only, deadline=deadline)

    async def _ask(
        self, peer: _Peer, key: BlockKey, buffer: memoryview, *, memory_only: bool, deadline: float
    ) -> int | None:
        """One request to `peer` before `deadline`: the verified checksum, or None."""
        self._fetches += 1
        peer.in_flight += 1
        probe = peer.failures > 0
        if probe:
            peer.probing = True
        try:
            checksum: int | None = None
            with trio.move_on_at(deadline) as scope, PEER_FETCH_SECONDS.time():
                checksum = await self._fetch(peer, key, buffer, memory_only=memory_only)
            if scope.cancelled_caught:
                raise PeerError(f"no answer within {self._timeout_s}s", kind="timeout")
        except PeerError as error:
            self._errors[error.kind] += 1
            self._remember(key.version, peer.member, hit=None, memory_only=memory_only)
            if error.kind != "remote":
                self._mark_failed(peer, error)
            return None
        finally:
            peer.in_flight -= 1
            if probe:
                peer.probing = False
        self._mark_ok(peer)
        self._remember(key.version, peer.member, hit=checksum is not None, memory_only=memory_only)
        if checksum is None:
            self._misses += 1
        return checksum

    async def _fetch(
        self, peer: _Peer, key: BlockKey, buffer: memoryview, *, memory_only: bool
    ) -> int | None:
        for attempt in range(2):
            stream, reused = await self._connect(peer)
            request = protocol.encode_request(
                Request(key, self._block_size, memory_only, time.time_ns(), os.urandom(16)),
                self._secret,
            )
            clean = False
            try:
                checksum = await self._exchange(stream, request, key, buffer)
                clean = True
                return checksum
            except _Unanswered as error:
                if reused and attempt == 0:
                    continue  # a kept-alive connection the peer had closed: once more, fresh
                if error.reset:
                    raise PeerError("connection reset before an answer", kind="closed") from None
                raise PeerError(
                    "the peer closed the connection without answering (authentication?)",
                    kind="auth",
                ) from None
            finally:
                if clean and len(peer.idle) < MAX_IDLE_CONNECTIONS_PER_PEER:
                    peer.idle.append(stream)
                else:
                    stream.socket.close()
        raise AssertionError("unreachable")

    async def _connect(self, peer: _Peer) -> tuple[trio.SocketStream, bool]:
        if peer.idle:
            return peer.idle.pop(), True
        try:
            stream = await trio.open_tcp_stream(peer.host, peer.port)
        except OSError as error:
            raise PeerError(f"connect to {peer.member}: {error}", kind="refused") from None
        self._connections_opened += 1
        return stream, False

    async def _exchange(
        self, stream: trio.SocketStream, request: bytes, key: BlockKey, buffer: memoryview
    ) -> int | None:
        """One request/response on `stream`: the payload's checksum, or None for a miss."""
        sock = stream.socket
        try:
            await stream.send_all(request)
        except trio.BrokenResourceError as error:
            raise _Unanswered(reset=True) from error
        head = bytearray(RESPONSE_HEADER_BYTES)
        try:
            await _recv_exactly(sock, memoryview(head))
        except _Closed as closed:
            if closed.received == 0:
                raise _Unanswered(closed.reset) from None
            raise PeerError("connection closed mid-answer", kind="closed") from None
        response = protocol.parse_response_header(head, max_payload=len(buffer))
        path = bytearray(response.path_len)  # bounded by the header check
        try:
            await _recv_exactly(sock, memoryview(path))
        except _Closed:
            raise PeerError("connection closed mid-answer", kind="closed") from None
        nonce = request[REQUEST_HEADER_BYTES - protocol.NONCE_BYTES : REQUEST_HEADER_BYTES]
        if response.nonce != nonce:
            raise ProtocolError("an answer to another request")
        version = key.version
        answered = (bytes(path), response.size, response.mtime_ns, response.index)
        if answered != (version.relpath, version.size, version.mtime_ns, key.index):
            raise PeerError("an answer for another block or file version", kind="version")
        if response.status == MISS:
            return None
        if response.status == ERROR:
            raise PeerError("the peer could not produce the block", kind="remote")
        if response.payload_len != len(buffer):
            raise ProtocolError("payload length differs from the block length")
        remaining_s = min(self._timeout_s, trio.current_effective_deadline() - trio.current_time())
        try:
            if len(buffer) >= THREADED_PAYLOAD_BYTES:
                # In a worker thread (the GIL is released in recv and in xxh3), so a
                # transfer runs alongside the FUSE requests on the trio thread.
                checksum = await trio.to_thread.run_sync(
                    _receive_payload, sock.fileno(), buffer, remaining_s, limiter=self._limiter
                )
            else:
                await _recv_exactly(sock, buffer)
                checksum = xxhash.xxh3_64_intdigest(buffer)
        except _Closed:
            raise PeerError("connection closed mid-transfer", kind="closed") from None
        if checksum != response.checksum:
            raise PeerError("payload checksum mismatch", kind="checksum")
        return checksum

    # -- peer health -----------------------------------------------------------------
    def _mark_failed(self, peer: _Peer, error: PeerError) -> None:
        now = trio.current_time()
        if peer.failures and now < peer.down_until:
            return  # already down: concurrent failures do not stretch the backoff
        peer.failures += 1
        backoff = min(BACKOFF_BASE_S * 2 ** (peer.failures - 1), BACKOFF_MAX_S)
        peer.down_until = now + backoff * random.uniform(0.75, 1.0)
        peer.close_idle()
        if peer.failures == 1:
            log.info("peer %s marked down (%s: %s)", peer.member, error.kind, error)

    def _mark_ok(self, peer: _Peer) -> None:
        if peer.failures:
            log.info("peer %s is back after %d failed tries", peer.member, peer.failures)
            peer.failures = 0
            peer.down_until = 0.0

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close_idle()

    def statistics(self) -> PeerClientStatistics:
        now = trio.current_time()
        errors = self._errors
        return PeerClientStatistics(
            peer_fetches=self._fetches,
            peer_fetch_misses=self._misses,
            peer_errors_timeout=errors["timeout"],
            peer_errors_refused=errors["refused"],
            peer_errors_closed=errors["closed"],
            peer_errors_auth=errors["auth"],
            peer_errors_checksum=errors["checksum"],
            peer_errors_version=errors["version"],
            peer_errors_protocol=errors["protocol"],
            peer_errors_remote=errors["remote"],
            peer_holder_fetches=self._holder_fetches,
            peer_holder_hits=self._holder_hits,
            peers_down=sum(peer.is_down(now) for peer in self._peers.values()),
            peer_connections_opened=self._connections_opened,
        )
