"""Connections to one peer, kept alive, and one request/response exchange on them.

A connection is used by one task at a time: `connect` hands out an idle one
(or opens a new one), `release` takes it back if the exchange ended cleanly.
`exchange` sends a request and receives the answer's payload straight into
the caller's buffer (in a worker thread for large payloads), verifying that
it answers this request and carries this key, and checking its xxh3.
"""

from __future__ import annotations

import trio
import xxhash

from memcachefs import protocol
from memcachefs.errors import PeerError
from memcachefs.keys import BlockKey
from memcachefs.membership import split_member_id
from memcachefs.peers.wire import Closed, receive_exactly, receive_in_thread
from memcachefs.protocol import (
    BLOCK_SIZE,
    ERROR,
    MISS,
    RESPONSE_HEADER_BYTES,
    ProtocolError,
    Request,
)

MAX_IDLE_CONNECTIONS_PER_PEER = 8
THREADED_PAYLOAD_BYTES = 256 * 1024  # larger payloads are received in a worker thread


class Unanswered(Exception):
    """The peer closed (or reset) the connection before sending any answer."""

    def __init__(self, reset: bool) -> None:
        super().__init__("connection closed before an answer")
        self.reset = reset


class Pool:
    def __init__(self, member: str) -> None:
        self.member = member
        self.host, self.port = split_member_id(member)
        self.idle: list[trio.SocketStream] = []

    async def connect(self) -> tuple[trio.SocketStream, bool]:
        """A connection and whether it was kept alive (else just opened)."""
        if self.idle:
            return self.idle.pop(), True
        try:
            stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as error:
            raise PeerError(f"connect to {self.member}: {error}", kind="refused") from None
        return stream, False

    def release(self, stream: trio.SocketStream, *, clean: bool) -> None:
        if clean and len(self.idle) < MAX_IDLE_CONNECTIONS_PER_PEER:
            self.idle.append(stream)
        else:
            stream.socket.close()

    def close_idle(self) -> None:
        for stream in self.idle:
            stream.socket.close()
        self.idle.clear()


async def exchange(
    stream: trio.SocketStream,
    request: Request,
    wire: bytes,
    buffer: memoryview,
    *,
    timeout_s: float,
    limiter: trio.CapacityLimiter,
) -> int | None:
    """Send `wire` (the encoded `request`); the payload's checksum, or None for a miss.

    Unanswered if the connection ends before any answer; PeerError otherwise.
    """
    sock = stream.socket
    try:
        await stream.send_all(wire)
    except trio.BrokenResourceError as error:
        raise Unanswered(reset=True) from error
    head = bytearray(RESPONSE_HEADER_BYTES)
    try:
        await receive_exactly(sock, memoryview(head))
    except Closed as closed:
        if closed.received == 0:
            raise Unanswered(closed.reset) from None
        raise PeerError("connection closed mid-answer", kind="closed") from None
    response = protocol.parse_response_header(head, max_payload=len(buffer))
    path = bytearray(response.path_len)  # bounded by the header check
    try:
        await receive_exactly(sock, memoryview(path))
    except Closed:
        raise PeerError("connection closed mid-answer", kind="closed") from None
    if response.nonce != request.nonce:
        raise ProtocolError("an answer to another request")
    key: BlockKey = request.key
    version = key.version
    answered = (bytes(path), response.size, response.mtime_ns, response.index)
    if answered != (version.relpath, version.size, version.mtime_ns, key.index):
        raise PeerError("an answer for another block or file version", kind="version")
    if response.status == MISS:
        return None
    if response.status == ERROR:
        raise PeerError("the peer could not produce the block", kind="remote")
    if response.status == BLOCK_SIZE:
        raise PeerError("the peer uses another --block-size", kind="block_size")
    if response.payload_len != len(buffer):
        raise ProtocolError("payload length differs from the block length")
    remaining_s = min(timeout_s, trio.current_effective_deadline() - trio.current_time())
    try:
        if len(buffer) >= THREADED_PAYLOAD_BYTES:
            checksum = await trio.to_thread.run_sync(
                receive_in_thread, sock.fileno(), buffer, remaining_s, limiter=limiter
            )
        else:
            await receive_exactly(sock, buffer)
            checksum = xxhash.xxh3_64_intdigest(buffer)
    except Closed:
        raise PeerError("connection closed mid-transfer", kind="closed") from None
    if checksum != response.checksum:
        raise PeerError("payload checksum mismatch", kind="checksum")
    return checksum
