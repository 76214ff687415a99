"""Backoff: 0.8 s doubling to 30 s with jitter; the streak survives a flapping server, resets after 2 min."""

from __future__ import annotations

import asyncio
import random

import pytest

from rwatch.retry import HealthyResetWait, finish_or_abandon, sleep_or_stop


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_doubles_to_the_cap_with_jitter_inside_bounds() -> None:
    wait = HealthyResetWait(clock=FakeClock(), rng=random.Random(1))
    delays = [wait.next_delay() for _ in range(10)]
    ceilings = [min(30.0, 0.8 * 2**n) for n in range(10)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0 and delays[-1] >= 15.0


def test_streak_survives_short_health_and_resets_after_two_minutes() -> None:
    clock = FakeClock()
    wait = HealthyResetWait(clock=clock, rng=random.Random(2))
    for _ in range(5):
        wait.next_delay()
        clock.now += 10  # one success in between: still flapping
    assert wait.streak == 5
    clock.now += 121
    assert wait.next_delay() <= 0.8
    assert wait.streak == 1


async def test_sleep_or_stop_wakes_on_stop() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_soon(stop.set)
    assert await sleep_or_stop(60, stop) is True
    assert await sleep_or_stop(0, asyncio.Event()) is False


async def test_finish_or_abandon_waits_for_the_task_until_stop_then_a_grace() -> None:
    stop = asyncio.Event()
    quick = asyncio.ensure_future(asyncio.sleep(0.01, "done"))
    assert await finish_or_abandon(quick, stop, grace=0.0) is True
    assert quick.result() == "done"

    stop.set()  # stopping: a task finishing inside the grace still finishes
    late = asyncio.ensure_future(asyncio.sleep(0.05, "late"))
    assert await finish_or_abandon(late, stop, grace=1.0) is True

    hung = asyncio.ensure_future(asyncio.Event().wait())
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await finish_or_abandon(hung, stop, grace=0.1) is False
    assert hung.cancelled() and loop.time() - started < 1.0


async def test_finish_or_abandon_takes_the_task_along_when_its_caller_is_cancelled() -> None:
    hung = asyncio.ensure_future(asyncio.Event().wait())
    caller = asyncio.ensure_future(finish_or_abandon(hung, asyncio.Event(), grace=10))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0)
    assert hung.cancelled()


# -- the one retry builder --------------------------------------------------------------------------------------

from rwatch.errors import PermanentError, Stopping, TransientError  # noqa: E402
from rwatch.retry import Policy, log_retry, retrying  # noqa: E402

FAST = Policy("test", 0.001, 0.002)


async def test_retrying_retries_transient_errors_and_returns_the_result() -> None:
    calls = 0
    async for attempt in retrying(FAST, stop=asyncio.Event()):
        with attempt:
            calls += 1
            if calls < 3:
                raise TransientError("flaky")
    assert calls == 3
    assert attempt.retry_state.attempt_number == 3


async def test_retrying_lets_other_errors_through_at_once() -> None:
    calls = 0

    async def refuse() -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("no")

    with pytest.raises(PermanentError):
        await retrying(FAST, stop=asyncio.Event())(refuse)
    assert calls == 1


async def test_retrying_gives_up_after_its_attempts_with_the_last_error() -> None:
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise TransientError(str(calls))

    with pytest.raises(TransientError, match="3"):
        await retrying(FAST, stop=asyncio.Event(), attempts=3)(fail)
    assert calls == 3


async def test_retrying_stops_its_pause_when_the_stop_signal_is_set() -> None:
    stop = asyncio.Event()
    slow = Policy("slow", 60.0, 60.0)

    async def follow() -> None:
        async for attempt in retrying(slow, stop=stop):
            with attempt:
                raise TransientError("down")

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    stop.set()
    with pytest.raises(Stopping):
        await asyncio.wait_for(task, 5)


async def test_retrying_any_of_several_stop_signals_stops_it() -> None:
    first, second = asyncio.Event(), asyncio.Event()
    second.set()

    async def fail() -> None:
        raise TransientError("down")

    with pytest.raises(Stopping):
        await retrying(Policy("slow", 60.0, 60.0), stop=[first, second])(fail)


async def test_retrying_until_a_result_is_acceptable_at_a_fixed_pause() -> None:
    answers = iter([None, None, 7])

    async def ask() -> int | None:
        return next(answers)

    got = await retrying(FAST, stop=asyncio.Event(), until=lambda r: r is not None, fixed=0.001)(ask)
    assert got == 7


async def test_a_kept_wait_carries_its_streak_across_calls() -> None:
    wait = FAST.wait(clock=FakeClock())
    for _ in range(2):
        calls = 0
        async for attempt in retrying(wait, stop=asyncio.Event()):
            with attempt:
                calls += 1
                if calls < 2:
                    raise TransientError("flap")
    assert wait.streak == 2  # one success between failures did not reset it


async def test_log_retry_names_the_error_the_attempt_and_the_pause() -> None:
    seen: list[tuple[str, dict[str, object]]] = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            seen.append((event, fields))

    calls = 0
    hook = log_retry(Log(), "thing_failed", api="x")
    async for attempt in retrying(Policy("t", 0.02, 0.04), stop=asyncio.Event(), before_sleep=hook):
        with attempt:
            calls += 1
            if calls < 2:
                raise TransientError("flaky", code=7)
    assert [e for e, _ in seen] == ["thing_failed"]
    fields = seen[0][1]
    assert fields["attempt"] == 1 and fields["api"] == "x" and fields["code"] == 7
    assert 0 < float(fields["retry_in"]) <= 0.04  # type: ignore[arg-type]
