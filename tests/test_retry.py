"""Backoff: 0.8 s doubling to 30 s with jitter; the streak survives a flapping server, resets after 2 min."""

from __future__ import annotations

import asyncio
import random

from rwatch.retry import HealthyResetWait, sleep_or_stop


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
