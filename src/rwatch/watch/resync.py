"""Resync: list-then-watch, so a sink ends equal to CMDB even where the stream lost history.

The Kubernetes informer's pattern, on CMDB's APIs (README "Resync"):

1. **Head first.** An unfiltered from-now watch request gives the newest event's cursor; its cluster time is the
   snapshot's version ``V`` (no event in the window: the server's clock less the skew allowance). Every change the
   lists below cannot have seen is newer than ``V``.
2. **List.** Each object is listed through the APIs of cmdb-watch-api.md §6, keyset-paged by its id (offset
   paging skips rows when something is deleted underneath), under the client's rate limit and at most
   ``watch.resync_concurrency`` requests in flight, and published as an ``update`` event with
   ``origin = "resync"`` and version ``V``, page by page (memory stays one page per request in flight).
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
from typing import Any, Final

import structlog

from rwatch import metrics as m
from rwatch.bus import Bus
from rwatch.cmdb import protocol as p
from rwatch.cmdb.client import SKEW_ALLOWANCE, CmdbClient
from rwatch.cmdb.listing import LIMITS, ListApi, Proof
from rwatch.config import Config
from rwatch.errors import (
    TRANSIENT_ERRORS,
    CmdbError,
    CmdbRefused,
    CmdbTransientError,
    ListingBroken,
    ResyncUnsupported,
    RwatchError,
    Stopping,
)
from rwatch.events import Event, ResyncMark, iso_utc, resync_event_id
from rwatch.failpoints import failpoint
from rwatch.retry import HealthyResetWait, sleep_or_stop
from rwatch.store.base import CursorStore, open_store
from rwatch.store.records import BizSighting, Gap
from rwatch.watch.guard import Guard, guard, preview

log = structlog.get_logger("rwatch.resync")

Doc = dict[str, Any]
Scope = dict[str, list[Any]] | None
# (resource, objects listed so far, total when the API told it)
Progress = Callable[[str, int, int | None], None]

# How a proof failure caused by businesses hidden from the user starts (verify tells these apart).
HIDDEN_REASON: Final = "search_business does not list"
# A value no business has: a filter on bk_data_status is what makes search_business show archived ones.
_ANY_STATUS: Final = {"field": "bk_data_status", "operator": "not_equal", "value": "__rwatch_any__"}


@dataclass(slots=True)
class ResyncResult:
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


@dataclass(slots=True)
class Snapshot:
    """One listing of one resource: in progress, then its outcome."""

    resource: str
    version: tuple[int, int]
    fields: list[str]
    tenant: str
    out: Callable[[list[Event]], Awaitable[None]]
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


class Resyncer:
    """Runs resyncs (see the module docstring) through one CMDB client and one bus."""

    SUPPORTED: Final = frozenset({"host", "host_relation", "biz", "set", "module", "plat", "project", "biz_set"})

    def __init__(self, config: Config, client: CmdbClient, bus: Bus, stop: asyncio.Event, *,
                 progress: Progress | None = None, store: CursorStore | None = None,
                 allow_mass_delete: bool = False) -> None:
        self.config = config
        self.client = client
        self.bus = bus
        self.stop = stop
        self.tenant = config.cmdb.tenant
        self.progress = progress
        self.lists = ListApi(client, stop, config.watch.resync_concurrency)
        # The record of businesses the stream showed (``BizSighting``): without it, hidden businesses cannot be
        # told apart and a business resync never sweeps (only a test's bare resyncer has none).
        self.store = store
        self.hidden: list[int] | None = None  # the last check's hidden businesses (None: not checked yet)
        self.allow_mass_delete = allow_mass_delete  # the operator looked: a sweep over the guard goes out
        self.held: dict[str, Guard] = {}  # resources whose last sweep the guard held

    @classmethod
    def check(cls, resource: str) -> None:
        if resource not in cls.SUPPORTED:
            raise ResyncUnsupported(
                f"no list API covers every {resource} object, so {resource} cannot be resynced "
                f"(resyncable: {', '.join(sorted(cls.SUPPORTED))})", resource=resource)

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
                figures = await self._guard(snapshot)
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

    async def _guard(self, snap: Snapshot) -> Guard | None:
        """The mass-delete guard's figures for this snapshot's sweep: from the mirrors that take the resource, else
        from the last complete listing; None with neither (a first resync, nothing held downstream to compare)."""
        figures = await preview(self.config, snap.resource, self.tenant, snap.version, [snap.scope, *snap.also],
                                snap.keys, allowed=self.allow_mass_delete)
        if figures is None and self.store is not None:
            last = next((r for r in await self.store.resyncs(self.tenant) if r.resource == snap.resource), None)
            if last is not None and last.listed is not None:
                figures = guard(self.config, snap.resource, max(0, last.listed - snap.listed), last.listed,
                                "the last complete listing", allowed=self.allow_mass_delete)
        return figures

    async def _record(self, resource: str, outcome: str, reasons: Sequence[str], *, listed: int | None = None) -> None:
        """The outcome for ``rwatch cursors list``; a store that fails here costs only that line."""
        if self.store is None:
            return
        try:
            await self.store.record_resync(self.tenant, resource, outcome, reasons, listed=listed)
        except RwatchError as exc:
            log.warning("resync_not_recorded", resource=resource, **exc.fields())

    async def snapshot(self, resource: str, out: Callable[[list[Event]], Awaitable[None]], *, resync_id: str = "",
                       on_head: Callable[[tuple[int, int]], object] | None = None) -> Snapshot:
        """Take the head, then list every object of ``resource`` as snapshot events handed to ``out`` page by
        page (``run`` publishes them; ``verify`` compares them)."""
        self.check(resource)
        version = await self.head(resource)
        if on_head is not None:
            on_head(version)
        settings = self.config.watch.resources[resource]
        fields = [] if resource in p.FIELDS_IGNORED else list(settings.fields)
        snap = Snapshot(resource, version, fields, self.tenant, out, iso_utc(time.time()), iso_utc(version[0]),
                        resync_id=resync_id)
        snap.scope = await getattr(self, f"_list_{resource}")(snap)
        return snap

    async def head(self, resource: str) -> tuple[int, int]:
        """The snapshot's version: the newest event's cluster time, or the server's clock less the skew allowance.

        Asked with no event-type or sub-resource filter: a filtered from-now answer is the NoEventCursor whenever
        the newest event does not match, and the clock fallback would then stand in for a real, older, head.
        Under-estimating is safe (a change then merely looks newer than the snapshot); over-estimating fences a
        real change out, so the fallback is CMDB's clock as best known, less what its ``Date`` may be off by."""
        fields = list(p.KEY_FIELDS[resource]) if resource in p.FIELDS_REQUIRED else []
        wait = HealthyResetWait(initial=0.5, maximum=15.0)
        while True:
            try:
                reply = await self.client.watch(resource, fields=fields, event_types=[])
                break
            except TRANSIENT_ERRORS as exc:
                delay = wait.next_delay()
                log.warning("resync_head_failed", resource=resource, error=repr(exc), retry_in=round(delay, 2))
                if await sleep_or_stop(delay, self.stop):
                    raise Stopping("stopping") from exc
        cursor = reply.last_cursor
        decoded = p.decode_cursor(cursor) if cursor and cursor != p.NO_EVENT_CURSOR else None
        if decoded is not None:
            return decoded.sec, decoded.inc
        return int(self.client.server_now() - SKEW_ALLOWANCE), 0

    # --- publishing ----------------------------------------------------------------------------------------

    async def _emit(self, run: Snapshot, docs: Sequence[Doc]) -> None:
        events: list[Event] = []
        for doc in docs:
            data = {f: doc.get(f) for f in run.fields} if run.fields else doc
            key = p.object_key(run.resource, data)
            if key is None:
                run.invalid += 1
                m.EVENTS_INVALID.labels(run.resource, "no_key").inc()
                log.error("resync_object_invalid", resource=run.resource, reason="no_key",
                          keys=sorted(doc)[:20])
                continue
            run.keys.add(key)
            events.append(Event.model_construct(
                id=resync_event_id(run.resource, key, run.version, resync_id=run.resync_id), resource=run.resource,
                action="update",
                key=key, tenant=run.tenant, version=run.version, occurred_at=run.occurred,
                observed_at=run.observed, origin="resync", cursor=None, data=data))
        if events:
            await run.out(events)
            failpoint("resync.after_page")
        run.listed += len(events)
        m.RESYNC_OBJECTS.labels(run.resource).inc(len(events))
        if self.progress is not None:
            self.progress(run.resource, run.listed, run.total)

    async def _paged(self, run: Snapshot, api: str, id_field: str, **kwargs: Any) -> None:
        """List every page and publish it as it comes."""
        first = True
        async for info, count in self.lists.pages(api, id_field, run.requests, run.proof, **kwargs):
            if first:
                run.total = (run.total or 0) + (count if count is not None else len(info))
            first = False
            await self._emit(run, info)

    async def _all(self, run: Snapshot, api: str, id_field: str, **kwargs: Any) -> list[Doc]:
        """Every page of a list, kept (for ids that the next step needs), not published."""
        docs: list[Doc] = []
        async for info, _ in self.lists.pages(api, id_field, run.requests, run.proof, **kwargs):
            docs.extend(info)
        return docs

    def _fields(self, run: Snapshot, *extra: str) -> dict[str, Any]:
        return {"fields": [*run.fields, *[f for f in extra if f not in run.fields]]} if run.fields else {}

    # --- one lister per resource: publish the snapshot, return the sweep's scope ----------------------------

    async def _list_host(self, run: Snapshot) -> Scope:
        # list_hosts_without_biz with no business: every host the user may see, the resource pool's included.
        await self._check_hidden(run, await self._businesses(run), sweeps_hidden=True)
        await self._paged(run, "list_hosts_without_biz", "bk_host_id", body=self._fields(run, "bk_host_id"),
                          param="host_property_filter")
        return None

    async def _list_host_relation(self, run: Snapshot) -> Scope:
        bizs = await self._businesses(run)
        await self._check_hidden(run, bizs, sweeps_hidden=False)
        hosts = await self._all(run, "list_hosts_without_biz", "bk_host_id", body={"fields": ["bk_host_id"]},
                                param="host_property_filter")
        ids = [h["bk_host_id"] for h in hosts if isinstance(h.get("bk_host_id"), int)]
        run.total = len(ids)
        size = LIMITS["find_host_biz_relations"]
        seen: set[int] = set()

        async def relations(chunk: list[int]) -> None:
            rows = await self.lists.call("find_host_biz_relations", {"bk_host_id": chunk}, run.requests)
            if not isinstance(rows, list):
                raise ListingBroken("find_host_biz_relations answered without a list", api="find_host_biz_relations")
            docs = [r for r in rows if isinstance(r, dict)]
            seen.update(r["bk_biz_id"] for r in docs if isinstance(r.get("bk_biz_id"), int))
            await self._emit(run, docs)

        await _gather_bounded([relations(ids[i:i + size]) for i in range(0, len(ids), size)],
                              self.config.watch.resync_concurrency)
        if not run.hidden:
            return None
        # A relation row states "this host is in this module". Every host of a business the user may view is
        # listed with all its rows, so inside those businesses (the resource pool's included, seen in the rows)
        # a row that is no longer listed is no longer true, even for a host that moved into a hidden business.
        # And a listed host is listed with every row it has (a host is in one business, a visible one), so its
        # rows in a hidden business, left from before it moved out while history was lost, are no longer true
        # either: a second mark sweeps the listed hosts' rows. Other rows of the hidden businesses stay.
        run.also.append({"bk_host_id": ids})
        return {"bk_biz_id": sorted((set(bizs) | seen) - set(run.hidden))}

    async def _businesses(self, run: Snapshot) -> list[int]:
        """Every business search_business shows, archived ones included (the resource pool never is)."""
        bizs = await self._all(run, "search_business", "bk_biz_id", body={"fields": ["bk_biz_id"],
                               "biz_property_filter": _ANY_STATUS}, param="biz_property_filter")
        return sorted({b["bk_biz_id"] for b in bizs if isinstance(b.get("bk_biz_id"), int)})

    async def _check_hidden(self, run: Snapshot, listed: Sequence[int], *, sweeps_hidden: bool) -> None:
        """Compare the business listing with what the stream showed alive. A business missing from the list is
        hidden from the configured user by IAM (or was deleted while history was lost): never proof of a
        delete. Where the resource's sweep would reach such businesses' objects (``sweeps_hidden``), the
        listing is not proved complete; either way the ids are reported (log, metric, /readyz)."""
        if self.store is None:
            if sweeps_hidden:
                run.proof.fail("no record of the businesses the stream showed, so hidden ones cannot be ruled out")
            return
        await self.store.note_businesses(self.tenant, [BizSighting(b, True, run.version, False) for b in listed])
        shown = set(listed)
        hidden = sorted(s.biz_id for s in await self.store.businesses(self.tenant)
                        if s.live and not s.pool and s.biz_id not in shown)
        run.hidden = hidden
        self.hidden = hidden
        m.HIDDEN_BUSINESSES.set(len(hidden))
        if not hidden:
            return
        log.error("businesses_hidden", resource=run.resource, count=len(hidden), ids=hidden[:50],
                  username=self.config.cmdb.username,
                  why="search_business does not list businesses the biz stream showed alive: the user lacks view "
                      "rights on them in IAM, or they were deleted while history was lost; nothing of them is "
                      "deleted downstream",
                  fix=f"grant user {self.config.cmdb.username!r} view rights on every business (a CMDB "
                      "administrator sees all), or use such a user in cmdb.username")
        if sweeps_hidden:
            run.proof.fail(f"{HIDDEN_REASON} {len(hidden)} businesses the stream showed alive "
                           f"({_ids(hidden)}): their objects may be missing from this listing, so it sweeps nothing")

    async def _list_biz(self, run: Snapshot) -> Scope:
        body = {**self._fields(run, "bk_biz_id", "default"), "biz_property_filter": _ANY_STATUS}
        listed: list[int] = []
        out = run.out

        async def keep(events: list[Event]) -> None:
            listed.extend(int(e.key) for e in events)
            await out(events)

        run.out = keep
        try:
            await self._paged(run, "search_business", "bk_biz_id", body=body, param="biz_property_filter")
        finally:
            run.out = out
        await self._check_hidden(run, listed, sweeps_hidden=True)
        return {"default": [0]}

    async def _per_biz(self, run: Snapshot, list_one: Callable[[int], Awaitable[None]]) -> Scope:
        bizs = await self._businesses(run)
        # The sweep is scoped to the listed businesses: hidden ones are reported, and nothing of them is touched.
        await self._check_hidden(run, bizs, sweeps_hidden=False)
        await _gather_bounded([list_one(b) for b in bizs], self.config.watch.resync_concurrency)
        return {"bk_biz_id": bizs}

    async def _list_set(self, run: Snapshot) -> Scope:
        async def one(biz: int) -> None:
            # By a legacy condition: the ESB's search_set forwards only fields, condition and page and drops a
            # filter (cmdb-watch-api §10.3); the gateway accepts either.
            await self._paged(run, "search_set", "bk_set_id", style="condition", param="condition",
                              body=self._fields(run, "bk_set_id", "bk_biz_id"), bk_biz_id=biz)
        return await self._per_biz(run, one)

    async def _list_module(self, run: Snapshot) -> Scope:
        async def one(biz: int) -> None:
            await self._paged(run, "search_module", "bk_module_id", style="condition", param="condition",
                              body=self._fields(run, "bk_module_id", "bk_biz_id"), bk_biz_id=biz, bk_set_id=0)
        return await self._per_biz(run, one)

    async def _list_plat(self, run: Snapshot) -> Scope:
        await self._paged(run, "search_cloud_area", "bk_cloud_id", style="condition", param="condition",
                          body=self._fields(run, "bk_cloud_id"))
        return None

    async def _list_project(self, run: Snapshot) -> Scope:
        await self._paged(run, "list_project", "id", body=self._fields(run, "id"))
        return None

    async def _list_biz_set(self, run: Snapshot) -> Scope:
        await self._paged(run, "list_business_set", "bk_biz_set_id", body=self._fields(run, "bk_biz_set_id"),
                          param="bk_biz_set_filter")
        return None


