"""The daemon's side of the control socket (see control.py): warm, check, evict, wait.

Every request runs in the daemon's nursery and only reads snapshots or starts
fills through the Warmer, so a client, however slow, cannot hold up a FUSE
request. A client that closes its connection cancels its request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from memcachefs.control import MAX_REQUEST_BYTES, encode, path_from_wire, path_to_wire
from memcachefs.errors import MountError
from memcachefs.keys import FileVersion
from memcachefs.warm import Warmer, WarmJob

log = logging.getLogger(__name__)

REQUEST_DEADLINE_S = 10.0  # to send the request line
PROGRESS_INTERVAL_S = 0.5
MAX_CLIENTS = 16


def open_control_socket(path: Path) -> socket.socket:
    """Bind the control socket (mode 0600); MountError in one line if it cannot be.

    The caller holds the mountpoint's lock, so a file left at `path` belongs to a
    dead daemon of this mountpoint: it is replaced."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        sock.listen(MAX_CLIENTS)
    except OSError as error:
        sock.close()
        raise MountError(f"cannot create the control socket {path}: {error.strerror}") from None
    return sock


class ControlServer:
    def __init__(
        self,
        sock: socket.socket,
        warmer: Warmer,
        startup_job: Callable[[], WarmJob | None],
    ) -> None:
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._warmer = warmer
        self._startup_job = startup_job
        self._clients = trio.CapacityLimiter(MAX_CLIENTS)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await self._listener.accept()
                nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream, self._clients:
            try:
                with trio.fail_after(REQUEST_DEADLINE_S):
                    request = await _read_request(stream)
                await self._dispatch(stream, request)
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away or sent nothing: nothing to answer
            except _BadRequest as error:
                await _send(stream, {"error": str(error)})

    async def _dispatch(self, stream: trio.SocketStream, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "wait":
            job = self._startup_job()
            if job is None:
                await _send(stream, {"done": WarmJob(finished=True).snapshot()})
                return
            await _with_progress(stream, job, job.wait_finished())
            return
        paths = request.get("paths")
        if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
            raise _BadRequest("a request needs 'paths', a list of strings")
        versions, problems = await self._versions([path_from_wire(path) for path in paths])
        if op == "warm":
            job = WarmJob(errors=problems)
            await _with_progress(stream, job, self._warmer.warm(versions, job))
        elif op in ("check", "evict"):
            files = []
            for version in versions:
                if op == "check":
                    count = self._warmer.resident_bytes(version)
                else:
                    count = await self._warmer.evict(version)
                path = path_to_wire(version.relpath)
                files.append({"path": path, "size": version.size, "bytes": count})
            await _send(stream, {"done": {"files": files, "errors": _errors(problems)}})
        else:
            raise _BadRequest(f"unknown op {op!r}")

    async def _versions(self, relpaths: list[bytes]) -> tuple[list[FileVersion], dict[str, str]]:
        versions, problems = [], {}
        for relpath in relpaths:
            try:
                versions.append(await self._warmer.version(relpath))
            except OSError as error:
                problems[path_to_wire(relpath)] = error.strerror or str(error)
        return versions, problems


class _BadRequest(Exception):
    pass


async def _with_progress(stream: trio.SocketStream, job: WarmJob, work: Awaitable[Any]) -> None:
    """Run `work`, sending `job`'s progress meanwhile; a closed connection cancels it."""
    async with trio.open_nursery() as nursery:

        async def watch_the_client() -> None:
            while await stream.receive_some(4096):
                pass  # a client sends nothing after its request
            nursery.cancel_scope.cancel()

        async def report() -> None:
            while True:
                await _send(stream, {"progress": job.snapshot()})
                await trio.sleep(PROGRESS_INTERVAL_S)

        nursery.start_soon(watch_the_client)
        nursery.start_soon(report)
        await work
        nursery.cancel_scope.cancel()
    if not nursery.cancel_scope.cancelled_caught or job.finished:
        await _send(stream, {"done": job.snapshot()})


def _errors(problems: dict[str, str]) -> list[dict[str, str]]:
    return [{"path": path, "error": error} for path, error in problems.items()]


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise trio.BrokenResourceError("closed before a request")
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise _BadRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(data)
    except ValueError:
        raise _BadRequest("a request is one JSON object on one line") from None
    if not isinstance(request, dict):
        raise _BadRequest("a request is one JSON object on one line")
    return request


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(encode(message))  # BrokenResourceError once the client is gone
