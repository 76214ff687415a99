"""The mass-delete guard (issue 12): a sweep that would delete more than ``watch.mass_delete_share`` of its scope
(beyond ``watch.mass_delete_floor`` objects) is held until an operator lets it through; the figures show in
``rwatch resync`` and ``rwatch verify``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rwatch.cli.jobs import resync_now, verify
from rwatch.config import Config, load_config
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.sinks.mirror import MirrorSink
from rwatch.store.base import open_store
from rwatch.watch.guard import guard
from tests.entrypoint import RWATCH
from tests.watch.test_verify import fill_mirror, write_config


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=3, bizs=2, hosts=100)) as sim:
        yield sim


def test_the_decision_needs_both_the_share_and_the_floor() -> None:
    config = Config.model_validate({"watch": {"mass_delete_share": 0.1, "mass_delete_floor": 20}})
    assert not guard(config, "host", 20, 30, "t").held  # 67 %, but only 20: small topologies still sync
    assert not guard(config, "host", 25, 300, "t").held  # over the floor, 8 %: within the share
    assert guard(config, "host", 31, 300, "t").held  # 10.3 % and 31 objects: held
    assert not guard(config, "host", 31, 300, "t", allowed=True).held  # the operator looked
    assert guard(config, "host", 21, 0, "t").held  # nothing was held, yet something would go


async def hosts_in(config: Config) -> set[str]:
    settings = config.sinks["mirror"]
    async with MirrorSink("mirror", settings) as mirror:  # type: ignore[arg-type]
        return set(await mirror.objects("host"))


def delete_silently(sim: Simulator, count: int) -> list[str]:
    """CMDB deletes hosts and the events are lost (the server's silent loss): only a resync can see it."""
    keys = sorted(sim.state.objects("host"), key=int)[:count]
    sim.faults.schedule({"kind": "drop_event", "count": 10 * count})
    for key in keys:
        sim.state.delete("host", key)
    sim.faults.event_faults.clear()
    return keys


async def test_a_sweep_over_the_limit_is_held_until_an_operator_lets_it_through(
        sim: Simulator, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim.url)
    config = load_config(path, environ={})
    await fill_mirror(config)
    gone = delete_silently(sim, 40)  # 40 of 100: far over 10 %, and over the floor of 20
    async with open_store(config.store.url.get_secret_value()) as store:
        await store.add_gap(config.cmdb.tenant, "host", 0.0, 1.0, "cursor_expired")

    held = (await resync_now(config, ["host"], asyncio.Event()))["host"]
    assert not isinstance(held, BaseException)
    assert held.guard is not None and held.guard.held and not held.complete
    assert (held.guard.would_delete, held.guard.live, held.guard.source) == (40, 100, "mirror mirror")
    assert set(gone) <= await hosts_in(config)  # nothing deleted
    async with open_store(config.store.url.get_secret_value()) as store:
        assert [g.filled_at for g in await store.gaps(config.cmdb.tenant, "host")] == [None]  # the gap stays open
        last = {r.resource: r for r in await store.resyncs(config.cmdb.tenant)}["host"]
        assert last.outcome == "held" and "40 of 100" in last.reasons[0]

    # verify shows what a resync would do, and that the guard would hold it.
    report = await verify(config, resources=["host"])
    assert report.resources[0].guard is not None and report.resources[0].guard.held
    assert sorted(report.resources[0].extra, key=int) == gone

    # The operator looked: the sweep goes through, the gap is filled.
    released = (await resync_now(config, ["host"], asyncio.Event(), allow_mass_delete=True))["host"]
    assert not isinstance(released, BaseException) and released.complete
    assert await hosts_in(config) == set(sim.state.objects("host"))
    async with open_store(config.store.url.get_secret_value()) as store:
        assert all(g.filled_at is not None for g in await store.gaps(config.cmdb.tenant, "host"))


async def test_the_command_prints_the_guards_figures_and_fails(sim: Simulator, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim.url)
    await fill_mirror(load_config(path, environ={}))
    delete_silently(sim, 30)
    code, out, err = await rwatch(path, "resync", "--resource", "host")
    assert code == 1 and "would delete 30 of 100 live host objects (30%" in out and "held" in err
    code, out, err = await rwatch(path, "verify", "--resource", "host")
    assert code == 1 and "a resync now: the sweep would delete 30 of 100" in out
    code, out, err = await rwatch(path, "resync", "--resource", "host", "--allow-mass-delete")
    assert code == 0 and "released by --allow-mass-delete" in out


async def test_without_a_mirror_the_last_complete_listing_is_the_baseline(sim: Simulator, tmp_path: Path) -> None:
    # A jsonl-only installation: nothing to count in, so the drop since the last complete listing decides.
    lines = f'[sinks.lines]\nkind = "jsonl"\npath = "{tmp_path}/e.jsonl"\n'
    path = write_config(tmp_path, sim.url, sinks=False, extra=lines)
    config = load_config(path, environ={})
    first = (await resync_now(config, ["host"], asyncio.Event()))["host"]
    assert not isinstance(first, BaseException) and first.complete and first.guard is None  # nothing to compare
    delete_silently(sim, 50)
    second = (await resync_now(config, ["host"], asyncio.Event()))["host"]
    assert not isinstance(second, BaseException) and second.guard is not None and second.guard.held
    assert (second.guard.would_delete, second.guard.live) == (50, 100)
    assert second.guard.source == "the last complete listing"


async def rwatch(path: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
    proc = await asyncio.create_subprocess_exec(RWATCH, *args, "--config", str(path), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_daemon_holds_the_sweep_and_reports_it_until_released(sim: Simulator, tmp_path: Path) -> None:
    """rwatch run fills a gap by a resync whose sweep the guard holds: /readyz degraded naming the resource, the
    metric, the gap open; rwatch resync --allow-mass-delete releases it, and the daemon's alarm clears with its
    next resync."""
    from prometheus_client import REGISTRY

    from rwatch.app import run_async
    from tests.test_refusals import readyz, until

    path = write_config(tmp_path, sim.url, extra="")
    text = path.read_text().replace("[bus]", "[watch]\nresync_every = \"2s\"\n[bus]")
    path.write_text(text)
    config = load_config(path, environ={})
    await fill_mirror(config)
    delete_silently(sim, 40)
    async with open_store(config.store.url.get_secret_value()) as store:
        await store.add_gap(config.cmdb.tenant, "host", 0.0, 1.0, "cursor_expired")
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    daemon = asyncio.create_task(run_async(config, stop, http_port=port))
    try:
        http = await asyncio.wait_for(port, 30)

        async def held() -> dict[str, object] | None:
            status, body = await readyz(http)
            return body if status == 503 and "sweep_held:host" in body.get("failing", []) else None

        body = await until(held)
        assert body["status"] == "degraded"
        check = body["checks"]["sweep_held:host"]  # type: ignore[index]
        assert (check["would_delete"], check["live"], check["held"]) == (40, 100, True)
        assert "--allow-mass-delete" in check["fix"]
        assert REGISTRY.get_sample_value("rwatch_sweep_held_objects", {"resource": "host"}) == 40
        assert len(await hosts_in(config)) == 100  # nothing deleted

        released = (await resync_now(config, ["host"], asyncio.Event(), allow_mass_delete=True))["host"]
        assert not isinstance(released, BaseException) and released.complete

        async def cleared() -> bool:
            _, body = await readyz(http)
            return "sweep_held:host" not in body.get("failing", [])

        await until(cleared)  # the daemon's next resync (resync_every) finds nothing left to hold
        assert await hosts_in(config) == set(sim.state.objects("host"))
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 30)
