"""The peer wire format: round trips, malformed input, authentication, replay."""

from __future__ import annotations

import os
import struct
import time

import pytest

from memcachefs import protocol
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.protocol import (
    MAC_BYTES,
    REQUEST_HEADER_BYTES,
    RESPONSE_HEADER_BYTES,
    AuthError,
    ProtocolError,
    ReplayGuard,
    Request,
)

SECRET = b"cluster secret"
KEY = BlockKey(FileVersion(b"models/a.safetensors", 10 << 20, 1_700_000_000_123_456_789), 2)


def make_request(**changes: object) -> Request:
    fields: dict[object, object] = {
        "key": KEY,
        "block_size": 4 << 20,
        "memory_only": False,
        "timestamp_ns": time.time_ns(),
        "nonce": os.urandom(16),
    }
    fields.update(changes)
    return Request(**fields)  # type: ignore[arg-type]


def split(wire: bytes) -> tuple[protocol.RequestHeader, bytes]:
    header = protocol.parse_request_header(wire[:REQUEST_HEADER_BYTES])
    trailer = wire[REQUEST_HEADER_BYTES:]
    assert len(trailer) == header.trailer_bytes
    return header, trailer


@pytest.mark.parametrize("memory_only", [False, True])
def test_request_round_trip(memory_only: bool) -> None:
    request = make_request(memory_only=memory_only)
    header, trailer = split(protocol.encode_request(request, SECRET))
    assert protocol.finish_request(header, trailer, SECRET) == request


def test_request_with_negative_mtime_and_empty_secret() -> None:
    key = BlockKey(FileVersion(b"old", 1, -5), 0)
    request = make_request(key=key)
    header, trailer = split(protocol.encode_request(request, b""))
    assert protocol.finish_request(header, trailer, b"").key == key


def test_response_round_trip() -> None:
    nonce = os.urandom(16)
    wire = protocol.encode_response_header(KEY, nonce, protocol.HIT, 4 << 20, 0xDEADBEEF)
    header = protocol.parse_response_header(wire[:RESPONSE_HEADER_BYTES], max_payload=4 << 20)
    assert (header.status, header.payload_len, header.checksum) == (
        protocol.HIT,
        4 << 20,
        0xDEADBEEF,
    )
    assert (header.size, header.mtime_ns, header.index, header.nonce) == (
        KEY.version.size,
        KEY.version.mtime_ns,
        KEY.index,
        nonce,
    )
    assert wire[RESPONSE_HEADER_BYTES:] == KEY.version.relpath == wire[-header.path_len :]


def test_wrong_secret_is_refused() -> None:
    header, trailer = split(protocol.encode_request(make_request(), b"another secret"))
    with pytest.raises(AuthError):
        protocol.finish_request(header, trailer, SECRET)


def test_missing_secret_is_refused_by_a_server_with_one() -> None:
    header, trailer = split(protocol.encode_request(make_request(), b""))
    with pytest.raises(AuthError):
        protocol.finish_request(header, trailer, SECRET)


@pytest.mark.parametrize("offset", [6, 12, 20, 30, 40, 50, REQUEST_HEADER_BYTES + 3, -1])
def test_any_tampered_byte_fails_authentication(offset: int) -> None:
    wire = bytearray(protocol.encode_request(make_request(), SECRET))
    wire[offset] ^= 0x01
    try:
        header = protocol.parse_request_header(wire[:REQUEST_HEADER_BYTES])
    except ProtocolError:
        return  # the header itself no longer parses: refused just the same
    with pytest.raises((AuthError, ProtocolError)):
        protocol.finish_request(header, wire[REQUEST_HEADER_BYTES:], SECRET)


def test_truncated_and_garbage_requests_are_refused() -> None:
    wire = protocol.encode_request(make_request(), SECRET)
    with pytest.raises(ProtocolError):
        protocol.parse_request_header(wire[: REQUEST_HEADER_BYTES - 1])
    header = protocol.parse_request_header(wire[:REQUEST_HEADER_BYTES])
    with pytest.raises(ProtocolError):
        protocol.finish_request(header, wire[REQUEST_HEADER_BYTES:-1], SECRET)
    for garbage in (b"\0" * REQUEST_HEADER_BYTES, os.urandom(REQUEST_HEADER_BYTES)):
        with pytest.raises(ProtocolError):
            protocol.parse_request_header(garbage)
    http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(REQUEST_HEADER_BYTES, b"\0")
    with pytest.raises(ProtocolError):
        protocol.parse_request_header(http)


