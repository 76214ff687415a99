"""End to end against the real Zabbix 6.0: 10,000 random CMDB operations (creates, updates, moves between modules,
renames of biz / set / module, deletes) flow through the real ``rwatch run`` into a mirror and a zabbix sink, while
rwatch is killed with SIGKILL three times and Zabbix's API fails transiently (502 before or after doing the work,
connections cut). Afterwards Zabbix's managed groups and hosts equal the mirror's topology, the mirror equals
CMDB, and a group and a host made by hand outside the prefix are untouched."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy.ext.asyncio import create_async_engine

from rwatch.config import MirrorSinkConfig, SecretUrl, ZabbixSinkConfig
from rwatch.sim.server import SimOptions, Simulator
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.zabbix.desired import desired_state
from rwatch.sinks.zabbix.sink import options_of
from tests.downstream.instances import Zabbix
from tests.downstream.side import Side
from tests.integration.harness import Daemon, MakeSetup
from tests.integration.test_apply_e2e import MIX, TOPOLOGY, async_url, differences, seed_from_start

OPERATIONS = 10_000
KILL_AT = (2_500, 5_000, 7_500)
FLAKY = 0.25  # of Zabbix API requests while the operations run
# The apply suite's mix, plus renames of biz, set and module (what groups named after them must follow).
WORKLOAD = {**MIX, "biz.rename": 0.5, "set.rename": 1, "module.rename": 1}


class FlakyZabbix:
    """A reverse proxy in front of Zabbix's API that, at ``rate``, answers 502 without forwarding, forwards and then
    answers 502 (the write happened; rwatch must find it done), or cuts the connection."""

    def __init__(self, upstream: str, seed: int = 14) -> None:
        self.upstream = upstream
        self.rate = 0.0
        self.rng = random.Random(seed)
        self.faults = {"before": 0, "after": 0, "cut": 0, "passed": 0}
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self.rng.choice(("before", "after", "cut")) if self.rng.random() < self.rate else None
        if fault == "before":
            self.faults["before"] += 1
            return web.Response(status=502, text="bad gateway (injected)")
        if fault == "cut":
            self.faults["cut"] += 1
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=502)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with self._session.post(self.upstream, data=body, headers=headers) as answer:
            payload = await answer.read()
            status = answer.status
        if fault == "after":
            self.faults["after"] += 1
            return web.Response(status=502, text="bad gateway after the work (injected)")
        self.faults["passed"] += 1
        return web.Response(body=payload, status=status, content_type="application/json")

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[FlakyZabbix]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api_jsonrpc.php", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/api_jsonrpc.php"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        try:
            yield self
        finally:
            await self._session.close()
            await runner.cleanup()


def sink_table(url: str, prefix: str) -> str:
    return f"""
