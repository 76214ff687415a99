"""The second stage of a term: publish each batch, then save its cursor, in order (invariant 1).

A cursor is saved only after its batch *and every batch before it* is durable, because batches are taken in order.
Once one cannot be delivered (the process stops, or the lease's deadline passed), the rest of the queue is dropped
unsaved until the sentinel ends it: the restart or the next holder replays it. Every save carries the term's fence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rwatch import metrics as m
from rwatch.bus import Bus
from rwatch.errors import Stopping
from rwatch.events import Event
from rwatch.failpoints import failpoint
from rwatch.progress import WatchState
from rwatch.retry import finish_or_abandon
from rwatch.store.base import CursorStore
from rwatch.store.records import CursorState
from rwatch.watch.batch import Batch, sightings
from rwatch.watch.lease import Lease
from rwatch.watch.storing import stored


class Delivery:
    def __init__(self, *, bus: Bus, store: CursorStore, lease: Lease, state: WatchState, tenant: str,
                 stopping: asyncio.Event, publish_grace: float, progressed: Callable[[], None], log: Any) -> None:
        self.bus = bus
        self.store = store
        self.lease = lease
        self.state = state
        self.resource = state.resource
        self.tenant = tenant
        self.stopping = stopping
        self.publish_grace = publish_grace  # after stop: how long in-flight publishes may still confirm
        self.progressed = progressed  # a batch went through the whole pipeline
        self.log = log
        self._saved: CursorState | None = None
        self._saved_changed = asyncio.Event()
        self._businesses: dict[str, tuple[bool, bool]] = {}  # biz: (live, pool) as last noted in the store

    @property
    def saved(self) -> CursorState | None:
        """The last cursor state saved (or loaded at the start of a term); its cursor is published."""
        return self._saved

    @saved.setter
    def saved(self, saved: CursorState | None) -> None:
        self._saved = saved
        self.state.cursor = saved.cursor if saved is not None else None
        self.state.event_time = saved.event_time if saved is not None else None
        self._saved_changed.set()

    async def wait_saved(self, done: Callable[[CursorState], bool]) -> CursorState:
        """Until a saved position satisfies ``done`` (for callers that must know what is durable)."""
        while self._saved is None or not done(self._saved):
            self._saved_changed.clear()
            await self._saved_changed.wait()
        return self._saved

    async def run(self, queue: asyncio.Queue[Batch | None], term_over: asyncio.Event) -> None:
        """Deliver each batch until the sentinel; after a failure, drop the rest (and end the term)."""
        delivering = True
        while (batch := await queue.get()) is not None:
            if delivering and not await self.deliver(batch, term_over):
                delivering = False
                term_over.set()

    async def deliver(self, batch: Batch, term_over: asyncio.Event) -> bool:
        if not await self.publish_batch(batch, term_over):
            return False
        if self.resource == "biz" and batch.events and not await self.note_businesses(batch.events, term_over):
            return False
        if batch.state is not None and not await self.save_cursor(batch.state, term_over):
            return False
        self.progressed()
        return True

    async def publish_batch(self, batch: Batch, term_over: asyncio.Event) -> bool:
        if not batch.events:
            return True
        if self.lease.expired():
            term_over.set()  # the lease may be gone: leave the batch to the next holder
            return False
        # The bus counts what it confirmed, and how long it took. Stopping: in-flight publishes get a grace to
        # confirm, then the batch is left unsaved (the restart replays it) so the process exits within
        # run.shutdown_timeout (invariant 6).
        publish = asyncio.ensure_future(self.bus.publish(batch.events))
        if not await finish_or_abandon(publish, self.stopping, self.publish_grace):
            self.log.warning("publish_abandoned", events=len(batch.events), grace=self.publish_grace)
            return False
        try:
            publish.result()
        except Stopping:
            return False
        failpoint("watch.after_publish")
        return True

    async def note_businesses(self, events: list[Event], term_over: asyncio.Event) -> bool:
        """Record which businesses the stream showed alive or deleted (only changes reach the store): a resync
        compares them with ``search_business``, which hides what the user may not view (README "Resync")."""
        seen = sightings(events, self._businesses)
        try:
            if seen:
                await stored(lambda: self.store.note_businesses(self.tenant, seen), stop=term_over, log=self.log)
        except Stopping:
            return False
        return True

    async def save_cursor(self, state: CursorState, term_over: asyncio.Event) -> bool:
        """Saved only after the batch is durable: a crash before this line replays, never skips. A save the store
        refuses for a stale fence raises ``LeaseLost``, which ends the term."""
        try:
            await stored(lambda: self.store.save(state, fence=self.lease.fence), stop=term_over, log=self.log)
        except Stopping:
            return False
        self.saved = state
        m.CURSOR_SAVES.labels(self.resource).inc()
        failpoint("watch.after_save")
        return True