def _request_header(**fields: int) -> bytes:
    values = {
        "version": protocol.PROTOCOL_VERSION,
        "flags": 0,
        "path_len": 5,
        "block_size": 4 << 20,
        "size": 1,
        **fields,
    }
    return struct.pack(
        "!4sBBHIQqQQ16s",
        b"MCFQ",
        values["version"],
        values["flags"],
        values["path_len"],
        values["block_size"],
        values["size"],
        0,
        0,
        0,
        b"\0" * 16,
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"path_len": 65535},  # absurd length: refused before reading (or allocating) it
        {"path_len": 4097},
        {"block_size": 0},
        {"block_size": 0xFFFFFFFF},
        {"version": 99},
        {"flags": 0x80},
        {"size": 1 << 63},
    ],
)
def test_absurd_request_fields_are_refused_from_the_header_alone(fields: dict[str, int]) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_request_header(_request_header(**fields))


def test_largest_legal_path_is_accepted() -> None:
    header = protocol.parse_request_header(_request_header(path_len=4096))
    assert header.trailer_bytes == 4096 + MAC_BYTES


@pytest.mark.parametrize(
    ("status", "payload_len", "max_payload"),
    [
        (protocol.HIT, (4 << 20) + 1, 4 << 20),  # more than the block the client expects
        (protocol.HIT, 0xFFFFFFFF, 4 << 20),
        (protocol.MISS, 10, 4 << 20),  # a miss carries no payload
        (protocol.BLOCK_SIZE, 10, 4 << 20),
        (7, 0, 4 << 20),
    ],
)
def test_bad_responses_are_refused_from_the_header_alone(
    status: int, payload_len: int, max_payload: int
) -> None:
    wire = protocol.encode_response_header(KEY, b"\0" * 16, status, payload_len, 0)
    with pytest.raises(ProtocolError):
        protocol.parse_response_header(wire[:RESPONSE_HEADER_BYTES], max_payload=max_payload)


def test_garbage_responses_are_refused() -> None:
    for garbage in (b"\0" * RESPONSE_HEADER_BYTES, os.urandom(RESPONSE_HEADER_BYTES), b"MCFR"):
        with pytest.raises(ProtocolError):
            protocol.parse_response_header(garbage, max_payload=4 << 20)


def test_replayed_nonce_is_refused() -> None:
    guard = ReplayGuard(window_s=30)
    now = time.time_ns()
    guard.check(now, b"a" * 16, now_ns=now)
    with pytest.raises(AuthError):
        guard.check(now, b"a" * 16, now_ns=now + 1)
    guard.check(now, b"b" * 16, now_ns=now + 1)


def test_stale_and_future_timestamps_are_refused() -> None:
    guard = ReplayGuard(window_s=30)
    now = time.time_ns()
    with pytest.raises(AuthError):
        guard.check(now - 31 * 10**9, b"a" * 16, now_ns=now)
    with pytest.raises(AuthError):
        guard.check(now + 31 * 10**9, b"b" * 16, now_ns=now)
    guard.check(now - 29 * 10**9, b"c" * 16, now_ns=now)


def test_nonces_are_forgotten_only_after_their_timestamps_expire() -> None:
    guard = ReplayGuard(window_s=30)
    start = time.time_ns()
    guard.check(start, b"a" * 16, now_ns=start)
    # Still inside the window: remembered.
    with pytest.raises(AuthError):
        guard.check(start, b"a" * 16, now_ns=start + 29 * 10**9)
    # Far later, the old nonce is forgotten (and its timestamp is refused anyway).
    later = start + 61 * 10**9
    guard.check(later, b"z" * 16, now_ns=later)
    assert len(guard) == 1
    with pytest.raises(AuthError):
        guard.check(start, b"a" * 16, now_ns=later)


def test_a_full_guard_refuses_rather_than_forgets() -> None:
    guard = ReplayGuard(window_s=30, max_nonces=2)
    now = time.time_ns()
    guard.check(now, b"a" * 16, now_ns=now)
    guard.check(now, b"b" * 16, now_ns=now)
    with pytest.raises(AuthError):
        guard.check(now, b"c" * 16, now_ns=now)
