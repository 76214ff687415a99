"""Benchmark: latency of one change from the simulator's commit to the mirror, and of the watch path alone.

Run (RabbitMQ on 127.0.0.1:5672, or RWATCH_TEST_AMQP_URL; about 2 minutes on 2 cores):

    python bench/latency.py          # --help for the knobs

A simulator in its own process (CMDB's real 20 s hold) and ``rwatch run --role all`` as a child process
(AMQP bus, SQLite mirror, only ``host`` watched, ``interval = 0``). This process changes one host at a time
at ``--rate`` changes per second (PATCH /admin/objects/host/<id> setting ``bk_host_name`` to a unique token,
paced on a fixed schedule) for ``--seconds``, and notes for each token when it is seen:

- watch path: a copy of every event from a queue of its own bound to the run's exchange (``cmdb.host.*``):
  CMDB long-poll answered -> normalized -> published -> routed by the broker (the publisher confirm follows).
- change -> mirror: the token in the mirror's row, read by a thread polling the SQLite file read-only
  every ``--poll-ms`` (WAL: readers never block the writer).
- baseline, same run: the simulator's own delivery: a plain aiohttp client of ours long-polling the watch
  API in cursor mode (each request carries the previous answer's last cursor), as any CMDB watcher does.

Every latency is counted from just before this process sent the PATCH (the commit is inside that round trip,
whose median is reported), so each includes up to one PATCH round trip; the three measures share that start.
The rwatch process is started once per ``--run`` (rwatch's defaults, then ``batch_wait=0``), each with a
fresh exchange, queues, cursor store and mirror; every queue, exchange, file and child process is removed.
Prints a table and writes bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from rwatch.bus.topology import dead_queue_name, dlx_name, queue_name
from rwatch.cmdb import protocol as p
from rwatch.config import DEFAULT_FIELDS, Config
from watch_publish import URL, Child, busy_fraction, host_mirror_toml, run_bench, spawn, start_sim

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
SINK = "mirror"
OTHER_RESOURCES = ("host_relation", "biz", "set", "module")
HOST_FIELDS = list(DEFAULT_FIELDS["host"])  # what rwatch asks for by default


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# --- what is seen where ------------------------------------------------------------------------------------


@dataclass
class Seen:
    """token -> perf_counter() when it was first seen, one map per observation point."""

    sent: dict[str, float] = field(default_factory=dict)
    patch_rtt: list[float] = field(default_factory=list)
    tap: dict[str, float] = field(default_factory=dict)
    mirror: dict[str, float] = field(default_factory=dict)
    sim: dict[str, float] = field(default_factory=dict)


class MirrorPoller(threading.Thread):
    """Reads the mirror file read-only every ``period`` seconds; notes when each host name first appears."""

    def __init__(self, path: Path, seen: dict[str, float], period: float) -> None:
        super().__init__(name="mirror-poller", daemon=True)
        self.path, self.seen, self.period = path, seen, period
        self.halt = threading.Event()
        self.polls = 0

    def run(self) -> None:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            since = 0.0
            while not self.halt.is_set():
                rows = db.execute("SELECT json_extract(data, '$.bk_host_name'), updated_at FROM rwatch_objects "
                                  "WHERE resource = 'host' AND updated_at >= ?", (since,)).fetchall()
                now = time.perf_counter()
                for name, updated_at in rows:
                    if name not in self.seen:
                        self.seen[name] = now
                    since = max(since, updated_at)
                self.polls += 1
                time.sleep(self.period)
        finally:
            db.close()


async def follow_sim(http: aiohttp.ClientSession, sim_url: str, seen: dict[str, float]) -> None:
    """The baseline: a plain cursor-mode long-poll client of the simulator's watch API."""
    cursor = await head_cursor(http, sim_url)
    url = sim_url + p.GATEWAY_WATCH_PATH.format(resource="host")
    headers = {"X-Bkapi-Authorization": orjson.dumps({"bk_app_code": "bench", "bk_username": "admin"}).decode()}
    while True:
        body = p.watch_body(resource="host", fields=HOST_FIELDS, event_types=[], cursor=cursor)
        async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
        now = time.perf_counter()
        reply = orjson.loads(raw)
        if not reply.get("result"):
            raise RuntimeError(f"the simulator refused the baseline's watch: {reply}")
        for event in reply["data"]["bk_events"] or []:
            name = (event.get("bk_detail") or {}).get("bk_host_name")
            if name is not None and name not in seen:
                seen[name] = now
            cursor = event["bk_cursor"]


