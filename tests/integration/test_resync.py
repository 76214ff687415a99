"""Resync end to end: gaps filled, deletions swept, live changes never undone by the snapshot.

The simulator is the CMDB (real HTTP); rwatch runs in-process through ``run_async``; the mirror is read by
SQL through the documented schema and compared with the simulator's objects field by field.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rwatch.bus.memory import MemoryBus
from rwatch.cmdb.client import CmdbClient
from rwatch.logs import setup_logging
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.sinks.mirror import MirrorSink
from rwatch.store.base import open_store
from rwatch.store.records import Gap
from rwatch.watch.resync import Resyncer
from rwatch.wiring import subscribe_sinks
from tests.entrypoint import RWATCH
from tests.integration.harness import MakeSetup, Setup
from tests.integration.test_apply_e2e import (
    MIX,
    TOPOLOGY,
    async_url,
    differences,
    mirror_rows,
    rwatch_all,
    seed_from_start,
    truth,
)


class LogRecorder(logging.Handler):
    """The event names of every log record from here on (whatever stream the logs are configured to)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        # Earlier tests may have reset structlog to its defaults (printing, bypassing the stdlib) or pointed the
        # logs at a stream of theirs: route them through the stdlib's root logger again, as `rwatch run` does.
        setup_logging("info", "json", io.StringIO())
        root = logging.getLogger()
        self.level = root.level
        root.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(str(record.msg.get("event") if isinstance(record.msg, dict) else record.msg))

    def events(self) -> list[str]:
        logging.getLogger().removeHandler(self)
        logging.getLogger().setLevel(self.level)
        return self.lines


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def converge(engine: AsyncEngine, setup: Setup, sim: Simulator, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while problems := await differences(engine, setup, sim):
        assert time.monotonic() < deadline, "\n".join(problems)
        await asyncio.sleep(0.2)


async def all_gaps(setup: Setup) -> list[Gap]:
    store = open_store(setup.store_url)
    await store.open()
    try:
        return await store.gaps("0", open_only=False)
    finally:
        await store.close()


@pytest.fixture(params=[pytest.param("amqp", marks=pytest.mark.amqp), "memory"])
def bus(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_gap_past_retention_is_filled_by_resync_deletions_included(
    setups: MakeSetup, tmp_path: Path, bus: str
) -> None:
    """Stopped; CMDB creates, updates and deletes; its clock jumps past retention; restarted: the gap is
    recorded, resynced and filled, and the mirror equals CMDB exactly."""
    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    options = SimOptions(port=0, hold=1.0, error_delay=0.01, seed=8, bizs=3, hosts=120, retention=3 * 3600)
    async with Simulator(options) as sim:
        # 400 changes while stopped: more than the mass-delete guard's default share of some scopes.
        setup = setups(sim.url, TOPOLOGY, mirror_url=mirror_url, bus=bus, watch="mass_delete_share = 0.6")
        await seed_from_start(setup)
        engine = create_async_engine(async_url(mirror_url))
        try:
            async with rwatch_all(setup):
                await converge(engine, setup, sim)
            before = {r: await mirror_rows(engine, r) for r in TOPOLOGY}
            # rwatch is down. Changes of every kind happen, then fall out of CMDB's history for good.
            sim.load.set_mix(MIX)
            sim.load.run(400)
            deleted = {r: set(before[r]) - set(sim.state.objects(r)) for r in TOPOLOGY}
            assert deleted["host"] and deleted["host_relation"], "the workload must delete something"
            sim.state.clock.jump(4 * 3600)
            sim.load.run(50)  # and some inside the window that is left
            records = LogRecorder()
            resyncs_before = metric("rwatch_resyncs_total", resource="host", trigger="gap", outcome="ok")
            gaps_before = metric("rwatch_cursor_gaps_total", resource="host")
            filled_before = metric("rwatch_cursor_gaps_filled_total", resource="host")
            async with rwatch_all(setup):
                await converge(engine, setup, sim)
                deadline = time.monotonic() + 60
                while any(g.filled_at is None for g in await all_gaps(setup)):
                    assert time.monotonic() < deadline, await all_gaps(setup)
                    await asyncio.sleep(0.2)
            for resource in TOPOLOGY:
                assert await mirror_rows(engine, resource) == truth(setup, sim, resource), resource
            gaps = await all_gaps(setup)
            assert {g.resource for g in gaps} == set(TOPOLOGY)
            assert all(g.reason == "cursor_expired" and g.filled_at is not None for g in gaps)
            assert metric("rwatch_cursor_gaps_total", resource="host") == gaps_before + 1
            assert metric("rwatch_cursor_gaps_filled_total", resource="host") == filled_before + 1
            # The logs tell the story: the cursor expires, the gap opens, a resync fills it.
            logs = records.events()
            for event in ("cursor_expired", "cursor_gap", "cursor_gap_filled"):
                assert event in logs, (event, sorted(set(logs)))
            assert metric("rwatch_resyncs_total", resource="host", trigger="gap", outcome="ok") > resyncs_before
        finally:
            await engine.dispose()


async def test_bootstrap_resync_fills_an_empty_mirror(setups: MakeSetup, tmp_path: Path) -> None:
    """``bootstrap = "resync"``: the first start records [0, now) as a gap and lists everything. The resource
    pool business (and its idle set and module) is invisible to the list APIs: it comes from the watch."""
    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=4, bizs=3, hosts=700)) as sim:
        setup = setups(sim.url, TOPOLOGY, mirror_url=mirror_url, bus="memory", bootstrap="resync")
        engine = create_async_engine(async_url(mirror_url))
        pool = {"biz": {str(sim.state.pool_biz_id)}, "set": {str(sim.state.idle_set_id)},
                "module": {str(sim.state.idle_module_id)}}
        try:
            async with rwatch_all(setup):
                deadline = time.monotonic() + 60
                while True:
                    got = {r: await rows(engine, r) for r in TOPOLOGY}
                    want = {r: {k: v for k, v in truth(setup, sim, r).items() if k not in pool.get(r, ())}
                            for r in TOPOLOGY}
                    # The last page lands in the mirror before the mark is swept and the gap marked filled.
                    open_gaps = [g.resource for g in await all_gaps(setup) if g.filled_at is None]
                    if got == want and not open_gaps:
                        break
                    assert time.monotonic() < deadline, (
                        {r: len(got[r]) - len(want[r]) for r in TOPOLOGY}, open_gaps)
                    await asyncio.sleep(0.2)
            gaps = await all_gaps(setup)
            assert {g.resource for g in gaps} == set(TOPOLOGY)
            assert all(g.reason == "bootstrap" and g.start == 0.0 and g.filled_at is not None for g in gaps)
            # 700 hosts: the host list took two pages of 500, keyset-paged.
            assert sim.stats.lists["list_hosts_without_biz"] >= 2
        finally:
            await engine.dispose()


