"""Silent loss: CMDB drops events on purpose (as the real server does for same-cursor changes); the watch
cannot see it, ``rwatch verify`` can: it names the exact keys, ``--repair`` fixes them, and a second verify
finds nothing. Over RabbitMQ (the running daemon's consumers apply the repair) and over the memory bus (the
command applies it itself), with the daemon running throughout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import create_async_engine

from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from tests.integration.harness import MakeSetup
from tests.integration.test_apply_e2e import TOPOLOGY, async_url, rwatch_all, seed_from_start
from tests.integration.test_resync import converge, converge_one, rwatch_cmd


def drift_of(report: dict[str, Any], resource: str) -> dict[str, list[str]]:
    (entry,) = [r for r in report["resources"] if r["resource"] == resource]
    return {kind: sorted(entry[kind]) for kind in ("missing", "extra", "changed")}


@pytest.mark.parametrize("bus", [pytest.param("amqp", marks=pytest.mark.amqp), "memory"])
async def test_verify_finds_silently_lost_events_and_repair_fixes_them(
    setups: MakeSetup, tmp_path: Path, bus: str
) -> None:
    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=12, bizs=3, hosts=90)) as sim:
        setup = setups(sim.url, TOPOLOGY, mirror_url=mirror_url, bus=bus)
        await seed_from_start(setup)
        engine = create_async_engine(async_url(mirror_url))
        config = str(setup.path)
        try:
            async with rwatch_all(setup):
                await converge(engine, setup, sim)
                code, out, err = await rwatch_cmd("verify", "--config", config, "--json")
                assert code == 0, err
                hosts = sorted(sim.state.objects("host"), key=int)
                # The next three host changes produce no event; the objects change all the same.
                sim.faults.schedule({"kind": "drop_event", "resource": "host", "count": 3})
                sim.state.update("host", hosts[3], {"bk_host_name": "lost-update-1"})
                sim.state.update("host", hosts[7], {"bk_host_name": "lost-update-2"})
                sim.state.delete("host", hosts[11])  # its host_relation deletes still stream
                assert sim.state.events_dropped == 3
                sim.state.update("host", hosts[0], {"bk_host_name": "seen"})  # the stream goes on
                await converge_one(engine, setup, sim, "host_relation")
                deadline = asyncio.get_running_loop().time() + 30
                while True:  # wait until the seen change arrived: the stream is past the losses
                    code, out, err = await rwatch_cmd("verify", "--config", config, "--json", "--resource", "host")
                    report = json.loads(out)
                    if hosts[0] not in drift_of(report, "host")["changed"]:
                        break
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.5)
                assert code == 1, err
                assert drift_of(report, "host") == {"missing": [], "extra": [hosts[11]],
                                                    "changed": sorted([hosts[3], hosts[7]])}
                code, out, err = await rwatch_cmd("verify", "--config", config, "--repair")
                assert code == 0, out + err
                assert "repaired" in out
                code, out, err = await rwatch_cmd("verify", "--config", config, "--json")
                assert code == 0, out + err
                assert all(r["missing"] == r["extra"] == r["changed"] == [] for r in json.loads(out)["resources"])
                await converge(engine, setup, sim)
        finally:
            await engine.dispose()


async def test_verify_metric_reports_the_last_result(setups: MakeSetup, tmp_path: Path) -> None:
    """The command keeps its result in the store; the daemon's /metrics carries the last one (per sink and
    resource) and when it ran."""
    from rwatch.cli.jobs import verify
    from rwatch.metrics import VERIFY_DRIFT, VERIFY_LAST_RUN
    from rwatch.store.base import open_store

    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=13, bizs=2, hosts=30)) as sim:
        setup = setups(sim.url, ["host"], mirror_url=mirror_url, bus="memory")
        await seed_from_start(setup)
        engine = create_async_engine(async_url(mirror_url))
        try:
            async with rwatch_all(setup):
                await converge_one(engine, setup, sim, "host")
            key = next(iter(sim.state.objects("host")))
            sim.state.update("host", key, {"bk_host_name": "behind-its-back"})  # rwatch is stopped
            report = await verify(setup.config(), resources=["host"])
            assert report.drift == 1
            store = open_store(setup.store_url)
            await store.open()
            try:
                (kept,) = await store.verify_results("0")
            finally:
                await store.close()
            assert (kept.sink, kept.resource, kept.changed, kept.drift) == ("mirror", "host", 1, 1)
            # What a daemon started later exposes comes from the store, not from this process's gauges.
            VERIFY_DRIFT.labels("mirror", "host").set(-1)
            VERIFY_LAST_RUN.labels("mirror").set(0)
            labels = {"sink": "mirror", "resource": "host"}
            async with rwatch_all(setup):
                deadline = asyncio.get_running_loop().time() + 10
                while REGISTRY.get_sample_value("rwatch_verify_drift_objects", labels) != 1:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.1)
            last = REGISTRY.get_sample_value("rwatch_verify_last_run_timestamp_seconds", {"sink": "mirror"})
            assert last == kept.checked_at
        finally:
            await engine.dispose()
