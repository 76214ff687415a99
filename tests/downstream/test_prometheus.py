"""Real Prometheus follows rwatch's service discovery (issue 14): the real daemon against the simulator, a mirror and
a prom_sd sink; Prometheus reads the file_sd file and the http_sd endpoint, and its own /api/v1/targets must list
exactly the mirror's hosts with their topology labels, from both, before and after hosts move, go and come. It also
scrapes rwatch's /metrics, which its parser must accept.

The hosts get loopback addresses (127.1.x.y), so Prometheus' scrapes of them fail at once and never leave the
machine; their health is not the point, their presence and labels are.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from tests.downstream.conftest import StartPrometheus
from tests.downstream.instances import Prometheus, free_port
from tests.integration.harness import Daemon, Setup
from tests.integration.test_apply_e2e import TOPOLOGY, async_url, mirror_topology, seed_from_start, truth_topology

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# rwatch's 1 s debounce, then Prometheus: http_sd refreshes every second, file_sd sees the rename by inotify, and
# its discovery manager hands updates on at most every 5 s. A bound for a busy 2-core machine, not a speed claim.
CONVERGE_WITHIN = 90.0
SINK = "sd"
# Topology tuples, as truth_topology and mirror_topology give them.
BIZ_ID, BIZ_NAME, SET_ID, SET_NAME, MODULE_ID, MODULE_NAME, HOST_ID, INNERIP, CLOUD_ID, HOST_NAME = range(10)
Row = tuple[Any, ...]
Targets = dict[str, dict[str, str]]  # address -> labels


class Job:
    """A prom_sd job as configured, and what it must render (written independently of rwatch's renderer)."""

    def __init__(self, name: str, port: int, module: Iterable[str | int] = ()) -> None:
        self.name, self.port, self.module = name, port, list(module)

    def toml(self) -> str:
        return f'[[sinks.{SINK}.jobs]]\nname = "{self.name}"\nport = {self.port}\nmodule = {json.dumps(self.module)}\n'

    def matches(self, row: Row) -> bool:
        return not self.module or row[MODULE_ID] in self.module or row[MODULE_NAME] in self.module

    def targets(self, rows: Iterable[Row]) -> Targets:
        hosts: dict[int, list[Row]] = defaultdict(list)
        for row in sorted(rows, key=lambda r: (r[HOST_ID], r[MODULE_ID])):
            if self.matches(row):
                hosts[row[HOST_ID]].append(row)
        out: Targets = {}
        for host_id, host_rows in hosts.items():
            ip = next((p.strip() for r in host_rows for p in (r[INNERIP] or "").split(",") if p.strip()), None)
            if ip is None:
                continue  # no address, no target

            def joined(column: int, rows: list[Row] = host_rows) -> str:
                return ",".join(dict.fromkeys(str(r[column]) for r in rows if r[column] not in (None, "")))

            labels = {
                "job": self.name, "bk_biz_id": joined(BIZ_ID), "bk_biz_name": joined(BIZ_NAME),
                "bk_set_id": joined(SET_ID), "bk_set_name": joined(SET_NAME), "bk_module_id": joined(MODULE_ID),
                "bk_module_name": joined(MODULE_NAME), "bk_host_id": str(host_id),
                "bk_host_name": str(host_rows[0][HOST_NAME]), "bk_cloud_id": str(host_rows[0][CLOUD_ID]),
                "tenant": "0",
            }
            out[f"{ip}:{self.port}"] = labels
        return out


def expected(jobs: list[Job], rows: Iterable[Row]) -> Targets:
    rows = list(rows)
    return {address: labels for job in jobs for address, labels in job.targets(rows).items()}


def discovered(targets: list[dict[str, Any]], pool: str) -> Targets:
    """What one scrape pool lists: address -> its labels, as Prometheus will store them (relabelled)."""
    out: Targets = {}
    for target in targets:
        if target["scrapePool"] == pool:
            labels = dict(target["labels"])
            assert labels.pop("instance") == target["discoveredLabels"]["__address__"]
            assert labels.pop("discovery") == pool.removeprefix("cmdb-")  # the relabelling below applied
            out[target["discoveredLabels"]["__address__"]] = labels
    return out


def as_stored(targets: Targets) -> Targets:
    """Prometheus drops a label whose value is empty."""
    return {address: {k: v for k, v in labels.items() if v != ""} for address, labels in targets.items()}


def scrape_configs(rwatch_port: int, sd_file: Path) -> list[dict[str, Any]]:
    tag = [{"target_label": "discovery", "replacement": "file"}]
    # Every CMDB host fails its scrape (nobody listens): scraped rarely, they only have to be listed.
    return [
        {"job_name": "cmdb-file", "scrape_interval": "1m",
         "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "5s"}],
         "relabel_configs": tag},
        {"job_name": "cmdb-http", "scrape_interval": "1m",
         "http_sd_configs": [{"url": f"http://127.0.0.1:{rwatch_port}/sd", "refresh_interval": "1s"}],
         "relabel_configs": [{**tag[0], "replacement": "http"}]},
        {"job_name": "rwatch", "static_configs": [{"targets": [f"127.0.0.1:{rwatch_port}"]}]},
    ]


def loopback(host_id: int) -> str:
    return f"127.1.{host_id >> 8 & 255}.{host_id & 255}"


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers.get("Content-Type", ""), response.read()


def query(prometheus: Prometheus, promql: str) -> list[dict[str, Any]]:
    _, body = get(f"{prometheus.url}/api/v1/query?query={urllib.parse.quote(promql)}")
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return result


def http_sd_failures(prometheus: Prometheus) -> float:
    """Prometheus' own count of failed http_sd refreshes (its /metrics)."""
    _, body = get(f"{prometheus.url}/metrics")
    return sum(float(line.split()[-1]) for line in body.decode().splitlines()
               if line.startswith("prometheus_sd_http_failures_total"))


async def wait_for(what: str, probe: Any, timeout: float = CONVERGE_WITHIN) -> Any:
    """Poll ``probe`` (sync, run in a thread: it calls other processes) until it returns (ok, value) with ok."""
    deadline = time.monotonic() + timeout
    while True:
        ok, value = await asyncio.to_thread(probe)
        if ok:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; last seen: {value}")
        await asyncio.sleep(0.5)  # another process's state: polling its API is the only way to see


async def prometheus_lists(prometheus: Prometheus, want: Targets) -> None:
    """Until both discoveries list exactly ``want``: the same addresses, each with the same labels."""
    want = as_stored(want)

    def probe() -> tuple[bool, Any]:
        targets = prometheus.targets()
        got = {pool: discovered(targets, pool) for pool in ("cmdb-file", "cmdb-http")}
        diff = {pool: {"missing": sorted(set(want) - set(g)), "extra": sorted(set(g) - set(want)),
                       "differing": {a: (g[a], want[a]) for a in set(g) & set(want) if g[a] != want[a]}}
                for pool, g in got.items()}
        return all(g == want for g in got.values()), diff

    await wait_for("Prometheus' targets equal the topology", probe)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    options = SimOptions(port=0, hold=1.0, error_delay=0.01, seed=14, bizs=2, sets_per_biz=2, modules_per_set=2,
                         hosts=10)
    async with Simulator(options) as s:
        yield s


async def test_prometheus_lists_exactly_the_mirrors_hosts_from_file_sd_and_http_sd_and_follows_changes(
    sim: Simulator, prometheus_factory: StartPrometheus, tmp_path: Path
) -> None:
    state = sim.state
    state.create("host")  # left in the resource pool's idle module: labels in Chinese (资源池, 空闲机)
    for key in state.objects("host"):
        state.update("host", key, {"bk_host_innerip": loopback(int(key))})
    hosts = sorted(int(k) for k in state.objects("host"))
    modules = {int(k): m for k, m in state.objects("module").items() if not m.get("default")}
    by_biz: dict[int, list[int]] = defaultdict(list)
    for module_id, module in sorted(modules.items()):
        by_biz[module["bk_biz_id"]].append(module_id)
    biz_a, biz_b = sorted(by_biz)
    # Several inner IPs (the first is the address) and a host in two modules (its labels join both).
    state.update("host", str(hosts[0]), {"bk_host_innerip": f"{loopback(hosts[0])},127.2.0.1"})
    state.move_host(hosts[1], by_biz[biz_a][:2])
    web_module = by_biz[biz_a][1]
    jobs = [Job("node", free_port()),
            Job("web", free_port(), module=[modules[web_module]["bk_module_name"], by_biz[biz_b][0]])]

    sd_file = tmp_path / "sd" / "targets.json"
    extra = f'[sinks.{SINK}]\nkind = "prom_sd"\nsource = "mirror"\nfile = "{sd_file}"\n' + "".join(
        j.toml() for j in jobs)
    mirror_url = f"sqlite:///{tmp_path}/mirror.db"
    setup = Setup(tmp_path, sim.url, "amqp://unused", uuid.uuid4().hex[:10], TOPOLOGY, bus="memory",
                  mirror_url=mirror_url, extra=extra)
    await seed_from_start(setup)
    port = free_port()
    daemon = Daemon(setup, env={"RWATCH_HTTP__LISTEN": f"127.0.0.1:{port}"}, role="all")
    engine = create_async_engine(async_url(mirror_url))
    try:
        daemon.start()
        prometheus = await asyncio.to_thread(prometheus_factory, scrape_configs(port, sd_file))

        want = expected(jobs, truth_topology(sim))
        node, web = jobs[0].targets(truth_topology(sim)), jobs[1].targets(truth_topology(sim))
        assert len(node) == len(hosts) and 0 < len(web) < len(hosts)
        assert node[f"{loopback(hosts[1])}:{jobs[0].port}"]["bk_module_id"] == ",".join(map(str, by_biz[biz_a][:2]))
        assert web[f"{loopback(hosts[1])}:{jobs[1].port}"]["bk_module_id"] == str(web_module)
        assert node[f"{loopback(hosts[-1])}:{jobs[0].port}"]["bk_module_name"] == "空闲机"
        await prometheus_lists(prometheus, want)
        # What Prometheus lists is the mirror's topology (which is CMDB's), not something of its own.
        assert expected(jobs, await mirror_topology(engine)) == want
        # http_sd and file_sd serve the same bytes; http_sd as the JSON Prometheus asks for.
        content_type, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/sd")
        assert content_type.startswith("application/json")
        assert body == sd_file.read_bytes() == (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/sd/{SINK}"))[1]

        # rwatch's own /metrics: scraped, and parsed (a parse error would be the target's lastError).
        def scraped() -> tuple[bool, Any]:
            found = [t for t in prometheus.targets() if t["scrapePool"] == "rwatch"]
            return len(found) == 1 and found[0]["health"] == "up" and found[0]["lastError"] == "", found

        await wait_for("rwatch's /metrics scraped", scraped)

        def stored() -> tuple[bool, Any]:
            got = {r["metric"].get("sink"): r["value"][1] for r in query(prometheus, "rwatch_prom_sd_targets")}
            return got == {SINK: str(len(want))}, got

        await wait_for("rwatch_prom_sd_targets stored by Prometheus", stored)

        # CMDB changes: a host moves to the other business, another leaves the web module for two others, one is
        # deleted, a new one is created and placed, a module is renamed, and a host without an address comes.
        mover, spread, gone = hosts[2], hosts[1], hosts[3]
        state.move_host(mover, [by_biz[biz_b][-1]])
        state.move_host(spread, [by_biz[biz_a][0], by_biz[biz_a][2]])
        state.delete("host", str(gone))
        new = state.create("host")["bk_host_id"]
        state.update("host", str(new), {"bk_host_innerip": loopback(new)})
        state.move_host(new, [web_module])
        state.update("module", str(by_biz[biz_b][0]), {"bk_module_name": "renamed"})
        no_ip = state.create("host", {"bk_host_innerip": ""})["bk_host_id"]
        state.move_host(no_ip, [web_module])

        after = expected(jobs, truth_topology(sim))
        assert after != want and f"{loopback(gone)}:{jobs[0].port}" not in after
        assert after[f"{loopback(mover)}:{jobs[0].port}"]["bk_biz_id"] == str(biz_b)
        assert f"{loopback(new)}:{jobs[1].port}" in after
        await prometheus_lists(prometheus, after)
        assert expected(jobs, await mirror_topology(engine)) == after
        assert await daemon.stop() == 0

        # rwatch down: http_sd refreshes fail, and Prometheus keeps the targets it has (why /sd answers 503, never
        # [], until it has rendered: an empty list would drop them all).
        failures = await asyncio.to_thread(http_sd_failures, prometheus)

        def failing() -> tuple[bool, Any]:
            now = http_sd_failures(prometheus)
            return now >= failures + 2, now

        await wait_for("http_sd refreshes failing", failing)
        assert discovered(await asyncio.to_thread(prometheus.targets), "cmdb-http") == as_stored(after)
    finally:
        if daemon.running:
            daemon.signal(signal.SIGKILL)
        await engine.dispose()
