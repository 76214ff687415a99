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
