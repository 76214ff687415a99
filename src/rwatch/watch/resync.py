"""Resync: list-then-watch, so a sink ends equal to CMDB even where the stream lost history.

The Kubernetes informer's pattern, on CMDB's APIs (README "Resync"):

1. **Head first** (``rwatch.watch.head``). An unfiltered from-now watch request gives the newest event's cursor;
   its cluster time is the snapshot's version ``V`` (no event in the window: the server's clock less the skew
   allowance). Every change the lists below cannot have seen is newer than ``V``.
2. **List.** Each object is listed through the APIs of cmdb-watch-api.md §6, keyset-paged by its id (offset
   paging skips rows when something is deleted underneath), under the client's rate limit and at most
   ``watch.resync_concurrency`` requests in flight (``rwatch.watch.scopes``), and published as an ``update``
   event with ``origin = "resync"`` and version ``V``, page by page (``rwatch.watch.snapshot``).
   The sinks' version fence does the merging: a live change made during the list is newer than ``V`` and
   is never overwritten by its snapshot row, whichever arrives first.
3. **Mark.** After the last page, a ``ResyncMark`` (``cmdb.<resource>.resync``) follows on the same queues.
   Each sink *sweeps*: what it still holds older than ``V`` was in no snapshot row, so CMDB no longer has
   it; it ends deleted at ``V``. The mark's ``scope`` keeps the sweep to what the lists could see.

The watch goes on from where it stood meanwhile; replayed events older than ``V`` are fenced out.

The mark is published only when every listing proved itself complete (``rwatch.cmdb.listing``) and no business
the stream showed alive is missing from ``search_business``: a user who is not a CMDB administrator sees only the
businesses IAM lets it view, so a business missing from its list is not evidence of a delete (cmdb-watch-api
§10.5). Otherwise the snapshot rows are published, nothing is swept, the gap stays open, and the result says why.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from rwatch import metrics as m
from rwatch.bus import Bus
from rwatch.cmdb.client import CmdbClient
from rwatch.config import Config
from rwatch.errors import RwatchError, Stopping
from rwatch.events import ResyncMark, iso_utc, resync_event_id
from rwatch.store.base import CursorStore
from rwatch.store.records import Gap
from rwatch.watch.guard import Guard, judge
from rwatch.watch.scopes import Lister
from rwatch.watch.snapshot import Progress, Scope

log = structlog.get_logger("rwatch.resync")


@dataclass(slots=True)
class ResyncResult:
    """What one resync did: listed, swept (``complete``) or not, and why."""

    resource: str
    resync_id: str
    version: tuple[int, int]
    listed: int
    requests: Counter[str]
    seconds: float
    scope: Scope
    started_at: float
    # False: a listing could not prove itself complete (``reasons``): rows published, no mark, gaps stay open.
    complete: bool = True
    reasons: list[str] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)  # businesses the stream showed alive that were not listed
    guard: Guard | None = None  # the mass-delete guard's figures and decision (None: nothing to compare with)


class Resyncer(Lister):
    """Runs resyncs (see the module docstring): a ``Lister`` whose snapshots go to one bus, then their marks."""

    def __init__(self, config: Config, client: CmdbClient, bus: Bus, stop: asyncio.Event, *,
                 progress: Progress | None = None, store: CursorStore | None = None,
                 allow_mass_delete: bool = False) -> None:
        super().__init__(config, client, stop, progress=progress, store=store)
        self.bus = bus
        self.allow_mass_delete = allow_mass_delete  # the operator looked: a sweep over the guard goes out
        self.held: dict[str, Guard] = {}  # resources whose last sweep the guard held

    async def run(self, resource: str, *, trigger: str = "manual") -> ResyncResult:
        """Resync one resource; returns once every snapshot event and the mark are durable on the bus. The mark
        goes out only for a listing proved complete whose sweep the mass-delete guard lets through."""
        self.check(resource)
        started, clock = time.time(), time.monotonic()
        resync_id = uuid.uuid4().hex[:16]
        bound = log.bind(resource=resource, resync_id=resync_id, trigger=trigger)
        figures: Guard | None = None
        try:
            snapshot = await self.snapshot(resource, self.bus.publish, resync_id=resync_id,
                                           on_head=lambda v: bound.info("resync_started", version=list(v),
                                                                        occurred_at=iso_utc(v[0])))
            if snapshot.proof.complete:
                figures = await judge(self.config, self.store, snapshot, allowed=self.allow_mass_delete)
            if snapshot.proof.complete and not (figures and figures.held):
                # One mark per scope: each sweeps only what its listing proved (README "Resync").
                marks = [ResyncMark(id=resync_event_id(resource, f"mark:{resync_id}" + (f":{i}" if i else ""),
                                                       snapshot.version),
                                    resource=resource, tenant=self.tenant, version=snapshot.version,
                                    resync_id=resync_id, scope=scope, listed=snapshot.listed,
                                    started_at=iso_utc(started), observed_at=iso_utc(time.time()))
                         for i, scope in enumerate([snapshot.scope, *snapshot.also])]
                await self.bus.publish(marks)
        except (Stopping, asyncio.CancelledError):
            m.RESYNCS.labels(resource, trigger, "stopped").inc()
            raise
        except Exception as exc:
            m.RESYNCS.labels(resource, trigger, "failed").inc()
            facts = exc.fields() if isinstance(exc, RwatchError) else {"error": repr(exc)}
            bound.error("resync_failed", **facts)
            await self._record(resource, "failed", [str(facts.get("error"))])
            raise
        seconds = time.monotonic() - clock
        result = ResyncResult(resource, resync_id, snapshot.version, snapshot.listed, snapshot.requests, seconds,
                              snapshot.scope, started, snapshot.proof.complete, list(snapshot.proof.reasons),
                              snapshot.hidden, figures)
        facts = {"listed": snapshot.listed, "invalid": snapshot.invalid, "requests": sum(snapshot.requests.values()),
                 "seconds": round(seconds, 3), "scope": _scope_summary(snapshot.scope),
                 "version": list(snapshot.version), "guard": figures.to_dict() if figures else None}
        if not result.complete:
            # Published, but nothing is swept from it: a deletion needs proof (README "Resync").
            m.RESYNCS.labels(resource, trigger, "incomplete").inc()
            bound.error("resync_incomplete", **facts, reasons=result.reasons, hidden=result.hidden[:50])
            await self._record(resource, "incomplete", result.reasons)
            return result
        if figures is not None and figures.held:
            m.RESYNCS.labels(resource, trigger, "held").inc()
            m.SWEEP_HELD.labels(resource).set(figures.would_delete)
            self.held[resource] = figures
            result.complete = False
            result.reasons.append(figures.describe())
            bound.error("sweep_held", **{k: v for k, v in facts.items() if k != "guard"},
                        would_delete=figures.would_delete, live=figures.live, share=round(figures.share, 4),
                        limit=figures.share_limit, floor=figures.floor, source=figures.source, sample=figures.sample,
                        fix=f"look at what CMDB lists, then: rwatch resync --resource {resource} --allow-mass-delete")
            await self._record(resource, "held", result.reasons)
            return result
        m.SWEEP_HELD.labels(resource).set(0)
        self.held.pop(resource, None)
        m.RESYNCS.labels(resource, trigger, "ok").inc()
        m.RESYNC_SECONDS.labels(resource).observe(seconds)
        bound.info("resync_finished", **facts)
        await self._record(resource, "ok", [], listed=snapshot.listed)
        return result

    async def _record(self, resource: str, outcome: str, reasons: Sequence[str], *, listed: int | None = None) -> None:
        """The outcome for ``rwatch cursors list``; a store that fails here costs only that line."""
        if self.store is None:
            return
        try:
            await self.store.record_resync(self.tenant, resource, outcome, reasons, listed=listed)
        except RwatchError as exc:
            log.warning("resync_not_recorded", resource=resource, **exc.fields())


async def fill_gaps(gaps: Sequence[Gap], result: ResyncResult, fill: Callable[[Gap], Awaitable[None]],
                    logger: Any) -> None:
    """Mark ``gaps`` filled by ``result``'s resync (which started after they were recorded): ``fill`` stores it,
    then the metric and the ``cursor_gap_filled`` line follow."""
    for gap in gaps:
        await fill(gap)
        m.GAPS_FILLED.labels(result.resource).inc()
        logger.warning("cursor_gap_filled", gap_id=gap.id, start=iso_utc(gap.start), end=iso_utc(gap.end),
                       reason=gap.reason, resync_id=result.resync_id, listed=result.listed)


def _scope_summary(scope: Scope) -> dict[str, int] | None:
    return {name: len(values) for name, values in scope.items()} if scope else None