[sinks.zbx]
kind = "zabbix"
source = "mirror"
url = "{url}"
username = "Admin"
password = "zabbix"
group_prefix = "{prefix}"
technical_name = "{prefix}-{{bk_host_id}}"
visible_name = "{{label}} ({prefix}-{{bk_host_id}})"
on_delete = "delete"
debounce = "50ms"
timeout = "20s"
"""


async def zabbix_equals_mirror(side: Side, mirror: MirrorSink, options: Any) -> list[str]:
    rows = await mirror.topology()
    facts = await mirror.host_facts()
    live = [i for i, f in facts.items() if not f.deleted]
    desired = desired_state(rows, options, live, {i: f.os_type for i, f in facts.items()})
    try:
        side.assert_equal(desired)
    except (AssertionError, ValueError) as exc:  # ValueError: a host read in the middle of its write
        return [str(exc)[:2000]]
    return []


@pytest.mark.timeout(600)
async def test_zabbix_equals_the_mirror_after_10000_operations_three_kills_and_a_flaky_api(
        setups: MakeSetup, zabbix: Zabbix, unique: str) -> None:
    prefix = f"e2e{unique}"
    # What an operator made by hand, outside the prefix: never touched.
    [hand_group] = zabbix.call("hostgroup.create", {"name": f"hand-{unique}"})["groupids"]
    [hand_host] = zabbix.call("host.create", {
        "host": f"hand-{unique}", "groups": [{"groupid": hand_group}],
        "interfaces": [{"type": 1, "main": 1, "useip": 1, "ip": "10.9.9.9", "dns": "", "port": "10050"}],
    })["hostids"]
    hand_before = zabbix.call("host.get", {"hostids": [hand_host], "output": "extend", "selectGroups": ["groupid"],
                                           "selectTags": "extend", "selectInterfaces": ["ip"]})
    side = Side(zabbix, options_of(ZabbixSinkConfig.model_validate(
        {"kind": "zabbix", "url": zabbix.url, "token": "x", "group_prefix": prefix,
         "technical_name": f"{prefix}-{{bk_host_id}}", "visible_name": f"{{label}} ({prefix}-{{bk_host_id}})",
         "on_delete": "delete"})))
    flaky = FlakyZabbix(zabbix.url)
    daemon: Daemon | None = None
    try:
        async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=14, bizs=3, hosts=150)) as sim, \
                flaky.serving():
            setup = setups(sim.url, TOPOLOGY, bus="memory", extra=sink_table(flaky.url, prefix))
            await seed_from_start(setup)
            daemon = Daemon(setup, role="all")
            daemon.start()
            exits: list[int] = []
            flaky.rate = FLAKY
            sim.load.set_mix(WORKLOAD)
            done = 0
            while done < OPERATIONS:
                sim.load.run(250)
                done += 250
                await asyncio.sleep(0.4)  # paced: the watchers and the sink interleave with the workload
                if done in KILL_AT:
                    daemon.signal(signal.SIGKILL)
                    exits.append(await daemon.wait())
                    daemon.start()
            await asyncio.sleep(3.0)  # Zabbix still flaky while rwatch catches up
            flaky.rate = 0.0
            assert exits == [-9, -9, -9]

            config = setup.config()
            mirror_settings = config.sinks["mirror"]
            assert isinstance(mirror_settings, MirrorSinkConfig)
            engine = create_async_engine(async_url(mirror_settings.url.get_secret_value()))
            mirror = MirrorSink("check", MirrorSinkConfig(kind="mirror", url=SecretUrl(
                mirror_settings.url.get_secret_value())))
            await mirror.open()

            async def converged(within: float) -> None:
                deadline = time.monotonic() + within
                while True:
                    problems = await differences(engine, setup, sim)
                    if not problems:
                        problems = await zabbix_equals_mirror(side, mirror, side.options)
                    if not problems:
                        return
                    assert time.monotonic() < deadline, "\n".join(problems)
                    await asyncio.sleep(1.0)

            try:
                await converged(300)
                # Then the steady state: one change at a time, each carried by a small scoped reconcile.
                for _ in range(100):
                    sim.load.run(1)
                    await asyncio.sleep(0.05)
                await converged(120)
            finally:
                await mirror.close()
                await engine.dispose()
            assert await daemon.stop() == 0
            assert all(flaky.faults[k] for k in ("before", "after", "cut")), flaky.faults  # each kind happened
            assert len(side.hosts()) > 50  # the topology did not just dwindle to nothing
            events = [e for e in daemon.log_events() if e.get("event") == "zabbix_reconciled"]
            assert sum(e["groups_renamed"] for e in events) > 0, "no biz / set / module rename reached Zabbix"
            assert sum(e["hosts_removed"] for e in events) > 0, "no CMDB delete reached Zabbix"
    finally:
        if daemon is not None and daemon.running:  # a failed or timed-out run leaves no rwatch behind
            daemon.signal(signal.SIGKILL)
        hand_after = zabbix.call("host.get", {"hostids": [hand_host], "output": "extend",
                                              "selectGroups": ["groupid"], "selectTags": "extend",
                                              "selectInterfaces": ["ip"]})
        zabbix.call("host.delete", [hand_host])
        zabbix.call("hostgroup.delete", [hand_group])
        side.cleanup()
    assert hand_after == hand_before  # the hand-made host (and its group) exactly as it was
