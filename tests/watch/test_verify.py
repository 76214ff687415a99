"""``rwatch verify``: the mirror compared with the simulator over real HTTP, drift found key by key, repaired.

The mirror is filled by a resync through the memory bus (as ``--repair`` does); then the simulator's truth
is changed behind its back (no watcher runs), which is exactly the silent loss verify exists to find.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from rwatch.bus.memory import MemoryBus
from rwatch.cli.jobs import verify
from rwatch.cmdb.client import CmdbClient
from rwatch.config import Config, load_config
from rwatch.events import Event, iso_utc
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.sinks.mirror import MirrorSink
from rwatch.store.base import open_store
from rwatch.watch.resync import Resyncer
from rwatch.wiring import make_sinks, subscribe_sinks
from tests.entrypoint import RWATCH

RESOURCES = ("biz", "set", "module", "host", "host_relation")


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=1, bizs=3, hosts=60)) as sim:
        yield sim


def write_config(tmp: Path, base_url: str, *, sinks: bool = True, extra: str = "") -> Path:
    path = tmp / "rwatch.toml"
    mirror = f'[sinks.mirror]\nkind = "mirror"\nurl = "sqlite:///{tmp}/mirror.db"\n' if sinks else ""
    path.write_text(f"""
[cmdb]
base_url = "{base_url}"
rate_limit = 0
[bus]
kind = "memory"
[store]
url = "sqlite:///{tmp}/state.db"
{mirror}
[http]
listen = "127.0.0.1:0"
[log]
level = "warning"
{extra}
""")
    return path


async def fill_mirror(config: Config) -> None:
    """A full resync of every resource through a memory bus subscribed to the sinks."""
    stop = asyncio.Event()
    sinks = make_sinks(config)
    for sink in sinks.values():
        await sink.open()
    bus = MemoryBus(stop=stop)
    subscribe_sinks(bus, config, sinks, stop)
    await bus.start()
    try:
        async with CmdbClient(config.cmdb) as client, open_store(config.store.url.get_secret_value()) as store:
            resyncer = Resyncer(config, client, bus, stop, store=store)
            for resource in RESOURCES:
                assert (await resyncer.run(resource, trigger="test")).complete
    finally:
        await bus.close()
        for sink in sinks.values():
            await sink.close()


async def cli(config: Path | None, *args: str) -> tuple[int, str, str]:
    """``python -m rwatch verify ...`` in a subprocess (the simulator keeps serving on this loop)."""
    argv = [RWATCH, "verify", *(["--config", str(config)] if config else []), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def drift_gauge(resource: str) -> float | None:
    return REGISTRY.get_sample_value("rwatch_verify_drift_objects", {"sink": "mirror", "resource": resource})


def by_resource(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["resource"]: r for r in doc["resources"]}


async def test_clean_mirror_verifies_equal(sim: Simulator, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim.url)
    await fill_mirror(load_config(path, environ={}))

    report = await verify(load_config(path, environ={}))
    assert report.drift == 0
    assert [r.resource for r in report.resources] == list(load_config(path, environ={}).watch.enabled)
    res = {r.resource: r for r in report.resources}
    assert res["host"].cmdb == res["host"].mirror == len(sim.state.objects("host"))
    assert res["host_relation"].cmdb == len(sim.state.objects("host_relation"))
    # grouped per business where the resource has one; every group's checksums agree
    # (the resource pool's sets are out of the lists' scope: search_business never shows the pool)
    listed = {str(b["bk_biz_id"]) for b in sim.state.objects("biz").values() if b["default"] == 0}
    assert {g.group for g in res["set"].groups} == listed
    assert [g.group for g in res["host"].groups] == ["*"]
    assert all(g.equal for r in report.resources for g in r.groups)

    code, out, err = await cli(path)
    assert code == 0, err
    assert "no drift" in out
    code, out, _ = await cli(path, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["drift"] == 0
    assert set(by_resource(doc)) == set(RESOURCES)


async def test_silent_loss_is_reported_key_by_key_and_repaired(sim: Simulator, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim.url)
    await fill_mirror(load_config(path, environ={}))
    state = sim.state
    hosts = sorted(state.objects("host"), key=int)
    renamed, deleted = hosts[0], hosts[1]
    relation_docs = state.objects("host_relation")
    relations_before = set(relation_docs)
    # Behind the mirror's back: no watcher runs, so none of this reaches it.
    state.update("host", renamed, {"bk_host_name": "renamed-behind-its-back"})
    state.delete("host", deleted)  # its relations go with it
    created = str(state.create("host", {"bk_host_name": "born-unseen"})["bk_host_id"])
    relation_docs.update(state.objects("host_relation"))
    relations_after = set(state.objects("host_relation"))

    report = await verify(load_config(path, environ={}), resources=["host", "host_relation", "set"])
    res = {r.resource: r for r in report.resources}
    assert res["host"].changed == [renamed]
    assert res["host"].extra == [deleted]
    assert res["host"].missing == [created]
    assert set(res["host_relation"].extra) == relations_before - relations_after
    assert set(res["host_relation"].missing) == relations_after - relations_before
    assert res["host_relation"].extra and res["host_relation"].missing
    assert not res["host_relation"].changed
    assert res["set"].drift == 0
    assert report.drift == 3 + len(relations_before ^ relations_after)
    assert drift_gauge("host") == 3
    assert drift_gauge("host_relation") == len(relations_before ^ relations_after)
    assert drift_gauge("set") == 0
    assert REGISTRY.get_sample_value("rwatch_verify_last_run_timestamp_seconds", {"sink": "mirror"}) == \
        pytest.approx(time.time(), abs=30)
    # host_relation per business: exactly the businesses of the relations that came and went differ
    touched = {str(relation_docs[k]["bk_biz_id"]) for k in relations_before ^ relations_after}
    assert {g.group for g in res["host_relation"].groups if not g.equal} == touched
    assert {g.group for g in res["host_relation"].groups} == {str(d["bk_biz_id"]) for d in relation_docs.values()}

    code, out, _ = await cli(path, "--json", "--resource", "host")
    assert code == 1
    doc = by_resource(json.loads(out))["host"]
    assert (doc["missing"], doc["extra"], doc["changed"], doc["drift"]) == ([created], [deleted], [renamed], 3)

    code, out, err = await cli(path)
    assert code == 1, err
    assert "DIFFERS" in out
    assert f"host changed (1): {renamed}" in out

    code, out, err = await cli(path, "--repair", "--json")
    assert code == 0, out + err
    doc = json.loads(out)
    assert doc["drift"] == 0
    assert doc["before"]["drift"] == 3 + len(relations_before ^ relations_after)
    assert sorted(doc["repaired"]) == ["host", "host_relation"]
    assert all(not r["missing"] and not r["extra"] and not r["changed"] for r in doc["after"]["resources"])

    code, out, err = await cli(path)
    assert code == 0, err
    assert "no drift" in out


async def test_rows_newer_than_the_snapshot_are_ignored_not_drift(sim: Simulator, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim.url)
    config = load_config(path, environ={})
    await fill_mirror(config)
    key = sorted(sim.state.objects("host"), key=int)[0]
    future = (int(time.time()) + 3600, 0)
    async with MirrorSink("mirror", config.sinks["mirror"]) as mirror:  # type: ignore[arg-type]
        await mirror.apply([Event(id="x" * 64, resource="host", action="update", key=key, version=future,
                                  occurred_at=iso_utc(future[0]), observed_at=iso_utc(time.time()),
                                  data={"bk_host_id": int(key), "bk_host_name": "from the future"})])
    report = await verify(config, resources=["host"])
    (host,) = report.resources
    assert host.drift == 0
    assert host.ignored == 1
    assert host.cmdb == host.mirror == len(sim.state.objects("host")) - 1


async def test_enabled_but_unlistable_resources_are_skipped(sim: Simulator, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim.url, extra="[watch.resources.process]\nenabled = true\n")
    await fill_mirror(load_config(path, environ={}))
    report = await verify(load_config(path, environ={}))
    assert set(report.skipped) == {"process"}
    assert sorted(r.resource for r in report.resources) == sorted(RESOURCES)
    assert report.drift == 0
    code, out, err = await cli(path)
    assert code == 0, err
    assert "skipped process" in out


async def test_unsupported_resource_is_bad_usage(sim: Simulator, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim.url)
    code, out, err = await cli(path, "--resource", "process")
    assert code == 2
    assert "process" in err
    assert "Traceback" not in err
    assert not out


async def test_no_mirror_sink_is_bad_config(sim: Simulator, tmp_path: Path) -> None:
    code, _, err = await cli(write_config(tmp_path, sim.url, sinks=False))
    assert code == 2
    assert "sinks" in err
    assert "Traceback" not in err


async def test_unreachable_cmdb_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = await cli(write_config(tmp_path, f"http://127.0.0.1:{port}"))
    assert code == 1
    assert not out
    lines = [line for line in err.splitlines() if line.startswith("rwatch verify:")]
    assert len(lines) == 1
    assert "cannot reach CMDB" in lines[0]
    assert "Traceback" not in err


async def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[cmdb]\nnot_a_key = 1\n")
    code, _, err = await cli(path)
    assert code == 2
    assert "cmdb.not_a_key" in err


async def test_repair_fixes_a_row_whose_version_equals_the_head(sim: Simulator, tmp_path: Path) -> None:
    """A change CMDB made without an event (the server's silent loss): the head does not move, so the mirror's
    row has the head's very version with other data. The repair's snapshot row wins that tie (issue 12)."""
    path = write_config(tmp_path, sim.url)
    await fill_mirror(load_config(path, environ={}))
    key = sorted(sim.state.objects("host"), key=int)[0]
    head = sim.state.chain("host")[-1]
    sim.faults.schedule({"kind": "drop_event", "count": 1, "resource": "host"})
    sim.state.update("host", key, {"bk_host_name": "changed-without-an-event"})
    assert sim.state.chain("host")[-1] is head  # the head did not move

    report = await verify(load_config(path, environ={}), resources=["host"], repair=True, wait=5)
    assert report.resources[0].changed == [key]
    assert report.after is not None and report.after.drift == 0, report.after
