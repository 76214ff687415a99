"""Projections: sinks fed by a mirror's commits, not by queues, that keep a downstream system equal to its topology.

prom_sd (a file_sd file and ``/sd``), the Ansible inventory file and Zabbix are each a function of the mirror's
``rwatch_topology`` view. A projection registers a listener on its mirror; every committed apply or sweep marks
it dirty, and one task re-projects: at once after a quiet spell, then at most once per ``debounce`` (start to
start) while changes keep coming, and never more than half the time (a projection that worked t seconds in this
process, reading and computing, is followed by t idle, so the mirror it reads keeps applying). So a burst costs
one projection at its start and one after its end, and the downstream system is never more than one projection
behind. A failed projection is logged, counted and tried again after ``debounce`` doubling up to ``retry_max``, or
at the next change if that comes first. ``apply`` and ``sweep`` do nothing: the mirror applies and sweeps, and its
commit re-projects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter

from rwatch.logs import get_logger

if TYPE_CHECKING:
    from rwatch.events import Event, ResyncMark
    from rwatch.sinks.base import TopologyRow

RETRY_MAX_SECONDS = 30.0
IDLE_SHARE = 1.0  # after a projection of t seconds, at least IDLE_SHARE * t idle: at most half of the process


def pause_after(took: float, local: float | None, debounce: float) -> float:
    """The idle after a projection of ``took`` seconds, ``local`` of them working in this process (None: all): the
    rest of ``debounce`` counted start to start, and at least ``IDLE_SHARE`` of the local work."""
    worked = took if local is None else min(took, local)
    return max(debounce - took, worked * IDLE_SHARE)


class TopologySource(Protocol):
    """What a projection needs of its mirror."""

    def add_listener(self, callback: Callable[[], None]) -> None: ...

    async def topology(self, tenant: str | None = None) -> list[TopologyRow]: ...


class ProjectionFailed(Exception):
    """A projection failed in a way worth its own log event (``event``); ``cause`` is what went wrong."""

    def __init__(self, event: str, cause: BaseException) -> None:
        super().__init__(f"{event}: {cause!r}")
        self.event = event
        self.cause = cause


class Projection:
    """The listener, the debounced loop and the retry of a projection sink; subclasses write ``project``."""

    kind = "projection"

    def __init__(self, name: str, source: TopologySource, *, debounce: float,
                 renders: Counter, errors: Counter, retry_max: float = RETRY_MAX_SECONDS) -> None:
        self.name = name
        self._source = source
        self._debounce = debounce
        self._retry_max = retry_max
        self._dirty = False
        self._dirty_since: float | None = None  # monotonic time of the oldest change not projected yet
        self._failures = 0
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._projecting = asyncio.Lock()  # one at a time: an older projection must not land after a newer one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = get_logger(f"rwatch.sinks.{self.kind}", sink=name)
        self._renders = renders.labels(name)
        self._errors = errors.labels(name)
        # Of the last projection, the seconds spent working in this process (reading the mirror, computing),
        # when the subclass tells (``project`` sets it); None: all of it.
        self.local_seconds: float | None = None

    async def project(self) -> None:
        """Read the topology and make the downstream system equal to it; raise on failure."""
        raise NotImplementedError

    # --- the Sink protocol ---------------------------------------------------------------------------------

    async def open(self) -> None:
        # Listener first: a commit during the first projection marks it dirty, and the loop projects again.
        self._loop = asyncio.get_running_loop()
        self._source.add_listener(self._on_change)
        await self.render_once()
        self._task = asyncio.create_task(self._run(), name=f"{self.kind}:{self.name}")

    async def apply(self, events: Sequence[Event]) -> None:
        """Nothing to do: a projection follows its mirror, which calls ``_on_change`` after commits."""

    async def sweep(self, mark: ResyncMark) -> int:
        """Nothing to do: the mirror sweeps, and its commit re-projects."""
        return 0

    async def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._dirty:
            await self.render_once()

    # --- the loop ------------------------------------------------------------------------------------------

    def _on_change(self) -> None:
        # The mirror commits on the loop; should it ever call from a thread, hop onto the loop.
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or running is self._loop:
            self.mark_dirty()
        else:
            self._loop.call_soon_threadsafe(self.mark_dirty)

    def mark_dirty(self) -> None:
        """Project again soon (a change, or a subclass's own timer)."""
        self._dirty = True
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        self._wake.set()

    async def _run(self) -> None:
        """Project on change, at most once per ``debounce``; a failed projection is tried again after a pause that
        doubles, or at the next change if that comes first: the loop waits on changes, and a retry is only one of
        its wake-ups, so it is not a ``rwatch.retry`` policy."""
        # Ends when close() sets _closing (checked after every wake-up).
        while True:
            retry_in = min(self._retry_max, self._debounce * 2 ** self._failures) if self._failures else None
            try:
                await asyncio.wait_for(self._wake.wait(), retry_in)
            except TimeoutError:
                self._dirty = True  # the last projection failed and nothing changed since: try it again
            if self._closing.is_set():
                return
            self._wake.clear()
            if not self._dirty:
                continue
            started = time.monotonic()
            await self.render_once()
            # Once per debounce counted start to start, but idle at least as long as the projection worked here:
            # each one re-reads the whole mirror, and back to back in a burst they took the CPU (and the GIL) from
            # the mirror applying in the same process, which then fell behind its queue (chaos seed 6, invariant
            # 5). Time spent waiting on the downstream system (Zabbix's answers) takes nothing from the mirror.
            rest = pause_after(time.monotonic() - started, self.local_seconds, self._debounce)
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), rest)

    async def render_once(self) -> bool:
        """Project now; False (logged, counted, retried later) when that failed."""
        async with self._projecting:
            self._dirty = False
            since, self._dirty_since = self._dirty_since, None
            self._renders.inc()
            self.local_seconds = None
            try:
                await self.project()
            except ProjectionFailed as exc:
                self._restore(since)
                return self._failed(exc.event, exc.cause)
            except Exception as exc:
                self._restore(since)
                return self._failed(f"{self.kind}_failed", exc)
            self._failures = 0
            self.projected(since)
            return True

    def projected(self, since: float | None) -> None:
        """A projection succeeded; ``since``: when the oldest change it carried was committed (None: none)."""

    def _restore(self, since: float | None) -> None:
        if since is not None and (self._dirty_since is None or since < self._dirty_since):
            self._dirty_since = since

    def _failed(self, what: str, exc: BaseException) -> bool:
        self._failures += 1
        self._errors.inc()
        self._log.error(what, error=repr(exc), failures=self._failures, **self.failure_fields())
        return False

    def failure_fields(self) -> dict[str, object]:
        return {}
