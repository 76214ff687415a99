"""Backoff for calls to CMDB: 0.8 s doubling to 30 s with jitter, reset only after 2 min of health.

A flapping server (one success between failures) must not reset the pause to 0.8 s each time, so the
failure streak lives across calls and ends only when no failure happened for ``healthy_after`` seconds.
The retry loop itself is tenacity's; this module supplies its wait strategy and an interruptible sleep, and
the stop path's bounded waits (``finish_or_abandon``, ``close_quietly``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import RetryCallState
from tenacity.wait import wait_base

# One generator for every wait that brings none: ``random.Random()`` seeds itself from os.urandom (~12 us),
# and a wait is built per publish and per cursor save, almost always to never draw a delay.
_JITTER = random.Random()


class HealthyResetWait(wait_base):
    """A tenacity wait whose streak survives successful calls until the service stays healthy."""

    def __init__(
        self,
        initial: float = 0.8,
        maximum: float = 30.0,
        healthy_after: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.healthy_after = healthy_after
        self.clock = clock
        self.rng = rng or _JITTER
        self.streak = 0
        self._last_failure: float | None = None

    def next_delay(self) -> float:
        """Record a failure and return the pause before the next attempt."""
        now = self.clock()
        if self._last_failure is not None and now - self._last_failure > self.healthy_after:
            self.streak = 0
        self._last_failure = now
        ceiling = min(self.maximum, self.initial * 2**self.streak)
        self.streak += 1
        # "Equal jitter": never less than half the ceiling, so a storm of clients still spreads out.
        return float(ceiling / 2 + self.rng.uniform(0, ceiling / 2))

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.next_delay()


async def sleep_or_stop(seconds: float, stop: asyncio.Event) -> bool:
    """Sleep, waking early when ``stop`` is set. Returns True when stopping."""
    if stop.is_set():
        return True
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def finish_or_abandon(task: asyncio.Future[Any], stop: asyncio.Event, grace: float) -> bool:
    """Await ``task``; once ``stop`` is set it has ``grace`` seconds more, then it is cancelled (and awaited).

    True if it finished (its result or exception is then ``task``'s to give), False if it was abandoned. The
    stop path of everything that waits on the network: a peer that answers nothing cannot hold the process
    past ``run.shutdown_timeout`` (DESIGN.md invariant 6)."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace)
    except BaseException:
        task.cancel()  # the caller itself was cancelled: the task goes with it
        raise
    finally:
        stopping.cancel()
    if task.done():
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False


async def close_quietly(closing: Awaitable[Any], timeout: float) -> None:
    """Await a close handshake for at most ``timeout`` (``run.close_timeout``), whatever it raises: the peer may
    be gone or answer nothing, and the close must neither fail its caller nor hold the stop (invariant 6)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closing, timeout)