async def _gather_bounded(jobs: Sequence[Awaitable[None]], limit: int) -> None:
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


def _ids(ids: Sequence[int], most: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:most])
    return f"{shown}, ... ({len(ids)} in all)" if len(ids) > most else shown


def _scope_summary(scope: Scope) -> dict[str, int] | None:
    return {name: len(values) for name, values in scope.items()} if scope else None


_PROBE_ERRORS: Final[tuple[type[Exception], ...]] = (*TRANSIENT_ERRORS, CmdbError)
PROBE_ATTEMPTS: Final = 4


async def probe(client: CmdbClient, config: Config, resources: Sequence[str]) -> None:
    """One request before a command starts: listing retries transient errors for ever (right for the daemon),
    so a command must find an unreachable CMDB here, once, and say so."""
    if not resources:
        return
    settings = config.watch.resources[resources[0]]
    for attempt in range(PROBE_ATTEMPTS):
        try:
            await client.watch(resources[0], fields=settings.fields, event_types=settings.event_types,
                               sub_resource=settings.sub_resource)
            return
        except _PROBE_ERRORS as exc:
            # A rate limit or a backend hiccup (the gateway's, at any HTTP status) is not "unreachable".
            passing = isinstance(exc, CmdbTransientError) and exc.extra.get("reason") not in ("connection", "timeout")
            if passing and attempt < PROBE_ATTEMPTS - 1:
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            reason = exc.message if isinstance(exc, RwatchError) else repr(exc)
            if isinstance(exc, CmdbRefused):
                raise RwatchError(f"CMDB at {config.cmdb.base_url} refused rwatch: {reason}; {exc.fix}") from None
            raise RwatchError(f"cannot reach CMDB at {config.cmdb.base_url}: {reason}") from None


