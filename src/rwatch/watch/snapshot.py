"""A snapshot: one listing of one resource at the head's version, its rows turned into snapshot events page by page.

Each row becomes an ``update`` event with ``origin = "resync"`` and the head's version ``V``, projected exactly as
a watch event is, and goes to ``out`` as its page comes (``Resyncer.run`` publishes them, verify compares them):
memory stays one page per request in flight.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from rwatch import metrics as m
from rwatch.cmdb import protocol as p
from rwatch.cmdb.listing import ListApi, Proof
from rwatch.events import Event, resync_event_id
from rwatch.failpoints import failpoint

log = structlog.get_logger("rwatch.resync")

Doc = dict[str, Any]
# What a mark's sweep may touch: field -> the values the listing covered (None: everything of the resource).
Scope = dict[str, list[Any]] | None
# (resource, objects listed so far, total when the API told it)
Progress = Callable[[str, int, int | None], None]


@dataclass(slots=True)
class Snapshot:
    """One listing of one resource: in progress, then its outcome."""

    resource: str
    version: tuple[int, int]
    fields: list[str]
    tenant: str
    out: Callable[[list[Event]], Awaitable[None]]
    lists: ListApi
    progress: Progress | None = None
    observed: str = ""
    occurred: str = ""  # iso_utc(version[0]), the same for every snapshot event
    scope: Scope = None
    listed: int = 0
    total: int | None = None
    invalid: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    proof: Proof = field(default_factory=Proof)
    hidden: list[int] = field(default_factory=list)
    also: list[Scope] = field(default_factory=list)  # more scopes, each swept by a mark of its own
    keys: set[str] = field(default_factory=set)  # every key listed (what the sweep keeps)
    resync_id: str = ""  # in every row's id: the sweep keeps what this snapshot wrote at the head's version

    async def emit(self, docs: Sequence[Doc]) -> None:
        """Turn rows into snapshot events and hand them to ``out``; a row without its key is counted and logged."""
        events: list[Event] = []
        for doc in docs:
            data = {f: doc.get(f) for f in self.fields} if self.fields else doc
            key = p.object_key(self.resource, data)
            if key is None:
                self.invalid += 1
                m.EVENTS_INVALID.labels(self.resource, "no_key").inc()
                log.error("resync_object_invalid", resource=self.resource, reason="no_key",
                          keys=sorted(doc)[:20])
                continue
            self.keys.add(key)
            events.append(Event.model_construct(
                id=resync_event_id(self.resource, key, self.version, resync_id=self.resync_id),
                resource=self.resource, action="update",
                key=key, tenant=self.tenant, version=self.version, occurred_at=self.occurred,
                observed_at=self.observed, origin="resync", cursor=None, data=data))
        if events:
            await self.out(events)
            failpoint("resync.after_page")
        self.listed += len(events)
        m.RESYNC_OBJECTS.labels(self.resource).inc(len(events))
        if self.progress is not None:
            self.progress(self.resource, self.listed, self.total)

    async def emit_pages(self, api: str, id_field: str, **kwargs: Any) -> None:
        """List every page and emit it as it comes."""
        first = True
        async for info, count in self.lists.pages(api, id_field, self.requests, self.proof, **kwargs):
            if first:
                self.total = (self.total or 0) + (count if count is not None else len(info))
            first = False
            await self.emit(info)

    async def read_all(self, api: str, id_field: str, **kwargs: Any) -> list[Doc]:
        """Every page of a list, kept (for ids that the next step needs), not emitted."""
        docs: list[Doc] = []
        async for info, _ in self.lists.pages(api, id_field, self.requests, self.proof, **kwargs):
            docs.extend(info)
        return docs

    def body(self, *extra: str) -> dict[str, Any]:
        """The request's ``fields``: the configured projection plus the ``extra`` ones paging needs."""
        return {"fields": [*self.fields, *[f for f in extra if f not in self.fields]]} if self.fields else {}


async def gather_bounded(jobs: Sequence[Awaitable[None]], limit: int) -> None:
    """Run ``jobs`` at most ``limit`` at a time; the first failure cancels the rest and is raised."""
    pending = list(jobs)
    pending.reverse()

    async def worker() -> None:
        while pending:
            await pending.pop()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(limit, len(pending))):
                group.create_task(worker())
    except BaseExceptionGroup as group_exc:
        for job in pending:  # never awaited: close them so Python does not warn
            if asyncio.iscoroutine(job):
                job.close()
        raise group_exc.exceptions[0] from None
