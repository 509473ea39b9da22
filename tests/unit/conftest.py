"""Shared helpers for the unit tests: deterministic payloads and counting fakes."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import xxhash

from memcachefs.keys import BlockKey, FileVersion


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes: a misplaced block shows up as a mismatch."""
    return random.Random(seed).randbytes(size)


class FakeSource:
    """Stands in for Source.read_block; counts reads and can hold them at a gate.

    `files` maps a relpath to its bytes. While `gate` is set to an unset Event,
    every read waits on it, so a test can see what piles up behind a slow source.
    """

    def __init__(self, files: dict[bytes, bytes]) -> None:
        self.files = files
        self.reads: list[BlockKey] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: trio.Event | None = None
        self.fail: Callable[[BlockKey], BaseException | None] = lambda key: None

    def version(self, relpath: bytes, mtime_ns: int = 1) -> FileVersion:
        return FileVersion(relpath, len(self.files[relpath]), mtime_ns)

    async def read_block(self, key: BlockKey, buffer: memoryview, block_size: int) -> int:
        self.reads.append(key)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await trio.lowlevel.checkpoint()
            error = self.fail(key)
            if error is not None:
                raise error
            start = key.offset(block_size)
            data = self.files[key.version.relpath][start : start + len(buffer)]
            buffer[: len(data)] = data
            return xxhash.xxh3_64_intdigest(data)
        finally:
            self.in_flight -= 1


class FakePeers:
    """A PeerFetcher that serves the blocks it holds and counts every request."""

    def __init__(self, block_size: int, files: dict[bytes, bytes] | None = None) -> None:
        self.block_size = block_size
        self.files = files or {}
        self.requests: list[BlockKey] = []

    async def fetch_into(self, key: BlockKey, buffer: memoryview) -> int | None:
        self.requests.append(key)
        await trio.lowlevel.checkpoint()
        data = self.files.get(key.version.relpath)
        if data is None:
            return None
        start = key.offset(self.block_size)
        chunk = data[start : start + len(buffer)]
        buffer[: len(chunk)] = chunk
        return xxhash.xxh3_64_intdigest(chunk)


async def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait until `condition()` holds (other tasks or worker threads make it so)."""
    with trio.move_on_after(timeout_s):
        while not condition():  # noqa: ASYNC110 (no event to wait on: polled)
            await trio.sleep(0.001)
        return
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


# Test modules here are not a package, so helpers reach them as fixtures.
@pytest.fixture
def wait_for() -> Callable[..., Awaitable[None]]:
    return _wait_for


@pytest.fixture
def make_payload() -> Callable[..., bytes]:
    return payload


@pytest.fixture
def fake_source_cls() -> type[FakeSource]:
    return FakeSource


@pytest.fixture
def fake_peers_cls() -> type[FakePeers]:
    return FakePeers
