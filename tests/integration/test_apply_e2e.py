"""End to end, the apply half: simulator -> watcher -> bus -> consumer -> SQL mirror, compared with the truth.

Over RabbitMQ and over the memory bus, into SQLite and into PostgreSQL: 10,000 random operations
(create, update, delete, move across biz, set, module, host and host_relation); after quiescence the
mirror's live rows equal the simulator's objects field by field, and rwatch_topology equals the join
computed from the simulator's state. The mirror is read the way another team would read it: by SQL,
through the documented schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rwatch.app import run_async
from rwatch.cmdb.protocol import NO_EVENT_CURSOR
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from rwatch.store.records import CursorState
from tests.integration.harness import MakeSetup, Setup

TOPOLOGY = ["biz", "set", "module", "host", "host_relation"]
MIX = {"host.create": 4, "host.update": 8, "host.delete": 2, "host.move": 6, "set.create": 1, "set.update": 2,
       "set.delete": 1, "module.create": 2, "module.update": 3, "module.delete": 1, "biz.create": 1,
       "biz.update": 2}


def async_url(url: str) -> str:
    parsed = make_url(url)
    driver = "sqlite+aiosqlite" if parsed.get_backend_name() == "sqlite" else "postgresql+asyncpg"
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


async def mirror_rows(engine: AsyncEngine, resource: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT key, data FROM rwatch_objects WHERE tenant = '0' AND resource = :r AND NOT deleted"
        ), {"r": resource})).all()
    return {key: orjson.loads(data) if isinstance(data, str | bytes) else data for key, data in rows}


async def mirror_topology(engine: AsyncEngine) -> set[tuple[Any, ...]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT bk_biz_id, bk_biz_name, bk_set_id, bk_set_name, bk_module_id, bk_module_name, bk_host_id, "
            "bk_host_innerip, bk_cloud_id, bk_host_name FROM rwatch_topology"
        ))).all()
    return {tuple(r) for r in rows}


def truth(setup: Setup, sim: Simulator, resource: str) -> dict[str, Any]:
    fields = setup.fields(resource)
    objects = sim.state.objects(resource)
    if fields is None:
        return objects
    return {key: {f: doc.get(f) for f in fields} for key, doc in objects.items()}


def truth_topology(sim: Simulator) -> set[tuple[Any, ...]]:
    hosts, modules = sim.state.objects("host"), sim.state.objects("module")
    sets, bizs = sim.state.objects("set"), sim.state.objects("biz")
    rows = set()
    for rel in sim.state.objects("host_relation").values():
        host, module = hosts.get(str(rel["bk_host_id"]), {}), modules.get(str(rel["bk_module_id"]), {})
        set_, biz = sets.get(str(rel["bk_set_id"]), {}), bizs.get(str(rel["bk_biz_id"]), {})
        rows.add((rel["bk_biz_id"], biz.get("bk_biz_name"), rel["bk_set_id"], set_.get("bk_set_name"),
                  rel["bk_module_id"], module.get("bk_module_name"), rel["bk_host_id"],
                  host.get("bk_host_innerip"), host.get("bk_cloud_id"), host.get("bk_host_name")))
    return rows


async def differences(engine: AsyncEngine, setup: Setup, sim: Simulator) -> list[str]:
    problems = []
    for resource in TOPOLOGY:
        try:
            got = await mirror_rows(engine, resource)
        except DBAPIError as exc:  # rwatch has not created the mirror yet
            return [f"mirror not readable yet: {exc.orig}"]
        want = truth(setup, sim, resource)
        if got != want:
            missing = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])[:5]
            problems.append(f"{resource}: missing {missing} extra {extra} differing {changed}")
    return problems


async def seed_from_start(setup: Setup) -> None:
    """Position every watcher at the start of CMDB's retained history, so the mirror sees the whole topology.

    The NoEventCursor means exactly that to the server (cmdb-watch-api §3.3); rwatch itself never saves it.
    """
    store = open_store(setup.store_url)
    await store.open()
    try:
        for resource in TOPOLOGY:
            await store.save(CursorState("0", resource, NO_EVENT_CURSOR, None, None, time.time()))
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def rwatch_all(setup: Setup) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_async(setup.config(), stop, role="all"))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mirror_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mirror.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.mark.parametrize("bus", [pytest.param("amqp", marks=pytest.mark.amqp), "memory"])
async def test_mirror_equals_cmdb_after_10000_random_operations(
    setups: MakeSetup, mirror_url: str, bus: str
) -> None:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=21, bizs=3, hosts=80)) as sim:
        setup = setups(sim.url, TOPOLOGY, mirror_url=mirror_url, bus=bus)
        await seed_from_start(setup)
        engine = create_async_engine(async_url(mirror_url))
        try:
            async with rwatch_all(setup):
                sim.load.set_mix(MIX)
                for _ in range(10):
                    sim.load.run(1000)
                    await asyncio.sleep(0)  # let the watchers interleave with the workload
                deadline = time.monotonic() + 180
                while problems := await differences(engine, setup, sim):
                    assert time.monotonic() < deadline, "\n".join(problems)
                    await asyncio.sleep(0.2)
            assert await mirror_topology(engine) == truth_topology(sim)
            assert sum(len(sim.state.objects(r)) for r in TOPOLOGY) > 100
        finally:
            await engine.dispose()
