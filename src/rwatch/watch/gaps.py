"""Gaps of a resource's history: recorded when the watcher loses some, filled by reconciliation during the term.

A gap is filled only by a resync that started after it was recorded: the snapshot then postdates every change the
gap lost. A failed resync is tried again under the GAPS policy; a new gap does not wait out that pause.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rwatch import metrics as m
from rwatch.errors import ResyncUnsupported, Stopping
from rwatch.events import iso_utc
from rwatch.retry import GAPS, retrying
from rwatch.store.base import CursorStore
from rwatch.store.records import Gap
from rwatch.watch.resync import Resyncer, fill_gaps
from rwatch.watch.storing import stored


class _Failed(Exception):
    """Internal: the resync failed (logged and counted by the resyncer); the gaps stay open for the next try."""


class Gaps:
    def __init__(self, store: CursorStore, *, tenant: str, resource: str, resyncer: Resyncer | None, every: float,
                 log: Any) -> None:
        self.store = store
        self.tenant = tenant
        self.resource = resource
        self.resyncer = resyncer
        self.every = every  # watch.resync_every: the periodic safety net (0: none)
        self.log = log
        self.recorded = asyncio.Event()  # set when a gap is recorded: reconciliation starts at once
        self.pause = GAPS.wait()  # the streak of failed resyncs, forgotten after a success

    async def record(self, start: float, end: float, reason: str, *, stop: asyncio.Event) -> None:
        gap = await stored(lambda: self.store.add_gap(self.tenant, self.resource, start, end, reason),
                           stop=stop, log=self.log)
        m.CURSOR_GAPS.labels(self.resource).inc()
        m.CURSOR_GAP_SECONDS.labels(self.resource).inc(max(0.0, end - start))
        self.recorded.set()
        self.log.error("cursor_gap", gap_id=gap.id, start=iso_utc(start), end=iso_utc(end),
                       seconds=round(end - start, 1), reason=reason)

    async def reconcile(self, term_over: asyncio.Event) -> None:
        """While the term lasts: resync whenever the resource has open gaps (at once, and whenever one is recorded)
        and every ``watch.resync_every`` if set."""
        last = time.monotonic()
        periodic = self.every > 0 and self.resource in Resyncer.SUPPORTED
        while not term_over.is_set():  # ends with the term
            try:
                done: bool | None = await retrying(self.pause, stop=[term_over, self.recorded], on=(_Failed,))(
                    self._reconcile_once, term_over, last)
            except Stopping:
                if self.recorded.is_set():
                    continue  # a new gap: at once, whatever the pause
                return
            if done is None:
                return  # no resyncer (a test's bare watcher): the gaps stay open, visible in the store
            if done:
                last = time.monotonic()
                self.pause.streak = 0
                continue
            await self._wait(self.every - (time.monotonic() - last) if periodic else float("inf"), term_over)

    async def _reconcile_once(self, term_over: asyncio.Event, last: float) -> bool | None:
        """True once resynced (and the gaps filled), False when nothing was due, None when nothing can be done.
        Raises _Failed when the resync failed, Stopping when stopping."""
        self.recorded.clear()
        gaps = await stored(lambda: self.store.gaps(self.tenant, self.resource), stop=term_over, log=self.log)
        m.GAPS_OPEN.labels(self.resource).set(len(gaps))
        # The periodic safety net only where a resync can run; a gap of an unsupported resource is still reported
        # (``resync_unsupported``), once per gap.
        due = self.every > 0 and time.monotonic() - last >= self.every and self.resource in Resyncer.SUPPORTED
        if not gaps and not due:
            return False
        if self.resyncer is None:
            return None if gaps else False
        trigger = ("bootstrap" if all(g.reason == "bootstrap" for g in gaps) else "gap") if gaps else "periodic"
        await self._resync(self.resyncer, gaps, trigger, term_over)
        return True

    async def _resync(self, resyncer: Resyncer, gaps: list[Gap], trigger: str, term_over: asyncio.Event) -> None:
        try:
            resyncer.check(self.resource)
        except ResyncUnsupported as exc:
            m.RESYNCS.labels(self.resource, trigger, "unsupported").inc()
            self.log.error("resync_unsupported", **exc.fields(), gaps=[g.id for g in gaps])
            await self._wait(float("inf"), term_over)  # until a new gap or the end of the term: nothing else to do
            raise _Failed() from exc
        try:
            result = await resyncer.run(self.resource, trigger=trigger)
        except Stopping:
            raise
        except Exception as exc:  # logged and counted by the resyncer; the watch itself goes on
            raise _Failed() from exc
        if not result.complete:  # published, nothing swept (resync_incomplete says why): the gaps stay open
            raise _Failed()

        async def fill(gap: Gap) -> None:
            await stored(lambda: self.store.fill_gap(gap.id, time.time()), stop=term_over, log=self.log)

        await fill_gaps(gaps, result, fill, self.log)

    async def _wait(self, seconds: float, term_over: asyncio.Event) -> None:
        """Until ``seconds`` pass, a gap is recorded, or the term ends."""
        waiters = {asyncio.ensure_future(self.recorded.wait()), asyncio.ensure_future(term_over.wait())}
        try:
            await asyncio.wait(waiters, timeout=None if seconds == float("inf") else max(0.0, seconds),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
