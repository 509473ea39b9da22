"""A TCP proxy between peers that injects faults into their answers (for tests).

Put it between two daemons (``--peer 127.0.0.1:<proxy port>``) and switch
`mode` at any time; each answer (response frame) is treated by the mode in
force when its header arrives:

- ``pass``: forward everything unchanged.
- ``drop``: forward the header and half the payload, then kill both connections.
- ``stall``: stop forwarding answers; hold the connection open.
- ``flip``: flip one byte in the middle of the payload.
- ``version``: rewrite the answer's mtime: a block of another file version.
- ``refuse``: reset new connections at once, and existing ones at their next answer.

`FaultProxy` is a trio service (``await nursery.start(proxy.run)``);
`BackgroundFaultProxy` runs one in a thread for synchronous tests.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

import trio

from memcachefs import protocol

MODES = ("pass", "drop", "stall", "flip", "version", "refuse")
_MTIME_OFFSET = 4 + 1 + 1 + 2 + 8  # magic, version, status, path_len, size
_CHUNK = 1 << 20


class FaultProxy:
    def __init__(self, target: tuple[str, int], mode: str = "pass") -> None:
        self.target = target
        self.mode = mode
        self.port = 0
        self.connections = 0
        self.answers = 0
        self.faults = 0

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        self._mode = mode

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        if self.mode == "refuse":
            self.faults += 1
            _reset(downstream)
            return
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            _reset(downstream)
            return
        except BaseException:
            _reset(downstream)
            raise
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._requests, downstream, upstream, nursery.cancel_scope)
                nursery.start_soon(self._answers, upstream, downstream, nursery.cancel_scope)
        finally:
            _reset(downstream)
            _reset(upstream)

    async def _requests(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(_CHUNK):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    async def _answers(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                head = await _receive_exactly(source, protocol.RESPONSE_HEADER_BYTES)
                if head is None:
                    break
                response = protocol.parse_response_header(head, max_payload=1 << 32)
                mode = self.mode
                self.answers += 1
                if mode != "pass":
                    self.faults += 1
                if mode == "refuse":
                    break
                if mode == "stall":
                    await trio.sleep_forever()
                if mode == "version":
                    mtime = struct.unpack_from("!q", head, _MTIME_OFFSET)[0]
                    struct.pack_into("!q", head, _MTIME_OFFSET, mtime + 1)
                await sink.send_all(head)
                path = await _receive_exactly(source, response.path_len)
                if path is None:
                    break
                await sink.send_all(path)
                payload = await _receive_exactly(source, response.payload_len)
                if payload is None:
                    break
                if mode == "drop":
                    await sink.send_all(payload[: len(payload) // 2])
                    break
                if mode == "flip" and payload:
                    payload[len(payload) // 2] ^= 0xFF
                await sink.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except protocol.ProtocolError:
            pass
        scope.cancel()


async def _receive_exactly(stream: trio.SocketStream, count: int) -> bytearray | None:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(min(_CHUNK, count - len(data)))
        if not chunk:
            return None
        data += chunk
    return data


def _reset(stream: trio.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0): the other side sees the connection die."""
    sock = stream.socket
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class BackgroundFaultProxy:
    """A FaultProxy running in its own thread; a context manager for sync tests."""

    def __init__(self, target: tuple[str, int], mode: str = "pass") -> None:
        self.proxy = FaultProxy(target, mode)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    @property
    def mode(self) -> str:
        return self.proxy.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.proxy.mode = mode  # a plain attribute: read by the proxy at each answer

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            await nursery.start(self.proxy.run)
            self._ready.set()

    def __enter__(self) -> BackgroundFaultProxy:
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._scope is not None and self._token is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(10)
