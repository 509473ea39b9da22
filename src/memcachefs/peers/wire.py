"""Receiving into a caller's buffer, from the trio thread or a worker thread.

One receive loop (`_receive_steps`) fills a memoryview straight from the
socket's descriptor, with no intermediate copy; it yields whenever the socket
has nothing to read, and its two drivers wait differently: `receive_exactly`
on trio's I/O manager, `receive_in_thread` in `poll(2)` under a deadline (for
large payloads, so a transfer runs alongside the FUSE requests on the trio
thread; recv and xxh3 release the GIL).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator

import trio
import xxhash

from memcachefs.errors import PeerError


class Closed(Exception):
    """The connection ended (EOF or reset) after `received` bytes of a read."""

    def __init__(self, received: int, reset: bool) -> None:
        super().__init__(f"connection closed after {received} bytes")
        self.received = received
        self.reset = reset


def _receive_steps(fd: int, view: memoryview) -> Iterator[None]:
    """Fill `view` from the non-blocking socket `fd`; yields when it would block."""
    received = 0
    while received < len(view):
        try:
            count = os.readv(fd, [view[received:]])
        except BlockingIOError:
            yield
            continue
        except OSError:
            raise Closed(received, reset=True) from None
        if count == 0:
            raise Closed(received, reset=False)
        received += count


async def receive_exactly(sock: trio.socket.SocketType, view: memoryview) -> None:
    """Fill `view` from the socket on the trio thread; Closed if it ends first."""
    await trio.lowlevel.checkpoint_if_cancelled()
    for _ in _receive_steps(sock.fileno(), view):
        await trio.lowlevel.wait_readable(sock)
    await trio.lowlevel.cancel_shielded_checkpoint()  # a schedule point, as trio's recv


def receive_in_thread(fd: int, view: memoryview, timeout_s: float) -> int:
    """Fill `view` in a worker thread and return its xxh3-64; Closed if the socket ends.

    The caller owns the socket exclusively while this runs (one task per
    connection). Gives up with a timeout PeerError after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _ in _receive_steps(fd, view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerError("payload not received in time", kind="timeout")
        poller.poll(max(1, int(remaining * 1000)))
    return xxhash.xxh3_64_intdigest(view)
