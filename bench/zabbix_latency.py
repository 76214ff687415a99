"""Benchmark: steady state of the zabbix sink, the time from a CMDB change to the real Zabbix showing it.

    python bench/zabbix_latency.py [--hosts 2000] [--modules 200] [--rate 20] [--seconds 60]   # --help for more

Needs the real Zabbix of the tests (``bash .ci/downstream.sh``): its frontend is served by ``php -S`` with
``--php-workers`` workers for the run. A simulator in its own process holds ``--hosts`` hosts in ``--modules``
modules (5 per set, 4 sets per biz); ``rwatch run --role all`` follows it as a child process (memory bus,
``bootstrap = "resync"``, host / host_relation / biz / set / module, a SQLite mirror and a zabbix sink with
rwatch's defaults under a prefix of the run's own). Once the initial full reconcile has put every host into
Zabbix, this process makes ``--rate`` changes per second for ``--seconds`` (after ``--warmup`` unmeasured ones),
drawn with a seeded generator, each on a host with no change of ours still in flight:

- rename (45 %): ``bk_host_name`` set to a unique token; Zabbix shows it when the host's visible name starts with it;
- move (45 %): into another module of the same biz; shown when the host's ``bk_module_id`` tags are that module;
- create (5 %): a new host (CMDB puts it in the resource pool's idle module); shown when a host has its bk_host_id;
- module rename (5 %): a module of one of the hosts; shown when that host is in a group ending with the new name.

Each change is timed from just before the simulator's admin request (the commit is inside it) to when it is seen:

- in Zabbix: one ``host.get`` every ``--zabbix-poll-ms`` for every change not yet seen there, by tag
  ``bk_host_id`` (OR), so the poller costs php -S one request per period whatever the rate;
- baseline, same run, same changes: in rwatch's mirror, the ``rwatch_topology`` view that the sink reads, polled
  read-only every ``--mirror-poll-ms``. The mirror is what rwatch applies before Zabbix: the difference between the
  two is the zabbix sink's share (debounce, topology read, desired state, reconcile calls).

The goal is p99 under 1 s from change to Zabbix. Prints a table and writes bench/results/zabbix_latency.json;
every process, file and the run's Zabbix hosts and groups are removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.downstream.instances starts the Zabbix frontend

from tests.downstream.instances import ZABBIX_ADMIN, Zabbix, free_port, start_zabbix, stop_zabbix  # noqa: E402

from latency import percentile  # noqa: E402
from rwatch.sinks.zabbix.api import ZabbixApi  # noqa: E402
from rwatch.sinks.zabbix.desired import ZabbixOptions  # noqa: E402
from watch_publish import HOLD, Child, busy_fraction, machine_jiffies, run_bench, spawn  # noqa: E402
from zabbix_sync import clean  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "zabbix_latency.json"
SETS_PER_BIZ, MODULES_PER_SET = 4, 5
KINDS = (("rename", 45), ("move", 45), ("create", 5), ("module_rename", 5))
GOAL_P99_MS = 1000.0
TOPOLOGY = ("host", "host_relation", "biz", "set", "module")


@dataclass
class Change:
    """One change of ours and what shows it; ``seen`` maps an observation point to perf_counter() then."""

    kind: str
    host: int
    token: str = ""  # the new host name (rename) or module name (module_rename)
    module: int = 0  # the target module (move) or the renamed module (module_rename)
    sent: float = 0.0

    def __post_init__(self) -> None:
        self.seen: dict[str, float] = {}

    def in_mirror(self, rows: list[tuple[int, str, str]]) -> bool:
        """``rows``: (bk_module_id, bk_module_name, bk_host_name) of this host in the topology view."""
        if self.kind == "rename":
            return bool(rows) and all(name == self.token for _, _, name in rows)
        if self.kind == "move":
            return {m for m, _, _ in rows} == {self.module}
        if self.kind == "create":
            return bool(rows)
        return any(m == self.module and name == self.token for m, name, _ in rows)

    def in_zabbix(self, host: dict[str, Any] | None) -> bool:
        """``host``: Zabbix's host with this bk_host_id (name, tags, groups), None when there is none."""
        if host is None:
            return False
        if self.kind == "rename":
            return bool(host["name"].startswith(f"{self.token} ("))
        if self.kind == "move":
            return {t["value"] for t in host["tags"] if t["tag"] == "bk_module_id"} == {str(self.module)}
        if self.kind == "create":
            return True
        return any(g["name"].endswith(f"/{self.token}") for g in host["groups"])