async def fill_gaps(gaps: Sequence[Gap], result: ResyncResult, fill: Callable[[Gap], Awaitable[None]],
                    logger: Any) -> None:
    """Mark ``gaps`` filled by ``result``'s resync (which started after they were recorded): ``fill`` stores it,
    then the metric and the ``cursor_gap_filled`` line follow."""
    for gap in gaps:
        await fill(gap)
        m.GAPS_FILLED.labels(result.resource).inc()
        logger.warning("cursor_gap_filled", gap_id=gap.id, start=iso_utc(gap.start), end=iso_utc(gap.end),
                       reason=gap.reason, resync_id=result.resync_id, listed=result.listed)


async def resync_now(config: Config, resources: Sequence[str], stop: asyncio.Event, *,
                     progress: Progress | None = None,
                     allow_mass_delete: bool = False) -> dict[str, ResyncResult | BaseException]:
    """``rwatch resync``: resync ``resources`` now, beside (or without) a running daemon, then fill every gap
    of each resource recorded before its resync started. With ``bus.kind = "memory"`` the sinks are built
    here and applied in-process; with AMQP the daemon's consumers apply what is published."""
    from rwatch.app import make_sinks, subscribe_sinks
    from rwatch.bus import make_bus
    from rwatch.bus.memory import MemoryBus

    for resource in resources:
        Resyncer.check(resource)
    store = open_store(config.store.url.get_secret_value())
    bus = make_bus(config, stop=stop, name="rwatch resync")
    sinks = make_sinks(config) if isinstance(bus, MemoryBus) else {}
    outcome: dict[str, ResyncResult | BaseException] = {}
    try:
        await store.open()
        for sink in sinks.values():
            await sink.open()
        if isinstance(bus, MemoryBus):
            subscribe_sinks(bus, config, sinks, stop)
        await bus.start()
        async with CmdbClient(config.cmdb) as client:
            await probe(client, config, resources)
            resyncer = Resyncer(config, client, bus, stop, progress=progress, store=store,
                                allow_mass_delete=allow_mass_delete)

            async def one(resource: str) -> None:
                gaps = await store.gaps(config.cmdb.tenant, resource)
                try:
                    outcome[resource] = result = await resyncer.run(resource, trigger="manual")
                except Exception as exc:  # logged by the resyncer; the others go on
                    outcome[resource] = exc
                    return
                if result.complete:  # else nothing was swept: the gaps stay open (resync_incomplete says why)
                    await fill_gaps(gaps, result, lambda gap: store.fill_gap(gap.id, time.time()),
                                    log.bind(resource=resource))

            await asyncio.gather(*(one(r) for r in resources))
    finally:
        await bus.close()
        for sink in reversed(list(sinks.values())):
            await sink.close()
        await store.close()
    return outcome
