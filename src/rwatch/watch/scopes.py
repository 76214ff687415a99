"""The listings a resync takes, one per resource, each returning the scope its sweep may touch.

Each object is listed through the APIs of cmdb-watch-api.md §6, keyset-paged by its id (``rwatch.cmdb.listing``),
under the client's rate limit and at most ``watch.resync_concurrency`` requests in flight. A listing's scope keeps
its sweep to what it could see: a user who is not a CMDB administrator sees only the businesses IAM lets it view,
so a business missing from ``search_business`` that the stream showed alive is *hidden*, never evidence of a
delete (cmdb-watch-api §10.5): where a sweep would reach its objects, the listing is not proved complete.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog

from rwatch import metrics as m
from rwatch.cmdb import protocol as p
from rwatch.cmdb.client import CmdbClient
from rwatch.cmdb.listing import LIMITS, ListApi
from rwatch.config import Config
from rwatch.errors import ListingBroken, ResyncUnsupported
from rwatch.events import Event, iso_utc
from rwatch.store.base import CursorStore
from rwatch.store.records import BizSighting
from rwatch.watch.head import take_head
from rwatch.watch.snapshot import Progress, Scope, Snapshot, gather_bounded

log = structlog.get_logger("rwatch.resync")

# How a proof failure caused by businesses hidden from the user starts (verify tells these apart).
HIDDEN_REASON: Final = "search_business does not list"
# A value no business has: a filter on bk_data_status is what makes search_business show archived ones.
_ANY_STATUS: Final = {"field": "bk_data_status", "operator": "not_equal", "value": "__rwatch_any__"}


class Lister:
    """Takes snapshots (the head, then every object of a resource) through one CMDB client."""

    SUPPORTED: Final = frozenset({"host", "host_relation", "biz", "set", "module", "plat", "project", "biz_set"})

    def __init__(self, config: Config, client: CmdbClient, stop: asyncio.Event, *,
                 progress: Progress | None = None, store: CursorStore | None = None) -> None:
        self.config = config
        self.client = client
        self.stop = stop
        self.tenant = config.cmdb.tenant
        self.progress = progress
        self.lists = ListApi(client, stop, config.watch.resync_concurrency)
        # The record of businesses the stream showed (``BizSighting``): without it, hidden businesses cannot be
        # told apart and a business resync never sweeps (only a test's bare resyncer has none).
        self.store = store
        self.hidden: list[int] | None = None  # the last check's hidden businesses (None: not checked yet)

    @classmethod
    def check(cls, resource: str) -> None:
        if resource not in cls.SUPPORTED:
            raise ResyncUnsupported(
                f"no list API covers every {resource} object, so {resource} cannot be resynced "
                f"(resyncable: {', '.join(sorted(cls.SUPPORTED))})", resource=resource)

    async def head(self, resource: str) -> tuple[int, int]:
        """The snapshot's version (``rwatch.watch.head``)."""
        return await take_head(self.client, resource, self.stop)

    async def snapshot(self, resource: str, out: Callable[[list[Event]], Awaitable[None]], *, resync_id: str = "",
                       on_head: Callable[[tuple[int, int]], object] | None = None) -> Snapshot:
        """Take the head, then list every object of ``resource`` as snapshot events handed to ``out`` page by
        page (``Resyncer.run`` publishes them; ``verify`` compares them)."""
        self.check(resource)
        version = await self.head(resource)
        if on_head is not None:
            on_head(version)
        settings = self.config.watch.resources[resource]
        fields = [] if resource in p.FIELDS_IGNORED else list(settings.fields)
        snap = Snapshot(resource, version, fields, self.tenant, out, self.lists, self.progress,
                        observed=iso_utc(time.time()), occurred=iso_utc(version[0]), resync_id=resync_id)
        snap.scope = await getattr(self, f"_list_{resource}")(snap)
        return snap

    # --- one lister per resource: emit the snapshot, return the sweep's scope --------------------------------

    async def _list_host(self, run: Snapshot) -> Scope:
        # list_hosts_without_biz with no business: every host the user may see, the resource pool's included.
        await self._check_hidden(run, await self._businesses(run), sweeps_hidden=True)
        await run.emit_pages("list_hosts_without_biz", "bk_host_id", body=run.body("bk_host_id"),
                             param="host_property_filter")
        return None

    async def _list_host_relation(self, run: Snapshot) -> Scope:
        bizs = await self._businesses(run)
        await self._check_hidden(run, bizs, sweeps_hidden=False)
        hosts = await run.read_all("list_hosts_without_biz", "bk_host_id", body={"fields": ["bk_host_id"]},
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
            await run.emit(docs)

        await gather_bounded([relations(ids[i:i + size]) for i in range(0, len(ids), size)],
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
        bizs = await run.read_all("search_business", "bk_biz_id", body={"fields": ["bk_biz_id"],
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
        body = {**run.body("bk_biz_id", "default"), "biz_property_filter": _ANY_STATUS}
        listed: list[int] = []
        out = run.out

        async def keep(events: list[Event]) -> None:
            listed.extend(int(e.key) for e in events)
            await out(events)

        run.out = keep
        try:
            await run.emit_pages("search_business", "bk_biz_id", body=body, param="biz_property_filter")
        finally:
            run.out = out
        await self._check_hidden(run, listed, sweeps_hidden=True)
        return {"default": [0]}

    async def _per_biz(self, run: Snapshot, list_one: Callable[[int], Awaitable[None]]) -> Scope:
        bizs = await self._businesses(run)
        # The sweep is scoped to the listed businesses: hidden ones are reported, and nothing of them is touched.
        await self._check_hidden(run, bizs, sweeps_hidden=False)
        await gather_bounded([list_one(b) for b in bizs], self.config.watch.resync_concurrency)
        return {"bk_biz_id": bizs}

    async def _list_set(self, run: Snapshot) -> Scope:
        async def one(biz: int) -> None:
            # By a legacy condition: the ESB's search_set forwards only fields, condition and page and drops a
            # filter (cmdb-watch-api §10.3); the gateway accepts either.
            await run.emit_pages("search_set", "bk_set_id", style="condition", param="condition",
                                 body=run.body("bk_set_id", "bk_biz_id"), bk_biz_id=biz)
        return await self._per_biz(run, one)

    async def _list_module(self, run: Snapshot) -> Scope:
        async def one(biz: int) -> None:
            await run.emit_pages("search_module", "bk_module_id", style="condition", param="condition",
                                 body=run.body("bk_module_id", "bk_biz_id"), bk_biz_id=biz, bk_set_id=0)
        return await self._per_biz(run, one)

    async def _list_plat(self, run: Snapshot) -> Scope:
        await run.emit_pages("search_cloud_area", "bk_cloud_id", style="condition", param="condition",
                             body=run.body("bk_cloud_id"))
        return None

    async def _list_project(self, run: Snapshot) -> Scope:
        await run.emit_pages("list_project", "id", body=run.body("id"))
        return None

    async def _list_biz_set(self, run: Snapshot) -> Scope:
        await run.emit_pages("list_business_set", "bk_biz_set_id", body=run.body("bk_biz_set_id"),
                             param="bk_biz_set_filter")
        return None


def _ids(ids: Sequence[int], most: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:most])
    return f"{shown}, ... ({len(ids)} in all)" if len(ids) > most else shown
