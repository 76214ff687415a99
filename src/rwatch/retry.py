"""Every retry in rwatch: one table of policies, one tenacity builder, one tuple of transient errors.

A retry loop anywhere in the package is ``async for attempt in retrying(POLICY, stop=...): with attempt: ...``;
nothing else in ``src/rwatch`` writes its own ``while True`` around a failure. Each policy's wait is a
``HealthyResetWait``: doubling with jitter to a cap, and a flapping peer (one success between failures) does
not reset the pause, because the failure streak lives across calls and ends only when no failure happened for
``healthy_after`` seconds. The sleep between attempts wakes when the caller's stop signal is set and raises
``Stopping``. The stop path's bounded waits (``finish_or_abandon``, ``close_quietly``) live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    stop_never,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from rwatch.errors import TRANSIENT_ERRORS, RwatchError, Stopping

__all__ = [
    "BUS",
    "CMDB",
    "GAPS",
    "LIST",
    "SQLITE_OPEN",
    "STARTUP",
    "STORE",
    "SUPERVISOR",
    "TRANSIENT_ERRORS",
    "HealthyResetWait",
    "Policy",
    "close_quietly",
    "finish_or_abandon",
    "log_retry",
    "retrying",
    "sleep_or_stop",
]

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


@dataclass(frozen=True)
class Policy:
    """How one kind of call backs off: from ``initial`` seconds doubling to ``maximum``, the streak forgotten
    after ``healthy_after`` seconds without a failure (``inf``: never, for waits whose caller resets them)."""

    name: str
    initial: float
    maximum: float
    healthy_after: float = 120.0

    def wait(self, **kwargs: Any) -> HealthyResetWait:
        """A fresh wait with this policy's figures; its streak is the caller's to keep across calls."""
        return HealthyResetWait(initial=self.initial, maximum=self.maximum, healthy_after=self.healthy_after,
                                **kwargs)


# The policies, in one place. A sink's own figures come from its config (``retry_backoff``, ``retry_backoff_max``).
CMDB = Policy("cmdb", 0.8, 30.0)                 # the watch long-poll (DESIGN.md: 0.8 s doubling to 30 s)
LIST = Policy("list", 0.5, 15.0)                 # a resync's or doctor's list-API calls
STORE = Policy("store", 0.2, 10.0)               # the cursor store (SQLite, PostgreSQL)
STARTUP = Policy("startup", 0.5, 15.0)           # the first connection to the broker and the store
SUPERVISOR = Policy("supervisor", 1.0, 30.0)     # restarting a crashed task
BUS = Policy("bus", 0.1, 5.0, math.inf)          # (re)connecting to the broker, republishing unconfirmed events
GAPS = Policy("gaps", 5.0, 300.0)                # a gap whose resync failed: try it again later
SQLITE_OPEN = Policy("sqlite_open", 0.01, 0.5, math.inf)  # openers racing on a new SQLite file


def log_retry(log: Any, event: str, *, level: str = "warning", **extra: Any) -> Callable[[RetryCallState], None]:
    """A ``before_sleep`` hook: one warning (or ``level``) per failed attempt with the error's fields, the attempt
    number and the pause before the next one."""
    emit = getattr(log, level)

    def hook(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        fields = exc.fields() if isinstance(exc, RwatchError) else {"error": repr(exc)}
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        emit(event, **{**fields, **extra, "attempt": state.attempt_number, "retry_in": round(delay, 2)})

    return hook


def retrying(
    policy: Policy | wait_base,
    *,
    stop: asyncio.Event | Iterable[asyncio.Event] | None,
    on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    retry_if: retry_base | None = None,
    until: Callable[[Any], bool] | None = None,
    attempts: int | None = None,
    within: float | None = None,
    before_sleep: Callable[[RetryCallState], Any] | None = None,
    fixed: float | None = None,
) -> AsyncRetrying:
    """The one retry loop: ``async for attempt in retrying(...): with attempt: ...``, or
    ``await retrying(...)(fn, *args)`` for one call (the form ``until`` needs, as it judges ``fn``'s result).

    ``policy`` is a row of the table above (a fresh wait) or a wait the caller keeps, so that its streak spans
    calls. An exception of ``on`` (default: the transient ones) is retried, anything else goes up at once, as
    does the last failure when ``attempts`` or ``within`` seconds run out. ``until`` retries while the result
    fails it (a lease another holder has). ``fixed`` pauses that long instead of backing off. The pause wakes
    when any ``stop`` event is set and raises ``Stopping`` instead of trying again."""
    stops = [] if stop is None else [stop] if isinstance(stop, asyncio.Event) else list(stop)
    wait: wait_base
    wait = _Fixed(fixed) if fixed is not None else policy.wait() if isinstance(policy, Policy) else policy
    retry: retry_base = retry_if or retry_if_exception_type(on)
    if until is not None:
        retry = retry | retry_if_result(lambda result: not until(result))
    ends: list[stop_base] = []
    if attempts is not None:
        ends.append(stop_after_attempt(attempts))
    if within is not None:
        ends.append(stop_after_delay(within))
    return AsyncRetrying(
        wait=wait,
        retry=retry,
        stop=stop_any(*ends) if ends else stop_never,
        sleep=_stoppable_sleep(stops),
        before_sleep=before_sleep,
        reraise=True,
    )


class _Fixed(wait_base):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.seconds


def _stoppable_sleep(stops: list[asyncio.Event]) -> Callable[[float], Awaitable[None]]:
    async def sleep(seconds: float) -> None:
        if not stops:
            await asyncio.sleep(seconds)
            return
        if len(stops) == 1:
            stopped = await sleep_or_stop(seconds, stops[0])
        else:
            stopped = await _sleep_or_any(seconds, stops)
        if stopped:
            raise Stopping("stopping")

    return sleep


async def _sleep_or_any(seconds: float, stops: list[asyncio.Event]) -> bool:
    if any(s.is_set() for s in stops):
        return True
    waiters = [asyncio.ensure_future(s.wait()) for s in stops]
    try:
        done, _ = await asyncio.wait(waiters, timeout=max(seconds, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return bool(done)


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