async def head_cursor(http: aiohttp.ClientSession, sim_url: str) -> str:
    async with http.get(sim_url + "/admin/stats") as resp:
        end = (await resp.json())["chains"]["host"]["end"]
    async with http.get(sim_url + f"/admin/chain/host?since={end - 1}&limit=1") as resp:
        return str((await resp.json())["nodes"][0]["cursor"])


# --- one rwatch process --------------------------------------------------------------------------------------


def parse_variant(spec: str) -> dict[str, float]:
    """``""`` (rwatch's defaults) or ``key=value,...`` with keys batch_wait (sinks.mirror) and rate_limit (cmdb)."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ("batch_wait", "rate_limit"):
            raise SystemExit(f"--run {spec!r}: expected batch_wait=<s> and/or rate_limit=<per s>")
        out[key] = float(value)
    return out


def variant_label(variant: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in variant.items()) or "defaults"


def rwatch_toml(tmp: Path, sim_url: str, tag: str, variant: dict[str, float]) -> Path:
    wait = f"batch_wait = {variant['batch_wait']}\n" if "batch_wait" in variant else ""
    limit = f"rate_limit = {variant['rate_limit']}\n" if "rate_limit" in variant else ""
    return host_mirror_toml(tmp / f"rwatch-{tag}.toml", sim_url, tag, tmp / f"state-{tag}.db",
                            tmp / f"mirror-{tag}.db", cmdb=limit, watch='bootstrap = "now"\n', sink=wait)


def run_config(tag: str) -> Config:
    return Config.model_validate({
        "watch": {"resources": {"host": {"enabled": True}, **{r: {"enabled": False} for r in OTHER_RESOURCES}}},
        "bus": {"url": URL, "exchange": f"bench-{tag}", "queue_prefix": f"bench-{tag}"},
        "sinks": {SINK: {"kind": "mirror"}},
    })


async def delete_topology(config: Config, tap: str) -> None:
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        for name in (queue_name(config, SINK, "host"), dead_queue_name(config, SINK), tap):
            await channel.queue_delete(name)
        await channel.exchange_delete(config.bus.exchange)
        await channel.exchange_delete(dlx_name(config))
    finally:
        await conn.close()


class Driver:
    """Changes hosts of the simulator, one PATCH at a time, each setting a unique ``bk_host_name``."""

    def __init__(self, http: aiohttp.ClientSession, sim_url: str, hosts: list[str], tag: str) -> None:
        self.http, self.sim_url, self.hosts, self.tag = http, sim_url, hosts, tag
        self.n = 0

    async def change(self, seen: Seen | None) -> str:
        token = f"lat-{self.tag}-{self.n:06d}"
        host = self.hosts[self.n % len(self.hosts)]
        self.n += 1
        t0 = time.perf_counter()
        async with self.http.patch(f"{self.sim_url}/admin/objects/host/{host}",
                                   json={"bk_host_name": token}) as resp:
            resp.raise_for_status()
            await resp.read()
        if seen is not None:
            seen.sent[token] = t0
            seen.patch_rtt.append(time.perf_counter() - t0)
        return token

    async def paced(self, seen: Seen | None, rate: float, seconds: float) -> None:
        start = time.perf_counter()
        for i in range(round(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.change(seen)


async def measure(http: aiohttp.ClientSession, sim_url: str, hosts: list[str], tmp: Path, tag: str,
                  variant: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    config = run_config(tag)
    tap_name = f"bench-{tag}.tap"
    seen = Seen()
    rwatch: Child | None = None
    poller: MirrorPoller | None = None
    baseline: asyncio.Task[None] | None = None
    conn = await aio_pika.connect(URL)
    try:
        # The tap: the run's exchange (declared as rwatch declares it) and a transient queue of our own.
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.declare_exchange(config.bus.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        tap = await channel.declare_queue(tap_name, exclusive=True, auto_delete=True)
        await tap.bind(exchange, routing_key="cmdb.host.*")

        async def on_tap(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            now = time.perf_counter()
            name = orjson.loads(message.body)["data"].get("bk_host_name")
            if name is not None and name not in seen.tap:
                seen.tap[name] = now

        await tap.consume(on_tap, no_ack=True)
        path = rwatch_toml(tmp, sim_url, tag, variant)
        rwatch = await spawn(f"rwatch-{tag}", ["run", "--role", "all", "--config", str(path)],
                             tmp / f"rwatch-{tag}.log")
        baseline = asyncio.create_task(follow_sim(http, sim_url, seen.sim), name="baseline-watch")
        driver = Driver(http, sim_url, hosts, tag)
        # Ready: a change made now reaches the tap and the mirror (rwatch started "from now" and follows).
        mirror_file = tmp / f"mirror-{tag}.db"
        deadline = time.monotonic() + 60
        while True:
            if rwatch.proc.returncode is not None:
                raise RuntimeError(f"rwatch exited: {rwatch.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rwatch did not follow within 60 s: {rwatch.log.read_text()[-2000:]}")
            token = await driver.change(None)
            await asyncio.sleep(0.5)
            if token in seen.tap and mirror_file.exists():
                with contextlib.closing(sqlite3.connect(f"file:{mirror_file}?mode=ro", uri=True)) as db:
                    if db.execute("SELECT 1 FROM rwatch_objects WHERE json_extract(data, '$.bk_host_name') = ?",
                                  (token,)).fetchone():
                        break
        poller = MirrorPoller(mirror_file, seen.mirror, args.poll_ms / 1000)
        poller.start()
        await driver.paced(None, args.rate, args.warmup)  # not measured
        cpu0 = rwatch.cpu_seconds()
        t0 = time.perf_counter()
        await driver.paced(seen, args.rate, args.seconds)
        driven = time.perf_counter() - t0
        cpu = rwatch.cpu_seconds() - cpu0
        # Stragglers: everything should land within a second; give up after 10.
        deadline = time.monotonic() + 10
        for _ in range(200):  # a poll of three maps filled by callbacks and a thread
            if time.monotonic() > deadline or all(t in seen.tap and t in seen.mirror and t in seen.sim
                                                  for t in seen.sent):
                break
            await asyncio.sleep(0.05)
        polls = poller.polls
    finally:
        if poller is not None:
            poller.halt.set()
            poller.join(5)
        if baseline is not None:
            baseline.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await baseline
        if rwatch is not None:
            await rwatch.stop()
        with contextlib.suppress(Exception):
            await conn.close()
        with contextlib.suppress(Exception):
            await delete_topology(config, tap_name)
    if baseline.done() and not baseline.cancelled() and baseline.exception() is not None:
        raise RuntimeError(f"the baseline watch client failed: {baseline.exception()!r}")

    def stats(points: dict[str, float]) -> dict[str, Any]:
        lat = [(points[t] - sent) * 1000 for t, sent in seen.sent.items() if t in points]
        return {"n": len(lat), "missing": len(seen.sent) - len(lat), "p50_ms": round(percentile(lat, 50), 2),
                "p90_ms": round(percentile(lat, 90), 2), "p99_ms": round(percentile(lat, 99), 2),
                "max_ms": round(max(lat), 2)}

    return {
        "variant": variant_label(variant), **variant,
        "changes": len(seen.sent), "achieved_rate": round(len(seen.sent) / driven, 1),
        "patch_rtt_p50_ms": round(percentile([x * 1000 for x in seen.patch_rtt], 50), 2),
        "mirror_polls_per_s": round(polls / (driven + args.warmup), 0),
        "rwatch_cores": round(cpu / driven, 3),
        "sim_baseline": stats(seen.sim), "watch_path": stats(seen.tap), "mirror": stats(seen.mirror),
    }


# --- main ------------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "amqp": URL.split("@")[-1]},
        "params": {"rate": args.rate, "seconds": args.seconds, "warmup": args.warmup, "hosts": args.hosts,
                   "poll_ms": args.poll_ms, "runs": args.run},
    }
    before = await busy_fraction(1.0)
    result["machine"]["busy_before_start"] = round(before, 2)
    if before > 0.2:
        print(f"warning: the machine is {before:.0%} busy before the bench starts; numbers will be noisy",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rwatch-bench-latency-") as tmpdir:
        tmp = Path(tmpdir)
        sim, sim_url = await start_sim(tmp, "sim-latency", args.hosts)
        try:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=60)) as http:
                async with http.get(sim_url + "/admin/objects/host") as resp:
                    hosts = sorted((await resp.json()).keys(), key=int)
                runs = []
                for i, spec in enumerate(args.run):
                    run = await measure(http, sim_url, hosts, tmp, f"{tag}-{i}", parse_variant(spec), args)
                    runs.append(run)
                    print(f"{run['variant']}: mirror p50 {run['mirror']['p50_ms']} ms p99 "
                          f"{run['mirror']['p99_ms']} ms; watch path p50 {run['watch_path']['p50_ms']} ms p99 "
                          f"{run['watch_path']['p99_ms']} ms; simulator p50 {run['sim_baseline']['p50_ms']} ms "
                          f"p99 {run['sim_baseline']['p99_ms']} ms", file=sys.stderr)
                result["runs"] = runs
        finally:
            await sim.stop()
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    par = result["params"]
    lines = [f"Latency of one host change at {par['rate']:g} changes/s for {par['seconds']:g} s (ms, from just "
             f"before the PATCH; mirror polled every {par['poll_ms']:g} ms)",
             f"{'rwatch run':>24}  {'path':44} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'missing':>7}"]
    for run in result["runs"]:
        label = run["variant"]
        for key, name in (("sim_baseline", "baseline: simulator -> own long-poll client"),
                          ("watch_path", "rwatch watch path: -> routed by the broker"),
                          ("mirror", "rwatch change -> SQLite mirror row")):
            s = run[key]
            lines.append(f"{label:>24}  {name:44} {s['p50_ms']:>7.1f} {s['p90_ms']:>7.1f} {s['p99_ms']:>7.1f} "
                         f"{s['max_ms']:>7.1f} {s['missing']:>7}")
        added = run["mirror"]["p50_ms"] - run["sim_baseline"]["p50_ms"]
        lines.append(f"{'':>24}  rwatch adds (p50) {added:.1f} ms to the mirror, "
                     f"{run['watch_path']['p50_ms'] - run['sim_baseline']['p50_ms']:.1f} ms to the bus; "
                     f"p99 goals: mirror < 50 ms {'met' if run['mirror']['p99_ms'] < 50 else 'MISSED'}, "
                     f"watch path < 25 ms {'met' if run['watch_path']['p99_ms'] < 25 else 'MISSED'}; "
                     f"{run['achieved_rate']:.0f} changes/s, PATCH RTT p50 {run['patch_rtt_p50_ms']:.1f} ms, "
                     f"rwatch {run['rwatch_cores']:.2f} cores")
    lines.append(f"\n(total {result['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="changes per second")
    parser.add_argument("--seconds", type=float, default=40.0, help="measured seconds per rwatch run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of changes before measuring")
    parser.add_argument("--hosts", type=int, default=200, help="hosts in the simulator (changed in turn)")
    parser.add_argument("--poll-ms", type=float, default=1.0, help="mirror polling period")
    parser.add_argument("--run", action="append", default=None,
                        help="one rwatch run with these settings: '' (defaults) or e.g. 'batch_wait=0,rate_limit=0' "
                             "(repeatable; default: defaults, then batch_wait=0)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.run = args.run if args.run is not None else ["", "batch_wait=0"]
    return args


if __name__ == "__main__":
    run_bench(parse_args, main, report)
