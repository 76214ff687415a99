"""A real CMDB on day one (issue 11): rwatch against ``rwatch sim`` in each way users reach CMDB.

Each mode runs the whole life of an installation: an empty mirror with ``bootstrap = "resync"``, live changes,
a stop long enough for CMDB to forget the cursor (a gap past retention), and ``rwatch verify``. More than 500
projects, business sets and sets per business (and hosts), so that every listing pages, through real HTTP:

* ``gateway``: the single-tenant API gateway;
* ``multi_tenant``: a 3.15 CMDB in tenant mode, the app valid in every tenant, ``cmdb.tenant_id`` set;
* ``esb``: body credentials, the components' forwarding rules, and 5 % of all requests (watch and lists) answered
  by a gateway or ESB error at HTTP 200: no resync aborts, no watch request counts as permanent, nothing lost;
* ``non_admin``: a user who may not view one business: its objects stream in, and no resync ever deletes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rwatch.app import run_async
from rwatch.cli.jobs import verify
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from rwatch.store.records import Gap
from tests.integration.harness import MakeSetup, Setup
from tests.integration.test_apply_e2e import async_url, truth
from tests.integration.test_resync import LogRecorder

RESOURCES = ["biz", "set", "module", "host", "host_relation", "project", "biz_set", "plat"]
BIG = 505  # more than a page (500) of projects, business sets, sets per business and hosts
MIX = {"host.create": 4, "host.update": 8, "host.delete": 2, "host.move": 6, "set.create": 1, "set.update": 2,
       "set.delete": 1, "module.create": 2, "module.update": 3, "module.delete": 1, "biz.update": 2,
       "project.create": 2, "project.update": 2, "project.delete": 2, "biz_set.create": 1, "biz_set.update": 1,
       "biz_set.delete": 1}

# mode -> (simulator options, path under the simulator's URL, more [cmdb] keys, the events' tenant)
MODES: dict[str, tuple[dict[str, Any], str, str, str]] = {
    "gateway": ({}, "/api/bk-cmdb/prod", "", "0"),
    "multi_tenant": ({"tenant_mode": "multi", "tenant": "acme"}, "/api/bk-cmdb/prod", 'tenant_id = "acme"', "acme"),
    "esb": ({"gateway_error_rate": 0.05}, "", 'api = "esb"', "0"),
    "non_admin": ({}, "/api/bk-cmdb/prod", "", "0"),
}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def failures() -> dict[str, float]:
    """What must not move in the ESB mode: failed resyncs and watch requests taken as permanent or refused."""
    return {**{f"resync {r}": metric("rwatch_resyncs_total", resource=r, trigger=t, outcome="failed")
               for r in RESOURCES for t in ("bootstrap", "gap")},
            **{f"watch {r} {o}": metric("rwatch_watch_requests_total", resource=r, outcome=o)
               for r in RESOURCES for o in ("permanent", "refused")}}


async def mirror_rows(engine: AsyncEngine, tenant: str, resource: str) -> dict[str, Any]:
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT key, data FROM rwatch_objects WHERE tenant = :t AND resource = :r AND NOT deleted"),
                {"t": tenant, "r": resource})).all()
    except DBAPIError:  # not created yet
        return {}
    return {key: orjson.loads(data) if isinstance(data, str | bytes) else data for key, data in rows}


class World:
    """The simulator in one mode and what the mirror must hold."""

    def __init__(self, sim: Simulator, setup: Setup, tenant: str, hidden: set[int]) -> None:
        self.sim, self.setup, self.tenant, self.hidden = sim, setup, tenant, hidden
        self.pool = {"biz": {str(sim.state.pool_biz_id)}, "set": {str(sim.state.idle_set_id)},
                     "module": {str(sim.state.idle_module_id)}}

    def host_biz(self) -> dict[str, int]:
        return {str(r["bk_host_id"]): r["bk_biz_id"] for r in self.sim.state.objects("host_relation").values()}

    def in_hidden(self, resource: str, key: str, doc: dict[str, Any], host_biz: dict[str, int]) -> bool:
        if not self.hidden:
            return False
        if resource == "biz":
            return int(key) in self.hidden
        if resource == "host":
            return host_biz.get(key) in self.hidden
        return doc.get("bk_biz_id") in self.hidden

    def visible(self, resource: str, rows: dict[str, Any], host_biz: dict[str, int]) -> dict[str, Any]:
        """Rows the user can see, without the resource pool's own nodes (no list API shows them: they come only
        from the stream, when they change)."""
        pool = self.pool.get(resource, set())
        return {k: v for k, v in rows.items() if k not in pool and not self.in_hidden(resource, k, v, host_biz)}

    async def differences(self, engine: AsyncEngine, allowed_extra: dict[str, set[str]] | None = None) -> list[str]:
        problems = []
        host_biz = self.host_biz()
        for resource in RESOURCES:
            got = await mirror_rows(engine, self.tenant, resource)
            # A host the mirror holds with no relation left in CMDB: judged by the mirror's own relation rows.
            mirror_biz = {str(r["bk_host_id"]): r["bk_biz_id"]
                          for r in (await mirror_rows(engine, self.tenant, "host_relation")).values()}
            got = self.visible(resource, got, {**mirror_biz, **host_biz})
            want = self.visible(resource, truth(self.setup, self.sim, resource), host_biz)
            extra = set(got) - set(want) - (allowed_extra or {}).get(resource, set())
            missing = set(want) - set(got)
            changed = [k for k in set(got) & set(want) if got[k] != want[k]]
            if extra or missing or changed:
                problems.append(f"{resource}: missing {sorted(missing)[:5]} ({len(missing)}) extra "
                                f"{sorted(extra)[:5]} ({len(extra)}) changed {sorted(changed)[:5]} ({len(changed)})")
        return problems

    async def converge(self, engine: AsyncEngine, timeout: float = 120, **kw: Any) -> None:
        deadline = time.monotonic() + timeout
        while problems := await self.differences(engine, **kw):
            if time.monotonic() >= deadline:
                open_gaps = [(g.resource, g.reason) for g in await gaps(self.setup, self.tenant) if g.filled_at is None]
                raise AssertionError("\n".join([*problems, f"open gaps: {open_gaps}",
                                                 f"simulator faults fired: {dict(self.sim.faults.fired)}"]))
            await asyncio.sleep(0.25)


async def gaps(setup: Setup, tenant: str) -> list[Gap]:
    async with open_store(setup.store_url) as store:
        return await store.gaps(tenant, open_only=False)


async def wait_gaps(setup: Setup, tenant: str, reason: str, open_ok: set[str], timeout: float = 90) -> list[Gap]:
    """Until every resource has a gap for ``reason`` and every one of them is filled, but those in ``open_ok``
    (which may stay open: nothing proves their listing complete)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [g for g in await gaps(setup, tenant) if g.reason == reason]
        if {g.resource for g in got} == set(RESOURCES) and all(
                g.filled_at is not None for g in got if g.resource not in open_ok):
            return got
        assert time.monotonic() < deadline, [(g.resource, g.filled_at) for g in got]
        await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def daemon(setup: Setup) -> AsyncIterator[int]:
    """``rwatch run`` in-process; yields its HTTP port."""
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_async(setup.config(), stop, role="all", http_port=port))
    try:
        yield await asyncio.wait_for(port, 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


def populate(sim: Simulator) -> None:
    """More than a page of projects and business sets (the simulator already has BIG sets per business)."""
    for _ in range(BIG):
        sim.state.create("project")
        # A scope that matches no business: membership events for 505 sets would only slow the test down.
        sim.state.create("biz_set", {"bk_scope": {"match_all": False}})


# 5 % of requests failing pushes some pauses to tens of seconds (the watch backoff resets only after two healthy
# minutes); the waits below say what is missing well before this.
@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", list(MODES))
async def test_every_deployment_mode_from_empty_mirror_through_a_gap_to_verify(
        mode: str, setups: MakeSetup, tmp_path: Path) -> None:
    options, path, cmdb, tenant = MODES[mode]
    sim_options = SimOptions(port=0, hold=1.0, error_delay=0.01, seed=11, retention=3 * 3600,
                             bizs=3 if mode == "non_admin" else 2,
                             sets_per_biz=BIG, modules_per_set=1, hosts=BIG + 15, **options)
    async with Simulator(sim_options) as sim:
        populate(sim)
        hidden: set[int] = set()
        if mode == "non_admin":
            hidden = {max(b["bk_biz_id"] for b in sim.state.objects("biz").values() if b["default"] == 0)}
            sim.permissions.update({"hide_bizs": sorted(hidden)})
        mirror_url = f"sqlite:///{tmp_path}/mirror.db"
        # 300 changes while stopped delete more than the guard's default 10 % of some scopes: let them through
        # here (tests/watch/test_guard.py holds them).
        setup = setups(sim.url + path, RESOURCES, mirror_url=mirror_url, bus="memory", bootstrap="resync",
                       cmdb=cmdb, watch="mass_delete_share = 0.6")
        records = LogRecorder()
        world = World(sim, setup, tenant, hidden)
        engine = create_async_engine(async_url(mirror_url))
        before = failures()
        sim.load.set_mix(MIX)
        try:
            # 1. From an empty mirror: the bootstrap resync lists everything the user can see, every listing
            #    paged; then live changes flow through the watch.
            async with daemon(setup) as port:
                await world.converge(engine)
                # Hidden businesses are known once the biz stream showed one: maybe not yet at the bootstrap.
                await wait_gaps(setup, tenant, "bootstrap", {"biz", "host"} if hidden else set())
                assert sim.stats.lists["search_set"] >= 2 * 2  # 505 sets in each visible business: two pages each
                assert sim.stats.lists["list_project"] >= 3 and sim.stats.lists["list_business_set"] >= 3
                sim.load.run(300)
                if hidden:  # the hidden business and some of its hosts change: their events stream in
                    biz = str(next(iter(hidden)))
                    sim.state.update("biz", biz, {"bk_biz_maintainer": "someone"})
                    module = next(m for m in sim.state.objects("module").values() if m["bk_biz_id"] in hidden)
                    for host in list(sim.state.objects("host"))[:5]:
                        sim.state.move_host(int(host), [module["bk_module_id"]])
                await world.converge(engine)
                if hidden:
                    assert biz in await mirror_rows(engine, tenant, "biz")
                    status, body = await readyz(port)
                    assert status == 503 and body["status"] == "degraded" and body["failing"] == ["hidden_businesses"]
                    assert body["checks"]["hidden_businesses"]["ids"] == sorted(hidden)
                    assert metric("rwatch_cmdb_hidden_businesses") == len(hidden)
                    assert "businesses_hidden" in records.lines and "resync_incomplete" in records.lines
            kept = {r: set(await mirror_rows(engine, tenant, r)) for r in RESOURCES}

            # 2. Stopped; CMDB changes, deletes included, then forgets: its clock jumps past the retention.
            sim.load.run(300)
            for key in list(sim.state.objects("project"))[:20]:
                sim.state.delete("project", key)
            sim.state.create("plat")  # every resource moves on, so every saved cursor is forgotten
            deleted = {r: kept[r] - set(sim.state.objects(r)) for r in RESOURCES}
            assert deleted["host"] and deleted["set"] and deleted["project"], "the workload must delete"
            sim.state.clock.jump(4 * 3600)
            sim.load.run(30)
            # A host deleted in the lost interval cannot be proved gone while a business is hidden (it may have
            # moved there): the mirror keeps it, and verify reports it as unproven, not as equal or as drift.
            unproven = {k for k in deleted["host"] if k not in sim.state.objects("host")} if hidden else set()
            async with daemon(setup) as port:
                await world.converge(engine, allowed_extra={"host": unproven})
                got = await wait_gaps(setup, tenant, "cursor_expired", {"biz", "host"} if hidden else set())
                if hidden:  # a resync that found the hidden business swept nothing: those gaps stay open
                    assert {g.resource for g in got if g.filled_at is None} == {"biz", "host"}
            if hidden:
                # Nothing of the hidden business was deleted by a resync.
                assert biz in await mirror_rows(engine, tenant, "biz")
                still = set(await mirror_rows(engine, tenant, "host")) & set(sim.state.objects("host"))
                assert {h for h in kept["host"] if world.host_biz().get(h) in hidden} <= still

            # 3. rwatch verify: the mirror equals CMDB, object by object.
            report = await verify(setup.config())
            by = {r.resource: r for r in report.resources}
            assert report.drift == 0, {r.resource: (r.missing[:5], r.extra[:5], r.changed[:5])
                                       for r in report.resources}
            # Unproven: hosts the mirror holds that CMDB does not list and that the mirror does not know to be in a
            # hidden business: deleted, or moved into one, while history was lost. Nothing can tell them apart.
            mirror_hosts = await mirror_rows(engine, tenant, "host")
            mirror_biz = {str(r["bk_host_id"]): r["bk_biz_id"]
                          for r in (await mirror_rows(engine, tenant, "host_relation")).values()}
            listed = {h for h, b in world.host_biz().items() if b not in hidden}
            want = {h for h in mirror_hosts if h not in listed and mirror_biz.get(h) not in hidden}
            assert set(by["host"].unproven) == want and (want or not hidden)
            assert {h for h in unproven if mirror_biz.get(h) not in hidden} <= want
            assert all(h not in sim.state.objects("host") or world.host_biz()[h] in hidden for h in want)
            assert all(by[r].hidden_businesses == sorted(hidden) for r in ("biz", "set", "module", "host"))
            logs = records.events()
            assert ("businesses_hidden" in logs) == bool(hidden)
            if mode == "esb":
                assert sim.faults.fired["gateway"] >= 5, sim.faults.fired  # the errors did happen...
                assert failures() == before  # ...and none aborted a resync or looked permanent
        finally:
            await engine.dispose()


async def test_multi_tenant_with_the_old_default_names_the_setting_and_writes_nothing(
        setups: MakeSetup, tmp_path: Path) -> None:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, tenant_mode="multi", tenant="acme")) as sim:
        mirror_url = f"sqlite:///{tmp_path}/mirror.db"
        setup = setups(sim.url + "/api/bk-cmdb/prod", ["biz", "host"], mirror_url=mirror_url, bus="memory",
                       bootstrap="resync", cmdb='refusal_retry = "1s"')
        engine = create_async_engine(async_url(mirror_url))
        try:
            async with daemon(setup) as port:
                deadline = time.monotonic() + 30
                while True:
                    status, body = await readyz(port)
                    if {"cmdb:biz", "cmdb:host"} <= set(body.get("failing", [])):
                        break
                    assert time.monotonic() < deadline, body
                    await asyncio.sleep(0.2)
                assert status == 503 and body["status"] == "not_ready"
                check = body["checks"]["cmdb:host"]
                assert check["reason"] == "tenant" and check["code"] == 1640302 and "cmdb.tenant_id" in check["fix"]
                await asyncio.sleep(2)  # a few more refused rounds
            for tenant in ("0", "acme"):
                for resource in ("biz", "host"):
                    assert not await mirror_rows(engine, tenant, resource)
            assert sim.stats.watch_requests() == 0 and sum(sim.stats.lists.values()) == 0
        finally:
            await engine.dispose()