class Pending:
    """The changes not yet seen everywhere, shared by the driver (asyncio) and the mirror poller (a thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[int, Change] = {}  # bk_host_id -> its change in flight (one at a time per host)
        self.modules: set[int] = set()  # modules being renamed
        self.done: list[Change] = []

    def add(self, change: Change) -> None:
        with self.lock:
            self.open[change.host] = change
            if change.kind == "module_rename":
                self.modules.add(change.module)

    def waiting(self, where: str) -> list[Change]:
        with self.lock:
            return [c for c in self.open.values() if where not in c.seen]

    def mark(self, change: Change, where: str, now: float) -> None:
        with self.lock:
            change.seen.setdefault(where, now)
            if len(change.seen) == 2 and self.open.get(change.host) is change:
                del self.open[change.host]
                self.modules.discard(change.module if change.kind == "module_rename" else -1)
                self.done.append(change)


class MirrorPoller(threading.Thread):
    """Reads the mirror's topology view read-only every ``period`` for the hosts with a change not seen there."""

    def __init__(self, path: Path, pending: Pending, period: float) -> None:
        super().__init__(name="mirror-poller", daemon=True)
        self.path, self.pending, self.period = path, pending, period
        self.halt = threading.Event()
        self.polls = 0

    def run(self) -> None:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            while not self.halt.is_set():
                waiting = self.pending.waiting("mirror")
                if waiting:
                    ids = sorted({c.host for c in waiting})
                    marks = ",".join("?" * len(ids))
                    rows = db.execute(f"SELECT bk_host_id, bk_module_id, bk_module_name, bk_host_name "
                                      f"FROM rwatch_topology WHERE bk_host_id IN ({marks})", ids).fetchall()
                    now = time.perf_counter()
                    by_host: dict[int, list[tuple[int, str, str]]] = {}
                    for host, module, module_name, host_name in rows:
                        by_host.setdefault(int(host), []).append((int(module), module_name, host_name))
                    for change in waiting:
                        if change.in_mirror(by_host.get(change.host, [])):
                            self.pending.mark(change, "mirror", now)
                    self.polls += 1
                time.sleep(self.period)
        finally:
            db.close()


def host_query(options: ZabbixOptions, ids: list[int]) -> dict[str, Any]:
    """host.get of the run's hosts (its technical names) with these bk_host_id tags, and what shows a change."""
    return {"output": ["name"], "selectTags": ["tag", "value"], "selectGroups": ["name"],
            "search": {"host": f"{options.group_prefix}-"}, "startSearch": True,
            "evaltype": 2, "tags": [{"tag": "bk_host_id", "value": str(i), "operator": 1} for i in ids]}


def by_host_id(hosts: list[dict[str, Any]], options: ZabbixOptions) -> dict[int, dict[str, Any]]:
    """The run's managed hosts by bk_host_id (other runs' hosts may carry the same ids)."""
    managed = {"tag": options.managed_tag, "value": options.group_prefix}
    return {int(t["value"]): h for h in hosts if managed in h["tags"] for t in h["tags"] if t["tag"] == "bk_host_id"}


async def poll_zabbix(api: ZabbixApi, options: ZabbixOptions, pending: Pending, period: float,
                      stats: dict[str, int]) -> None:
    """One host.get per period for every change not yet seen in Zabbix (ends when cancelled)."""
    while True:
        waiting = pending.waiting("zabbix")
        if waiting:
            hosts = await api.call("host.get", host_query(options, sorted({c.host for c in waiting})))
            now = time.perf_counter()
            stats["polls"] += 1
            by_id = by_host_id(hosts, options)
            for change in waiting:
                if change.in_zabbix(by_id.get(change.host)):
                    pending.mark(change, "zabbix", now)
        await asyncio.sleep(period)


