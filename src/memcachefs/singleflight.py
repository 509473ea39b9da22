"""One fill in flight per key; every caller waiting on that key shares its result.

The fill runs in a nursery owned by the service, not by the first caller, so
cancelling the reader that started it (a killed process, a timeout) does not
cancel the fill the others are waiting for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from memcachefs.errors import FillCancelled

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Call(Generic[V]):
    __slots__ = ("done", "error", "result", "started_at")

    def __init__(self) -> None:
        self.started_at = trio.current_time()
        self.done = trio.Event()
        self.result: V | None = None
        self.error: BaseException | None = None


@dataclass(frozen=True)
class SingleFlightStatistics:
    in_flight: int
    fills: int
    joined: int  # callers that shared a fill started by someone else


class SingleFlight(Generic[K, V]):
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._calls: dict[K, _Call[V]] = {}
        self._fills = 0
        self._joined = 0

    def in_flight(self, key: K) -> bool:
        return key in self._calls

    def running_for_s(self, key: K) -> float:
        """How long the fill for `key` has been running (0 if none is)."""
        call = self._calls.get(key)
        return 0.0 if call is None else trio.current_time() - call.started_at

    def start(self, key: K, fill: Callable[[], Awaitable[V]]) -> _Call[V]:
        """Start a fill for `key` unless one runs already; never waits."""
        call = self._calls.get(key)
        if call is None:
            call = _Call()
            self._calls[key] = call
            self._fills += 1
            self._nursery.start_soon(self._run, key, call, fill)
        return call

    async def do(self, key: K, fill: Callable[[], Awaitable[V]]) -> V:
        """The result of the one fill for `key`, starting it if none is in flight."""
        if key in self._calls:
            self._joined += 1
        call = self.start(key, fill)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    async def _run(self, key: K, call: _Call[V], fill: Callable[[], Awaitable[V]]) -> None:
        try:
            call.result = await fill()
        except Exception as error:  # handed to every waiter; they decide what it means
            call.error = error
        except BaseException:  # cancelled: waiters must not mistake it for a result
            call.error = FillCancelled("fill cancelled")
            raise
        finally:
            del self._calls[key]
            call.done.set()

    def statistics(self) -> SingleFlightStatistics:
        return SingleFlightStatistics(
            in_flight=len(self._calls), fills=self._fills, joined=self._joined
        )