# --- a live change during a resync ---------------------------------------------------------------------


class Interleaver:
    """Wraps the resync's list calls: after the page holding ``key`` came back (and before it is published),
    change that object in CMDB and wait until the live stream applied the change to the mirror. The snapshot
    then publishes the older row: the version fence must keep the live change."""

    def __init__(self, resyncer: Resyncer, after: Callable[[list[dict[str, Any]]], Awaitable[None]]) -> None:
        self.calls = 0
        original = resyncer.lists.call

        async def call(api: str, body: dict[str, Any], requests: Any, **path: Any) -> Any:
            data = await original(api, body, requests, **path)
            self.calls += 1
            if api == "list_hosts_without_biz" and self.calls == 2:
                await after(data["info"])
            return data

        resyncer.lists.call = call  # type: ignore[method-assign]


async def test_live_changes_during_a_resync_are_never_undone(setups: MakeSetup, tmp_path: Path) -> None:
    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=6, bizs=2, hosts=1200)) as sim:
        setup = setups(sim.url, ["host"], mirror_url=mirror_url, bus="memory")
        await seed_from_start(setup)
        engine = create_async_engine(async_url(mirror_url))
        config = setup.config()
        try:
            async with rwatch_all(setup):
                await converge_one(engine, setup, sim, "host")
                listed: list[str] = []

                async def change_behind_the_snapshot(page: list[dict[str, Any]]) -> None:
                    # Page 2 (hosts 501..1000) is in hand, not yet published. Update one of its hosts, delete
                    # another, and create a new host (after the head, outside every page): all live.
                    updated, removed = str(page[10]["bk_host_id"]), str(page[20]["bk_host_id"])
                    listed.extend([updated, removed])
                    sim.state.update("host", updated, {"bk_host_name": "live-during-resync"})
                    sim.state.delete("host", removed)  # its relations go with it
                    created = str(sim.state.create("host")["bk_host_id"])
                    listed.append(created)
                    await converge_one(engine, setup, sim, "host")  # the live stream applied all three

                stop = asyncio.Event()
                resync_bus = MemoryBus(stop=stop)
                mirror = MirrorSink("mirror", config.sinks["mirror"])  # type: ignore[arg-type]
                await mirror.open()
                subscribe_sinks(resync_bus, config, {"mirror": mirror}, stop)
                await resync_bus.start()
                try:
                    async with CmdbClient(config.cmdb) as client, \
                            open_store(config.store.url.get_secret_value()) as store:
                        resyncer = Resyncer(config, client, resync_bus, stop, store=store)
                        hook = Interleaver(resyncer, change_behind_the_snapshot)
                        result = await resyncer.run("host")
                        assert result.complete  # so the mark went out and the sink swept
                finally:
                    await mirror.close()
                assert hook.calls >= 3 and len(listed) == 3
                rows = await mirror_rows(engine, "host")
                updated, removed, created = listed
                assert rows[updated]["bk_host_name"] == "live-during-resync"  # not undone by the snapshot row
                assert removed not in rows  # not resurrected by it
                assert created in rows  # not swept: newer than the snapshot's head
                assert result.listed >= 1200
                await converge_one(engine, setup, sim, "host")
        finally:
            await engine.dispose()