# --- the simulator and its changes -----------------------------------------------------------------------


class Driver:
    """Makes the changes through the simulator's admin API, one at a time, on hosts with nothing in flight."""

    def __init__(self, http: aiohttp.ClientSession, sim_url: str, pending: Pending, tag: str, seed: int) -> None:
        self.http, self.sim_url, self.pending, self.tag = http, sim_url, pending, tag
        self.rng = random.Random(seed)
        self.n = 0
        self.placement: dict[int, int] = {}  # bk_host_id -> its module, kept as we move hosts
        self.modules_of_biz: dict[int, list[int]] = {}
        self.biz_of: dict[int, int] = {}

    async def load(self) -> None:
        async with self.http.get(f"{self.sim_url}/admin/objects/module") as resp:
            for doc in (await resp.json()).values():
                if not doc.get("default"):
                    self.modules_of_biz.setdefault(doc["bk_biz_id"], []).append(doc["bk_module_id"])
                    self.biz_of[doc["bk_module_id"]] = doc["bk_biz_id"]
        async with self.http.get(f"{self.sim_url}/admin/objects/host_relation") as resp:
            for doc in (await resp.json()).values():
                if doc["bk_module_id"] in self.biz_of:
                    self.placement[doc["bk_host_id"]] = doc["bk_module_id"]

    async def _send(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.http.request(method, self.sim_url + path, json=body) as resp:
            resp.raise_for_status()
            answer: dict[str, Any] = await resp.json()
            return answer

    def _free_host(self) -> int:
        hosts = list(self.placement)
        while True:
            host = self.rng.choice(hosts)
            if host not in self.pending.open:
                return host

    async def change(self, measured: bool) -> Change:
        self.n += 1
        token = f"zl{self.tag}-{self.n:06d}"
        kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        if kind == "module_rename" and self.pending.modules:
            kind = "rename"  # one module rename in flight at a time: its hosts' groups change with it
        host = self._free_host()
        change = Change(kind, host, token)
        change.sent = time.perf_counter()
        if kind == "rename":
            await self._send("PATCH", f"/admin/objects/host/{host}", {"bk_host_name": token})
        elif kind == "move":
            here = self.placement[host]
            change.module = self.rng.choice([m for m in self.modules_of_biz[self.biz_of[here]] if m != here])
            await self._send("POST", f"/admin/hosts/{host}/move", {"module_ids": [change.module]})
            self.placement[host] = change.module
        elif kind == "create":
            doc = await self._send("POST", "/admin/objects/host", {
                "bk_host_name": token, "bk_host_innerip": f"10.250.{self.n // 250 % 250}.{self.n % 250 + 1}"})
            change.host = int(doc["bk_host_id"])
        else:
            change.module = self.placement[host]
            await self._send("PATCH", f"/admin/objects/module/{change.module}", {"bk_module_name": token})
        if measured:
            self.pending.add(change)
        return change

    async def paced(self, rate: float, seconds: float, measured: bool) -> float:
        start = time.perf_counter()
        for i in range(round(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.change(measured)
        return time.perf_counter() - start


async def start_sim(tmp: Path, hosts: int, modules: int) -> tuple[Child, str]:
    """A simulator on a free port with ``modules`` modules (5 per set, 4 sets per biz) and ``hosts`` hosts."""
    bizs = max(1, -(-modules // (SETS_PER_BIZ * MODULES_PER_SET)))
    child = await spawn("sim", ["sim", "--listen", "127.0.0.1:0", "--hold", str(HOLD), "--hosts", str(hosts),
                                "--bizs", str(bizs), "--sets-per-biz", str(SETS_PER_BIZ),
                                "--modules-per-set", str(MODULES_PER_SET), "--log-format", "json"],
                        tmp / "sim.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.proc.returncode is None:
        for line in child.log.read_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if entry.get("event") == "sim_started":
                    return child, str(entry["url"])
        await asyncio.sleep(0.1)
    await child.stop()
    raise RuntimeError(f"the simulator did not start: {child.log.read_text()[-2000:]}")


# --- rwatch ----------------------------------------------------------------------------------------------


def options_for(tag: str) -> ZabbixOptions:
    prefix = f"zl{tag}"
    return ZabbixOptions(group_prefix=prefix, technical_name=f"{prefix}-{{bk_host_id}}",
                         visible_name=f"{{label}} ({prefix}-{{bk_host_id}})")


def rwatch_toml(tmp: Path, sim_url: str, zabbix: Zabbix, options: ZabbixOptions, port: int,
                sink_extra: str) -> Path:
    tables = "".join(f"[watch.resources.{r}]\nenabled = true\ninterval = 0\n" for r in TOPOLOGY)
    others = "".join(f"[watch.resources.{r}]\nenabled = false\n" for r in (
        "process", "object_instance", "mainline_instance", "biz_set", "biz_set_relation", "plat", "project"))
    user, password = ZABBIX_ADMIN
    path = tmp / "rwatch.toml"
    path.write_text(f"""
[cmdb]
base_url = "{sim_url}"
[watch]
bootstrap = "resync"
{tables}{others}
[bus]
kind = "memory"
[store]
url = "sqlite:///{tmp / 'state.db'}"
[sinks.mirror]
kind = "mirror"
url = "sqlite:///{tmp / 'mirror.db'}"
[sinks.zabbix]
kind = "zabbix"
source = "mirror"
url = "{zabbix.url}"
username = "{user}"
password = "{password}"
group_prefix = "{options.group_prefix}"
technical_name = "{options.technical_name}"
visible_name = "{options.visible_name}"
{sink_extra}
[http]
listen = "127.0.0.1:{port}"
[log]
level = "info"
""")
    return path


def read_metrics(text: str) -> dict[str, float]:
    """The zabbix sink's counters and lag histogram from /metrics (sample name -> value)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("rwatch_zabbix_"):
            sample, _, value = line.rpartition(" ")
            name, _, labels = sample.partition("{")
            kept = [pair for pair in re.findall(r'\w+="[^"]*"', labels) if not pair.startswith("sink=")]
            out[name + (f"{{{','.join(kept)}}}" if kept else "")] = float(value)
    return out


async def managed_hosts(api: ZabbixApi, options: ZabbixOptions) -> int:
    count = await api.call("host.get", {"countOutput": True, "search": {"host": f"{options.group_prefix}-"},
                                        "startSearch": True})
    return int(count)


async def unseen(api: ZabbixApi, options: ZabbixOptions, pending: Pending, most: int = 10) -> list[dict[str, Any]]:
    """The first changes never seen in Zabbix, each with what Zabbix shows instead (for the report)."""
    out = []
    for change in list(pending.open.values())[:most]:
        hosts = list(by_host_id(await api.call("host.get", host_query(options, [change.host])), options).values())
        out.append({"kind": change.kind, "host": change.host, "token": change.token, "module": change.module,
                    "seen": sorted(change.seen), "zabbix": hosts})
    return out


# --- the run ---------------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(percentile(values, 50), 1), "p95_ms": round(percentile(values, 95), 1),
            "p99_ms": round(percentile(values, 99), 1), "max_ms": round(max(values), 1)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    options = options_for(tag)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "keep_log")},
    }
    result["params"]["mix"] = dict(KINDS)
    before = await busy_fraction(1.0)
    result["machine"]["busy_before_start"] = round(before, 2)
    if before > 0.2:
        print(f"warning: the machine is {before:.0%} busy before the bench starts; numbers will be noisy",
              file=sys.stderr)
    pending = Pending()
    with tempfile.TemporaryDirectory(prefix="rwatch-bench-zabbix-latency-") as tmpdir:
        tmp = Path(tmpdir)
        zabbix = start_zabbix(tmp, workers=args.php_workers)
        result["zabbix"] = zabbix.version
        sim: Child | None = None
        rwatch: Child | None = None
        poller: MirrorPoller | None = None
        watcher: asyncio.Task[None] | None = None
        zstats = {"polls": 0}
        try:
            sim, sim_url = await start_sim(tmp, args.hosts, args.modules)
            port = free_port()
            path = rwatch_toml(tmp, sim_url, zabbix, options, port, args.sink)
            started = time.perf_counter()
            rwatch = await spawn("rwatch", ["run", "--role", "all", "--config", str(path)], tmp / "rwatch.log")
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
                        ZabbixApi(zabbix.url, token=zabbix.token) as api):
                driver = Driver(http, sim_url, pending, tag, args.seed)
                await driver.load()
                # Ready: the initial full reconcile has put every host into Zabbix.
                deadline = time.monotonic() + args.startup
                while (count := await managed_hosts(api, options)) < len(driver.placement):
                    if rwatch.proc.returncode is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{count} of {len(driver.placement)} hosts in Zabbix: "
                                           f"{rwatch.log.read_text()[-3000:]}")
                    await asyncio.sleep(0.5)
                result["initial_sync_s"] = round(time.perf_counter() - started, 1)
                print(f"initial sync: {count} hosts in Zabbix {result['initial_sync_s']} s after rwatch started",
                      file=sys.stderr)
                poller = MirrorPoller(tmp / "mirror.db", pending, args.mirror_poll_ms / 1000)
                poller.start()
                watcher = asyncio.create_task(poll_zabbix(api, options, pending, args.zabbix_poll_ms / 1000, zstats))
                await driver.paced(args.rate, args.warmup, measured=False)
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    metrics0 = read_metrics(await resp.text())
                cpu0, polls0, jiffies0 = rwatch.cpu_seconds(), zstats["polls"], machine_jiffies()
                driven = await driver.paced(args.rate, args.seconds, measured=True)
                cpu, jiffies1 = rwatch.cpu_seconds() - cpu0, machine_jiffies()
                result["machine"]["busy_during"] = round(
                    (jiffies1[0] - jiffies0[0]) / max(1, jiffies1[1] - jiffies0[1]), 2)
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    metrics1 = read_metrics(await resp.text())
                for _ in range(round(args.straggle * 10)):  # the last changes: a poll of what two pollers fill
                    if not pending.open:
                        break
                    await asyncio.sleep(0.1)
                result["zabbix_polls_per_s"] = round((zstats["polls"] - polls0) / driven, 1)
                result["unseen"] = await unseen(api, options, pending)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher
            if poller is not None:
                poller.halt.set()
                poller.join(5)
            if rwatch is not None:
                await rwatch.stop()
                if args.keep_log is not None:
                    shutil.copyfile(rwatch.log, args.keep_log)
            if sim is not None:
                await sim.stop()
            try:
                clean(zabbix, options)
            finally:
                stop_zabbix(zabbix)
    changes = pending.done + list(pending.open.values())
    result["changes"] = len(changes)
    result["achieved_rate"] = round(len(changes) / driven, 1)
    result["rwatch_cores"] = round(cpu / driven, 3)
    result["missing"] = {where: sum(where not in c.seen for c in changes) for where in ("mirror", "zabbix")}
    delta = {k: round(metrics1.get(k, 0.0) - metrics0.get(k, 0.0), 3) for k in metrics1}
    reconciles = delta.get("rwatch_zabbix_reconciles_total", 0.0)
    result["sink"] = {
        "projections_per_s": round(reconciles / driven, 2),  # rwatch_zabbix_reconciles_total: attempts
        "api_calls_per_reconcile": {kind: round(delta.get(f'rwatch_zabbix_api_calls_total{{kind="{kind}"}}', 0.0)
                                                / max(1.0, reconciles), 2) for kind in ("read", "write")},
        "mean_lag_ms": round(1000 * delta.get("rwatch_zabbix_lag_seconds_sum", 0.0)
                             / max(1.0, delta.get("rwatch_zabbix_lag_seconds_count", 0.0)), 1),
        "errors": delta.get("rwatch_zabbix_errors_total", 0.0),
    }
    by_kind: dict[str, Any] = {}
    for kind in ["all"] + [k for k, _ in KINDS]:
        picked = [c for c in changes if kind in ("all", c.kind)]
        by_kind[kind] = {where: stats([(c.seen[where] - c.sent) * 1000 for c in picked if where in c.seen])
                         for where in ("mirror", "zabbix")}
    result["latency"] = by_kind
    result["goal_p99_ms"] = GOAL_P99_MS
    p99 = by_kind["all"]["zabbix"].get("p99_ms")
    result["goal_met"] = p99 is not None and p99 < GOAL_P99_MS and not result["missing"]["zabbix"]
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    par = result["params"]
    lines = [f"Zabbix {result['zabbix']}: change -> visible at {par['rate']:g} changes/s for {par['seconds']:g} s, "
             f"{par['hosts']} hosts in {par['modules']} modules (ms from just before the simulator's request; "
             f"Zabbix polled every {par['zabbix_poll_ms']:g} ms, the mirror every {par['mirror_poll_ms']:g} ms)",
             f"{'change':>14}  {'seen in':40} {'n':>5} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"]
    for kind, both in result["latency"].items():
        for where, name in (("mirror", "baseline: rwatch's mirror (topology view)"), ("zabbix", "Zabbix (host.get)")):
            s = both[where]
            if s["n"]:
                lines.append(f"{kind:>14}  {name:40} {s['n']:>5} {s['p50_ms']:>7.0f} {s['p95_ms']:>7.0f} "
                             f"{s['p99_ms']:>7.0f} {s['max_ms']:>7.0f}")
    every = result["latency"]["all"]
    sink = result["sink"]
    lines += [
        f"the zabbix sink adds p50 {every['zabbix']['p50_ms'] - every['mirror']['p50_ms']:.0f} ms, "
        f"p99 {every['zabbix']['p99_ms'] - every['mirror']['p99_ms']:.0f} ms to the mirror's; goal p99 < "
        f"{result['goal_p99_ms']:.0f} ms: {'met' if result['goal_met'] else 'MISSED'}; missing: {result['missing']}",
        f"{result['achieved_rate']:.1f} changes/s; {sink['projections_per_s']} projections/s, "
        f"{sink['api_calls_per_reconcile']['read']} reads + {sink['api_calls_per_reconcile']['write']} writes per "
        "projection, "
        f"mean lag (commit -> reconcile done) {sink['mean_lag_ms']} ms, errors {sink['errors']:g}; "
        f"rwatch {result['rwatch_cores']:.2f} cores; initial sync {result['initial_sync_s']} s; "
        f"machine {result['machine']['busy_before_start']:.0%} busy before, "
        f"{result['machine']['busy_during']:.0%} during",
        f"(total {result['elapsed_s']:.0f} s)"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=2000)
    parser.add_argument("--modules", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="changes per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured changes first")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--zabbix-poll-ms", type=float, default=50.0)
    parser.add_argument("--mirror-poll-ms", type=float, default=5.0)
    parser.add_argument("--php-workers", type=int, default=4,
                        help="php -S workers (the sink and the poller share them)")
    parser.add_argument("--sink", default="", help="extra TOML lines for [sinks.zabbix], e.g. 'debounce = \"50ms\"'")
    parser.add_argument("--startup", type=float, default=600.0, help="seconds allowed for the initial sync")
    parser.add_argument("--straggle", type=float, default=15.0, help="seconds to wait for the last changes")
    parser.add_argument("--keep-log", type=Path, default=None, help="copy rwatch's log here afterwards")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_bench(parse_args, main, report)
