"""The peer wire format (pure, sync): framing, authentication, replay protection.

One TCP connection carries any number of request/response exchanges, one at a
time (keep-alive). All integers are big-endian.

Request (client -> server)::

    header   magic "MCFQ", version u8, flags u8, path_len u16, block_size u32,
             size u64, mtime_ns i64, index u64, timestamp_ns u64, nonce 16 bytes
    path     path_len bytes: the file's path relative to the source root
    mac      32 bytes: HMAC-SHA256(secret, header + path)

Response (server -> client)::

    header   magic "MCFR", version u8, status u8, path_len u16, size u64,
             mtime_ns i64, index u64, nonce 16 bytes (the request's),
             payload_len u32, xxh3-64 of the payload u64
    path     path_len bytes (the key the payload belongs to)
    payload  payload_len bytes (only when status is HIT)

Statuses: HIT, MISS (not here, or another version of the file), ERROR (the
server could not produce the block), BLOCK_SIZE (the server uses another
block size: no block of this client's can come from it).

The request flag MEMORY_ONLY asks for a block only if the peer holds it in
memory (no fill from its source).

Every length is checked against a fixed maximum before anything is allocated.
A request whose MAC does not verify, whose timestamp is outside the replay
window, or whose nonce was seen within the window gets no answer at all: the
server closes the connection. Every listener has a cluster secret (config.py
refuses one without); a client configured without one computes the MAC under
an empty key, and no server accepts it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from memcachefs.errors import PeerError
from memcachefs.keys import MAX_BLOCK_BYTES, MAX_PATH_BYTES, MIN_BLOCK_BYTES, BlockKey, FileVersion

PROTOCOL_VERSION = 1
REQUEST_MAGIC = b"MCFQ"
RESPONSE_MAGIC = b"MCFR"
MAC_BYTES = 32
NONCE_BYTES = 16
REPLAY_WINDOW_S = 30.0
MAX_REMEMBERED_NONCES = 1_000_000

FLAG_MEMORY_ONLY = 0x01
_KNOWN_FLAGS = FLAG_MEMORY_ONLY

HIT, MISS, ERROR, BLOCK_SIZE = 0, 1, 2, 3  # BLOCK_SIZE: the server uses another block size
_STATUSES = (HIT, MISS, ERROR, BLOCK_SIZE)

_REQUEST = struct.Struct("!4sBBHIQqQQ16s")
_RESPONSE = struct.Struct("!4sBBHQqQ16sIQ")
REQUEST_HEADER_BYTES = _REQUEST.size
RESPONSE_HEADER_BYTES = _RESPONSE.size


class ProtocolError(PeerError):
    """Bytes that are not a well-formed frame."""

    kind = "protocol"


class AuthError(PeerError):
    """A request that is not authenticated (bad MAC, stale timestamp, replayed nonce)."""

    kind = "auth"


@dataclass(frozen=True, slots=True)
class Request:
    key: BlockKey
    block_size: int
    memory_only: bool
    timestamp_ns: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """A parsed request header; the path and MAC follow it on the wire."""

    raw: bytes
    flags: int
    path_len: int
    block_size: int
    size: int
    mtime_ns: int
    index: int
    timestamp_ns: int
    nonce: bytes

    @property
    def trailer_bytes(self) -> int:
        """Bytes still to read for this request: the path and the MAC."""
        return self.path_len + MAC_BYTES


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    status: int
    path_len: int
    size: int
    mtime_ns: int
    index: int
    nonce: bytes
    payload_len: int
    checksum: int


def _mac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def encode_request(request: Request, secret: bytes) -> bytes:
    version = request.key.version
    path = version.relpath
    if len(path) > MAX_PATH_BYTES:
        raise ProtocolError("path too long")
    if len(request.nonce) != NONCE_BYTES:
        raise ValueError("bad nonce length")
    header = _REQUEST.pack(
        REQUEST_MAGIC,
        PROTOCOL_VERSION,
        FLAG_MEMORY_ONLY if request.memory_only else 0,
        len(path),
        request.block_size,
        version.size,
        version.mtime_ns,
        request.key.index,
        request.timestamp_ns,
        request.nonce,
    )
    return header + path + _mac(secret, header + path)


def parse_request_header(data: bytes | bytearray | memoryview) -> RequestHeader:
    """Parse a request header (exactly REQUEST_HEADER_BYTES); ProtocolError if malformed."""
    if len(data) != REQUEST_HEADER_BYTES:
        raise ProtocolError("truncated request header")
    raw = bytes(data)
    (magic, version, flags, path_len, block_size, size, mtime_ns, index, timestamp_ns, nonce) = (
        _REQUEST.unpack(raw)
    )
    if magic != REQUEST_MAGIC or version != PROTOCOL_VERSION:
        raise ProtocolError("not a memcachefs peer request")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError("unknown request flags")
    if path_len > MAX_PATH_BYTES:
        raise ProtocolError("path too long")
    if not MIN_BLOCK_BYTES <= block_size <= MAX_BLOCK_BYTES:
        raise ProtocolError("bad block size")
    if size > (1 << 62):
        raise ProtocolError("bad file size")
    return RequestHeader(
        raw, flags, path_len, block_size, size, mtime_ns, index, timestamp_ns, nonce
    )


def finish_request(header: RequestHeader, trailer: bytes | bytearray, secret: bytes) -> Request:
    """Check the MAC over header + path; AuthError if it does not verify.

    The path is not validated here beyond its length: the server checks it with
    `source.validate_relpath` (and the source opens it safely in any case).
    """
    if len(trailer) != header.trailer_bytes:
        raise ProtocolError("truncated request")
    path = bytes(trailer[: header.path_len])
    mac = bytes(trailer[header.path_len :])
    if not hmac.compare_digest(mac, _mac(secret, header.raw + path)):
        raise AuthError("bad request MAC")
    return Request(
        key=BlockKey(FileVersion(path, header.size, header.mtime_ns), header.index),
        block_size=header.block_size,
        memory_only=bool(header.flags & FLAG_MEMORY_ONLY),
        timestamp_ns=header.timestamp_ns,
        nonce=header.nonce,
    )


def encode_response_header(
    key: BlockKey, nonce: bytes, status: int, payload_len: int = 0, checksum: int = 0
) -> bytes:
    version = key.version
    header = _RESPONSE.pack(
        RESPONSE_MAGIC,
        PROTOCOL_VERSION,
        status,
        len(version.relpath),
        version.size,
        version.mtime_ns,
        key.index,
        nonce,
        payload_len,
        checksum,
    )
    return header + version.relpath


def parse_response_header(data: bytes | bytearray | memoryview, max_payload: int) -> ResponseHeader:
    """Parse a response header; ProtocolError if malformed or announcing too much."""
    if len(data) != RESPONSE_HEADER_BYTES:
        raise ProtocolError("truncated response header")
    (magic, version, status, path_len, size, mtime_ns, index, nonce, payload_len, checksum) = (
        _RESPONSE.unpack(bytes(data))
    )
    if magic != RESPONSE_MAGIC or version != PROTOCOL_VERSION:
        raise ProtocolError("not a memcachefs peer response")
    if status not in _STATUSES:
        raise ProtocolError("unknown response status")
    if path_len > MAX_PATH_BYTES:
        raise ProtocolError("path too long")
    if payload_len > max_payload or (status != HIT and payload_len):
        raise ProtocolError("bad payload length")
    return ResponseHeader(status, path_len, size, mtime_ns, index, nonce, payload_len, checksum)


class ReplayGuard:
    """Refuses stale timestamps and nonces already seen within the window.

    A nonce is remembered for twice the window (a timestamp can be up to one
    window early or late), so a captured request cannot be replayed while its
    timestamp would still be accepted.
    """

    def __init__(
        self, window_s: float = REPLAY_WINDOW_S, max_nonces: int = MAX_REMEMBERED_NONCES
    ) -> None:
        self.window_ns = int(window_s * 1e9)
        self._max_nonces = max_nonces
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # nonce -> forget after (ns)

    def check(self, timestamp_ns: int, nonce: bytes, now_ns: int | None = None) -> None:
        now = time.time_ns() if now_ns is None else now_ns
        if abs(now - timestamp_ns) > self.window_ns:
            raise AuthError("request timestamp outside the replay window")
        self._forget(now)
        if nonce in self._seen:
            raise AuthError("replayed request nonce")
        if len(self._seen) >= self._max_nonces:
            # Full of fresh nonces: refusing is safer than forgetting one early.
            raise AuthError("too many requests within the replay window")
        self._seen[nonce] = now + 2 * self.window_ns

    def _forget(self, now_ns: int) -> None:
        while self._seen:
            nonce, forget_after = next(iter(self._seen.items()))
            if forget_after > now_ns:
                return
            del self._seen[nonce]

    def __len__(self) -> int:
        return len(self._seen)
