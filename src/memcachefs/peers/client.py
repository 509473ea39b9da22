"""The peer client: the loader's PeerFetcher, asking the cluster for a block on a miss.

It asks the peer routing.py chooses (first a less loaded known holder, from
memory only, within half the deadline; then the chosen peer within the rest:
at most one extra round trip) over a kept-alive connection (pool.py), and
stores nothing unverified. Any failure is counted by kind and returns None
(the loader reads the source); a failing peer is left out of the ring for a
backoff (health.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import trio
from prometheus_client import Histogram

from memcachefs import protocol
from memcachefs.errors import PeerError
from memcachefs.events import event
from memcachefs.keys import BlockKey
from memcachefs.membership import Membership
from memcachefs.metrics import counter, gauge
from memcachefs.peers.health import BACKOFF_MAX_S
from memcachefs.peers.pool import Unanswered, exchange
from memcachefs.peers.routing import Peer, Router
from memcachefs.protocol import Request

# Exposed on /metrics (httpd.default_collectors); not in a global registry.
PEER_FETCH_SECONDS = Histogram(
    "memcachefs_peer_fetch_seconds", "time one block request to a peer took", registry=None
)

log = logging.getLogger(__name__)

PEER_THREADS = 8  # worker threads receiving large payloads
ERROR_KINDS = (
    "timeout",
    "refused",
    "closed",
    "auth",
    "checksum",
    "version",
    "protocol",
    "remote",
    "block_size",
)


@dataclass(frozen=True)
class PeerClientStatistics:
    peer_fetches: int = counter("requests sent to peers")
    peer_fetch_misses: int = counter("peer requests answered 'not here'")
    peer_errors_timeout: int = counter("peer requests past the deadline")
    peer_errors_refused: int = counter("peer connections refused")
    peer_errors_closed: int = counter("peer connections reset or dropped mid-answer")
    peer_errors_auth: int = counter("peer connections closed unanswered (wrong secret, clock skew)")
    peer_errors_checksum: int = counter("peer payloads whose checksum did not match")
    peer_errors_version: int = counter("peer answers for another block or file version")
    peer_errors_protocol: int = counter("malformed peer answers")
    peer_errors_remote: int = counter("peers that could not produce the block")
    peer_errors_block_size: int = counter("answers from peers that use another --block-size")
    peer_holder_fetches: int = counter("requests sent to a less loaded known holder, not the owner")
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
        self._router = Router(membership)
        self._block_size = block_size
        self._secret = secret
        self._timeout_s = timeout_s
        self._fetches = 0
        self._misses = 0
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._holder_fetches = 0
        self._holder_hits = 0
        self._connections_opened = 0
        self._other_block_size: set[str] = set()  # members told of, to log each once
        self._limiter = trio.CapacityLimiter(PEER_THREADS)
        # Requests on the wire at once: no more than threads to receive their answers.
        # A request sent beyond them leaves its socket undrained while it waits for a
        # thread; the peer's send then waits too, past its deadline, and it closes the
        # connection mid-transfer (seen at 1 gbit once 256 READs could come at once).
        self._exchanges = trio.CapacityLimiter(PEER_THREADS)

    def choose(self, key: BlockKey) -> tuple[Peer, bool] | None:
        """(peer, memory_only) to ask for `key`, or None to read the source."""
        return self._router.choose(key, trio.current_time())

    def holder_for(self, key: BlockKey, chosen: Peer) -> Peer | None:
        """A known holder of `key`'s file less loaded than `chosen`, to ask first; or None."""
        return self._router.holder_for(key, chosen, trio.current_time())

    # -- PeerFetcher ---------------------------------------------------------------
    async def fetch_into(self, key: BlockKey, buffer: memoryview) -> int | None:
        choice = self.choose(key)
        if choice is None:
            return None
        peer, memory_only = choice
        async with self._exchanges:  # waiting here is local queueing: not on the deadline
            return await self._fetch_chosen(key, buffer, peer, memory_only)

    async def _fetch_chosen(
        self, key: BlockKey, buffer: memoryview, peer: Peer, memory_only: bool
    ) -> int | None:
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
        self, peer: Peer, key: BlockKey, buffer: memoryview, *, memory_only: bool, deadline: float
    ) -> int | None:
        """One request to `peer` before `deadline`: the verified checksum, or None."""
        self._fetches += 1
        peer.in_flight += 1
        health = peer.health
        probe = health.failures > 0
        if probe:
            health.probing = True
        try:
            checksum: int | None = None
            with trio.move_on_at(deadline) as scope, PEER_FETCH_SECONDS.time():
                checksum = await self._fetch(peer, key, buffer, memory_only=memory_only)
            if scope.cancelled_caught:
                raise PeerError(f"no answer within {self._timeout_s}s", kind="timeout")
        except PeerError as error:
            self._errors[error.kind] += 1
            self._router.remember(key.version, peer.member, hit=None, memory_only=memory_only)
            if error.kind != "remote":
                self._mark_failed(peer, error)
            return None
        finally:
            peer.in_flight -= 1
            if probe:
                health.probing = False
        failures = health.succeeded()
        if failures:
            event("peer_up", peer=peer.member, failed_tries=failures)
        self._router.remember(
            key.version, peer.member, hit=checksum is not None, memory_only=memory_only
        )
        if checksum is None:
            self._misses += 1
        return checksum

    async def _fetch(
        self, peer: Peer, key: BlockKey, buffer: memoryview, *, memory_only: bool
    ) -> int | None:
        for attempt in range(2):
            stream, reused = await peer.pool.connect()
            self._connections_opened += not reused
            request = Request(key, self._block_size, memory_only, time.time_ns(), os.urandom(16))
            wire = protocol.encode_request(request, self._secret)
            clean = False
            try:
                checksum = await exchange(
                    stream, request, wire, buffer, timeout_s=self._timeout_s, limiter=self._limiter
                )
                clean = True
                return checksum
            except Unanswered as error:
                if reused and attempt == 0:
                    continue  # a kept-alive connection the peer had closed: once more, fresh
                if error.reset:
                    raise PeerError("connection reset before an answer", kind="closed") from None
                raise PeerError(
                    "the peer closed the connection without answering (authentication?)",
                    kind="auth",
                ) from None
            finally:
                peer.pool.release(stream, clean=clean)
        raise AssertionError("unreachable")

    def _mark_failed(self, peer: Peer, error: PeerError) -> None:
        if not peer.health.failed(trio.current_time()):
            return  # already down: concurrent failures do not stretch the backoff
        peer.pool.close_idle()
        if error.kind == "block_size":
            if peer.member not in self._other_block_size:
                self._other_block_size.add(peer.member)
                log.warning(
                    "peer %s uses another --block-size than this instance's %d bytes; "
                    "it is asked only after a backoff (up to %gs)",
                    peer.member,
                    self._block_size,
                    BACKOFF_MAX_S,
                )
        elif peer.health.failures == 1:
            event("peer_down", peer=peer.member, kind=error.kind, error=str(error))

    def close(self) -> None:
        self._router.close()

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
            peer_errors_block_size=errors["block_size"],
            peer_holder_fetches=self._holder_fetches,
            peer_holder_hits=self._holder_hits,
            peers_down=sum(peer.is_down(now) for peer in self._router.peers.values()),
            peer_connections_opened=self._connections_opened,
        )
