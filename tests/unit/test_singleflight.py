"""One fill per key, shared by every caller, outliving the caller that started it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from memcachefs.errors import FillCancelled
from memcachefs.singleflight import SingleFlight


class CountingFill:
    """A fill that waits for `release` and counts how often it ran."""

    def __init__(self, result: object = "value", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.calls = 0
        self.started = trio.Event()
        self.release = trio.Event()

    async def __call__(self) -> object:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_callers_share_one_fill() -> None:
    fill = CountingFill(result=42)
    results: list[object] = []
    async with trio.open_nursery() as service:
        flight: SingleFlight[str, object] = SingleFlight(service)

        async def caller() -> None:
            results.append(await flight.do("k", fill))

        async with trio.open_nursery() as callers:
            for _ in range(10):
                callers.start_soon(caller)
            await fill.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert flight.in_flight("k")
            fill.release.set()
    assert results == [42] * 10
    assert fill.calls == 1
    stats = flight.statistics()
    assert stats.fills == 1
    assert stats.joined == 9
    assert stats.in_flight == 0
    assert not flight.in_flight("k")


async def test_different_keys_fill_separately() -> None:
    fills = {key: CountingFill(result=key) for key in "abc"}
    results: dict[str, object] = {}
    async with trio.open_nursery() as service:
        flight: SingleFlight[str, object] = SingleFlight(service)

        async def caller(key: str) -> None:
            results[key] = await flight.do(key, fills[key])

        async with trio.open_nursery() as callers:
            for key in fills:
                callers.start_soon(caller, key)
            await trio.testing.wait_all_tasks_blocked()
            assert flight.statistics().in_flight == 3
            for fill in fills.values():
                fill.release.set()
    assert results == {"a": "a", "b": "b", "c": "c"}
    assert flight.statistics().joined == 0


async def test_a_new_fill_starts_after_the_previous_one_finished() -> None:
    fill = CountingFill()
    fill.release.set()
    async with trio.open_nursery() as service:
        flight: SingleFlight[str, object] = SingleFlight(service)
        assert await flight.do("k", fill) == "value"
        assert await flight.do("k", fill) == "value"
    assert fill.calls == 2  # results are not cached: that is the store's job


async def test_error_is_shared_by_every_waiter() -> None:
    fill = CountingFill(error=OSError(5, "Input/output error"))
    errors: list[BaseException] = []
    async with trio.open_nursery() as service:
        flight: SingleFlight[str, object] = SingleFlight(service)

        async def caller() -> None:
            try:
                await flight.do("k", fill)
            except OSError as error:
                errors.append(error)

        async with trio.open_nursery() as callers:
            for _ in range(5):
                callers.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            fill.release.set()
    assert len(errors) == 5
    assert all(error.errno == 5 for error in errors)  # type: ignore[attr-defined]
    assert fill.calls == 1
    # The service nursery survived: a failed fill is not a crash of the service.


async def test_cancelling_the_first_caller_does_not_cancel_the_fill() -> None:
    fill = CountingFill(result="shared")
    async with trio.open_nursery() as service:
        flight: SingleFlight[str, object] = SingleFlight(service)
        first_cancelled = False

        async def first() -> None:
            nonlocal first_cancelled
            with trio.CancelScope() as scope:
                first_scope.append(scope)
                await flight.do("k", fill)
            first_cancelled = scope.cancelled_caught

        first_scope: list[trio.CancelScope] = []
        second_result: list[object] = []

        async def second() -> None:
            second_result.append(await flight.do("k", fill))

        async with trio.open_nursery() as callers:
            callers.start_soon(first)
            await fill.started.wait()
            callers.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            first_scope[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert flight.in_flight("k")  # the fill is still running for `second`
            fill.release.set()
    assert first_cancelled
    assert second_result == ["shared"]
    assert fill.calls == 1


async def test_cancelled_fill_gives_fill_cancelled_to_waiters() -> None:
    fill = CountingFill()
    outcomes: list[BaseException] = []
    async with trio.open_nursery() as service_parent:
        # The fills run in their own nursery, which a stopping daemon cancels.
        service_scope = trio.CancelScope()

        async def service(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with service_scope:
                async with trio.open_nursery() as nursery:
                    task_status.started(nursery)
                    await trio.sleep_forever()

        nursery = await service_parent.start(service)
        flight: SingleFlight[str, object] = SingleFlight(nursery)

        async def waiter() -> None:
            with pytest.raises(FillCancelled) as caught:
                await flight.do("k", fill)
            outcomes.append(caught.value)

        async with trio.open_nursery() as waiters:
            for _ in range(3):
                waiters.start_soon(waiter)
            await fill.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            service_scope.cancel()
    assert len(outcomes) == 3
    assert not flight.in_flight("k")


async def test_start_never_waits_and_reuses_the_running_fill() -> None:
    fill = CountingFill(result=1)
    async with trio.open_nursery() as service:
        flight: SingleFlight[str, object] = SingleFlight(service)
        call = flight.start("k", fill)
        assert flight.start("k", fill) is call
        assert flight.in_flight("k")
        result = None

        async def joiner() -> None:
            nonlocal result
            result = await flight.do("k", fill)

        service.start_soon(joiner)
        await trio.testing.wait_all_tasks_blocked()
        fill.release.set()
        await call.done.wait()
    assert result == 1
    assert fill.calls == 1
    assert flight.statistics().joined == 1