async def rows(engine: AsyncEngine, resource: str) -> dict[str, Any]:
    try:
        return await mirror_rows(engine, resource)
    except DBAPIError:  # the mirror's schema is not created yet
        return {}


async def converge_one(engine: AsyncEngine, setup: Setup, sim: Simulator, resource: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        got = await rows(engine, resource)
        if got == (want := truth(setup, sim, resource)):
            return
        assert time.monotonic() < deadline, (len(got), len(want))
        await asyncio.sleep(0.1)


# --- rwatch resync, the command ------------------------------------------------------------------------


async def rwatch_cmd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import os

    proc = await asyncio.create_subprocess_exec(RWATCH, *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_resync_command_fills_the_mirror_and_the_gaps_recorded_before_it(
    setups: MakeSetup, tmp_path: Path
) -> None:
    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=5, bizs=2, hosts=40)) as sim:
        setup = setups(sim.url, TOPOLOGY, mirror_url=mirror_url, bus="memory")
        store = open_store(setup.store_url)
        await store.open()
        try:
            gap = await store.add_gap("0", "host", 0.0, time.time(), "cursor_expired")
        finally:
            await store.close()
        code, out, err = await rwatch_cmd("resync", "--config", str(setup.path), "--resource", "host",
                                          "--resource", "host_relation", "--progress")
        assert code == 0, err
        assert "host: 40 objects" in out and "host_relation: 40 objects" in out
        assert "40/40" in err  # the progress bar's last state
        engine = create_async_engine(async_url(mirror_url))
        try:
            for resource in ("host", "host_relation"):
                assert await mirror_rows(engine, resource) == truth(setup, sim, resource)
        finally:
            await engine.dispose()
        (filled,) = await all_gaps(setup)
        assert filled.id == gap.id and filled.filled_at is not None

        code, _, err = await rwatch_cmd("resync", "--config", str(setup.path), "--resource", "process")
        assert code == 2 and "process" in err
    code, _, err = await rwatch_cmd("resync", "--config", str(setup.path), "--resource", "host")
    assert code == 1 and "cannot reach CMDB" in err  # the simulator is gone


async def test_periodic_resync_repairs_drift_the_stream_never_showed(setups: MakeSetup, tmp_path: Path) -> None:
    """``watch.resync_every``: a row CMDB never had (drift the stream cannot show) is swept by the next
    periodic resync; an object changed behind the stream's back is corrected."""
    from rwatch.events import Event, iso_utc

    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=9, bizs=2, hosts=30)) as sim:
        setup = setups(sim.url, ["host"], mirror_url=mirror_url, bus="memory", extra="")
        text = setup.path.read_text().replace('lookback = "5m"', 'lookback = "5m"\nresync_every = "1s"')
        setup.path.write_text(text)
        await seed_from_start(setup)
        engine = create_async_engine(async_url(mirror_url))
        config = setup.config()
        assert config.watch.resync_every == 1.0
        before = metric("rwatch_resyncs_total", resource="host", trigger="periodic", outcome="ok")
        try:
            async with rwatch_all(setup):
                await converge_one(engine, setup, sim, "host")
                ghost = MirrorSink("ghost", config.sinks["mirror"])  # type: ignore[arg-type]
                await ghost.open()
                try:
                    await ghost.apply([Event(id="ghost", resource="host", action="create", key="999999",
                                             version=(1, 1), occurred_at=iso_utc(1), observed_at=iso_utc(1),
                                             data={"bk_host_id": 999999})])
                finally:
                    await ghost.close()
                assert "999999" in await rows(engine, "host")
                await converge_one(engine, setup, sim, "host")  # swept by a periodic resync
            assert metric("rwatch_resyncs_total", resource="host", trigger="periodic", outcome="ok") > before
        finally:
            await engine.dispose()
