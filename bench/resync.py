"""Benchmark: a full resync at the issue's scale; its list requests against the minimum, its time against a baseline.

    python bench/resync.py [--hosts 100000] [--bizs 20] [--modules 1000] [--bus memory|amqp] [--mirror sqlite|postgres]

An in-process simulator (its heap frozen, as ``rwatch run`` freezes its own) holds the topology; rwatch's
``Resyncer`` resyncs biz, set, module, host and host_relation one after the other (``cmdb.rate_limit = 0``)
through the bus into a fresh mirror (amqp, RabbitMQ at 127.0.0.1: applied by a ``ConsumerGroup`` in this
process; postgres: scratch databases at RWATCH_TEST_PG_URL), then checked against the simulator. Requests: per
API, against the fewest the page limits allow. Time: against a baseline from the same run, a plain aiohttp client
replaying the very list requests rwatch sent, one at a time (the simulator's own cost of answering them); rounds
alternate which goes first. Side figures: the mirror's writes alone, a run at the shipped rate limit, peak RSS.
Prints a table, writes bench/results/resync.json, exits 1 when a mirror check fails (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from resource import RUSAGE_SELF, getrusage
from typing import Any

import aiohttp
import asyncpg
import orjson

from rwatch.bus import make_bus
from rwatch.bus.consumer import ConsumerGroup
from rwatch.bus.memory import MemoryBus
from rwatch.cmdb.client import WATCH_API, CmdbClient
from rwatch.cmdb.listing import LIMITS
from rwatch.config import CmdbConfig, Config, MirrorSinkConfig, SecretUrl
from rwatch.events import Event
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.sim.state import SimState
from rwatch.sinks.mirror import MirrorSink
from rwatch.store.base import open_store
from rwatch.watch.resync import Resyncer
from rwatch.wiring import make_sinks, subscribe_sinks
from watch_publish import URL, busy_fraction, delete_topology, ratio, run_bench

RESULTS = Path(__file__).resolve().parent / "results" / "resync.json"
PG_URL = os.environ.get("RWATCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
RESOURCES = ("biz", "set", "module", "host", "host_relation")
SINK, SAMPLE, JSON = "mirror", 300, {"Content-Type": "application/json"}
Sent = dict[str, list[tuple[str, dict[str, Any]]]]  # resource -> the list requests rwatch sent (url, body)
failures: list[str] = []  # mirror checks that failed: the command exits 1


def peak_rss_mb() -> float:
    return round(getrusage(RUSAGE_SELF).ru_maxrss / 1024, 1)


def minimum(state: SimState, resource: str) -> dict[str, int]:
    """The fewest list requests the page limits allow: ceil(objects / limit) per listing, at least one."""
    def pages(n: int, api: str) -> int:
        return max(1, -(-n // LIMITS[api]))
    bizs = [b["bk_biz_id"] for b in state.objects_view("biz").values() if b.get("default") == 0]  # pool hidden
    hosts = len(state.objects_view("host"))
    if resource in ("biz", "set", "module"):
        out = {"search_business": pages(len(bizs), "search_business")}
        if resource != "biz":
            per_biz = Counter(d["bk_biz_id"] for d in state.objects_view(resource).values())
            out[f"search_{resource}"] = sum(pages(per_biz[b], f"search_{resource}") for b in bizs)
        return out
    # host and host_relation list the businesses too: one hidden from the user makes their sweep unsafe.
    out = {"search_business": pages(len(bizs), "search_business"),
           "list_hosts_without_biz": pages(hosts, "list_hosts_without_biz")}
    if resource == "host_relation":  # host ids in chunks, no paging: none at all for no hosts
        out["find_host_biz_relations"] = -(-hosts // LIMITS["find_host_biz_relations"])
    return out


class Recording(CmdbClient):
    """rwatch's client, noting each list request it sends, for the baseline to replay."""

    sent: Sent
    resource = ""

    async def call(self, url: str, body: dict[str, Any], *, resource: str | None = None,
                   api: str = WATCH_API) -> Any:
        if "/event/watch/" not in url:
            self.sent.setdefault(self.resource, []).append((url, body))
        return await super().call(url, body, resource=resource, api=api)


async def baseline(sent: Sent) -> dict[str, float]:
    """Replay rwatch's list requests with a plain aiohttp client, one at a time: seconds per resource."""
    seconds: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for resource, requests in sent.items():
            t0 = time.perf_counter()
            for url, body in requests:
                async with http.post(url, data=orjson.dumps(body), headers=JSON) as resp:
                    if orjson.loads(await resp.read())["code"]:
                        raise RuntimeError(f"{url} failed on replay")
            seconds[resource] = time.perf_counter() - t0
    return seconds


def bench_config(sim_url: str, tmp: Path, tag: str, mirror: str, bus: str, rate_limit: float) -> Config:
    return Config.model_validate({
        "cmdb": {"base_url": sim_url, "rate_limit": rate_limit},
        "watch": {"resources": {r: {"enabled": True} for r in RESOURCES}},
        "bus": {"kind": bus, "url": URL, "exchange": f"bench-{tag}", "queue_prefix": f"bench-{tag}"},
        "store": {"url": f"sqlite:///{tmp}/state-{tag}.db"},
        "sinks": {SINK: {"kind": "mirror", "url": mirror}},
    })


async def new_mirror(kind: str, tmp: Path, tag: str, made: list[str]) -> str:
    """A fresh mirror URL: a SQLite file, or a scratch PostgreSQL database (dropped at the end)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp}/mirror-{tag}.db"
    made.append(f"rwatch_bench_{tag.replace('-', '_')}")
    conn = await asyncpg.connect(PG_URL)
    await conn.execute(f'CREATE DATABASE "{made[-1]}"')
    await conn.close()
    return f"{PG_URL.rpartition('/')[0]}/{made[-1]}"


async def check_mirror(sink: MirrorSink, sim: Simulator, config: Config) -> dict[str, Any]:
    """Host: the simulator's keys, SAMPLE random ones equal field by field; host_relation: the same keys."""
    truth, mirrored = sim.state.objects_view("host"), await sink.objects("host")
    fields = config.watch.resources["host"].fields
    sample = random.Random(0).sample(sorted(truth), min(SAMPLE, len(truth)))
    wrong = [k for k in sample if k not in mirrored or any(mirrored[k].data.get(f) != truth[k].get(f) for f in fields)]
    relations = set(await sink.objects("host_relation")) == set(sim.state.objects_view("host_relation"))
    ok = set(mirrored) == set(truth) and not wrong and relations
    return {"ok": ok, "hosts": len(truth), "mirrored": len(mirrored), "sampled": len(sample), "wrong": wrong[:5],
            "relations_equal": relations}


async def mirror_alone(resyncer: Resyncer, url: str) -> dict[str, float]:
    """The same snapshot events (listed again, untimed) applied straight to a fresh mirror, page by page."""
    seconds: dict[str, float] = {}
    async with MirrorSink("alone", MirrorSinkConfig(kind="mirror", url=SecretUrl(url))) as sink:
        for resource in RESOURCES:
            pages: list[list[Event]] = []

            async def keep(events: list[Event], pages: list[list[Event]] = pages) -> None:
                pages.append(events)
            await resyncer.snapshot(resource, keep)
            t0 = time.perf_counter()
            for page in pages:
                await sink.apply(page)
            seconds[resource] = time.perf_counter() - t0
    return seconds


async def rwatch_run(sim: Simulator, config: Config, alone: str | None = None) -> dict[str, Any]:
    """Every resource resynced through the bus into a fresh mirror, one after the other; then the check."""
    stop, sinks = asyncio.Event(), make_sinks(config)
    sink = sinks[SINK]
    assert isinstance(sink, MirrorSink)
    await sink.open()
    bus = make_bus(config, stop=stop, name=f"bench {config.bus.exchange}")
    out: dict[str, Any] = {"resources": {}, "sent": {}}
    consumers = None
    try:
        if isinstance(bus, MemoryBus):
            subscribe_sinks(bus, config, sinks, stop)
        else:
            consumers = asyncio.create_task(ConsumerGroup(config, sinks, stop, name="bench consumers").run())
        await bus.start()
        client = Recording(config.cmdb)
        async with client, open_store(config.store.url.get_secret_value()) as store:
            resyncer = Resyncer(config, client, bus, stop, store=store)
            client.sent, t0 = out["sent"], time.perf_counter()
            for resource in RESOURCES:
                client.resource = resource
                r = await resyncer.run(resource, trigger="bench")
                out["resources"][resource] = {"listed": r.listed, "requests": dict(r.requests), "seconds": r.seconds,
                                              "version": r.version}
            out["rss_mb"] = peak_rss_mb()
            for _ in range(600 if consumers else 1):  # amqp: until the consumers have applied every host
                out["applied_s"], out["check"] = time.perf_counter() - t0, await check_mirror(sink, sim, config)
                if out["check"]["ok"] or consumers is None:
                    break
                await asyncio.sleep(0.5)
            if alone is not None:
                client.sent = {}  # listed again for the mirror's cost alone: not requests of the resync
                out["mirror_alone"] = await mirror_alone(resyncer, alone)
    finally:
        stop.set()
        if consumers is not None:
            await consumers
        await bus.close()
        await sink.close()
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    began, tag, made = time.perf_counter(), uuid.uuid4().hex[:8], list[str]()
    per_set = max(1, args.modules // (args.bizs * args.sets_per_biz))
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "params": {"hosts": args.hosts, "bizs": args.bizs, "sets": args.bizs * args.sets_per_biz, "bus": args.bus,
                   "modules": args.bizs * args.sets_per_biz * per_set, "mirror": args.mirror, "rounds": args.rounds}}
    result["machine"]["busy_before_start"] = before = round(await busy_fraction(1.0), 2)
    if before > 0.2:
        print(f"warning: the machine is {before:.0%} busy before the bench starts: noisy numbers", file=sys.stderr)
    t0 = time.perf_counter()
    async with Simulator(SimOptions(port=0, bizs=args.bizs, sets_per_biz=args.sets_per_biz,
                                    modules_per_set=per_set, hosts=args.hosts)) as sim:
        gc.collect()
        gc.freeze()  # the simulator's heap stands for a CMDB elsewhere: out of the collector's sight
        result["build_s"], result["rss_mb_before"] = round(time.perf_counter() - t0, 1), peak_rss_mb()
        print(f"simulator: {args.hosts} hosts in {result['build_s']} s", file=sys.stderr)
        configs: list[Config] = []
        runs: list[dict[str, Any]] = []
        bases: list[dict[str, float]] = []
        with tempfile.TemporaryDirectory(prefix="rwatch-bench-resync-") as tmpdir:
            tmp = Path(tmpdir)

            async def rwatch(kind: str, rate_limit: float = 0.0, alone: bool = False) -> dict[str, Any]:
                name = f"{tag}-{kind}{len(configs)}"
                mirror = await new_mirror(args.mirror, tmp, name, made)
                configs.append(bench_config(sim.url, tmp, name, mirror, args.bus, rate_limit))
                other = await new_mirror(args.mirror, tmp, f"{name}-alone", made) if alone else None
                return await rwatch_run(sim, configs[-1], other)
            try:
                for r in range(args.rounds):  # the first round runs rwatch first: the baseline replays its requests
                    for side in ("rwatch", "baseline") if r % 2 == 0 else ("baseline", "rwatch"):
                        if side == "rwatch":
                            runs.append(await rwatch("r", alone=r == 0 and getattr(args, "mirror_alone", True)))
                        else:
                            bases.append(await baseline(runs[0]["sent"]))
                        print(f"round {r}: {side} done", file=sys.stderr)
                if args.rate_limited:
                    result["limited"] = await rwatch("l", CmdbConfig().rate_limit)
            finally:
                for config in configs if args.bus == "amqp" else ():
                    with contextlib.suppress(Exception):
                        await delete_topology(config)
                if made:
                    conn = await asyncpg.connect(PG_URL)
                    for name in made:
                        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    await conn.close()
        table: dict[str, Any] = {}
        for res in RESOURCES:
            first, low, med = runs[0]["resources"][res], minimum(sim.state, res), statistics.median
            secs, base = med(x["resources"][res]["seconds"] for x in runs), med(b[res] for b in bases)
            table[res] = {"listed": first["listed"], "requests": first["requests"], "minimum": low,
                          "requests_ratio": ratio(sum(first["requests"].values()), sum(low.values())),
                          "seconds": round(secs, 3), "baseline_seconds": round(base, 3), "ratio": ratio(secs, base),
                          "mirror_alone_s": round(runs[0].get("mirror_alone", {}).get(res, 0.0), 3),
                          "rounds_s": [round(x["resources"][res]["seconds"], 3) for x in runs],
                          "baseline_rounds_s": [round(b[res], 3) for b in bases]}
            if "limited" in result:
                table[res]["limited_s"] = round(result["limited"]["resources"][res]["seconds"], 3)
    gc.unfreeze()
    result["resources"], result["rss_mb_after"] = table, runs[0]["rss_mb"]
    sent = [{r: sorted((u, orjson.dumps(b)) for u, b in v) for r, v in x["sent"].items()} for x in runs]
    result["same_requests"] = all(x == sent[0] for x in sent)
    if args.bus == "amqp":
        result["applied_s"] = [round(x.get("applied_s", 0), 2) for x in runs]
    result["checks"] = [x["check"] for x in [*runs, result.get("limited")] if x]
    failures.extend(f"mirror check failed: {c}" for c in result["checks"] if not c["ok"])
    if "limited" in result:
        result["limited"] = {"rate_limit": CmdbConfig().rate_limit,
                             "seconds": round(sum(r["limited_s"] for r in table.values()), 3)}
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    p, t = result["params"], result["resources"]
    tot = {k: sum(r[k] for r in t.values()) for k in ("seconds", "baseline_seconds", "mirror_alone_s", "listed")}
    req, low = (sum(sum(r[k].values()) for r in t.values()) for k in ("requests", "minimum"))
    rows = [(n, r["listed"], ", ".join(f"{a} {k}" for a, k in r["requests"].items()), sum(r["minimum"].values()),
             r["requests_ratio"], r["seconds"], r["baseline_seconds"], r["ratio"], r["mirror_alone_s"])
            for n, r in t.items()]
    rows.append(("total", tot["listed"], f"{req} requests", low, ratio(req, low), tot["seconds"],
                 tot["baseline_seconds"], ratio(tot["seconds"], tot["baseline_seconds"]), tot["mirror_alone_s"]))
    lines = [f"Resync of {p['hosts']} hosts, {p['modules']} modules, {p['sets']} sets, {p['bizs']} businesses: "
             f"{p['bus']} bus -> {p['mirror']} mirror, rate_limit 0; seconds: median of {p['rounds']} round(s)",
             f"{'resource':14}{'listed':>8}  {'list requests by API':52}{'min':>5}{'req/min':>8}{'rwatch s':>9}"
             f"{'base s':>8}{'ratio':>7}{'objects/s':>10}{'mirror s':>9}"]
    lines += [f"{n:14}{k:>8}  {a:52}{m:>5}{q:>8.2f}{s:>9.2f}{b:>8.2f}{x:>7.2f}{k / s:>10.0f}{w:>9.2f}"
              for n, k, a, m, q, s, b, x, w in rows]
    lines += ["base s: a plain aiohttp client replaying rwatch's list requests one at a time (the simulator's cost"
              f" of answering them); every round sent the same requests: {'yes' if result['same_requests'] else 'NO'}",
              "mirror s: the same snapshot events applied straight to a fresh mirror (its write cost alone)"]
    if "applied_s" in result:
        lines.append(f"amqp: the consumers had applied every host {', '.join(map(str, result['applied_s']))} s after "
                     "the first resync started (polled every 0.5 s; rwatch s above: until each mark was confirmed)")
    if "limited" in result:
        lim, rate = result["limited"], result["limited"]["rate_limit"]
        lines.append(f"at the shipped rate_limit {rate:g}/s: {lim['seconds']:.2f} s, "
                     f"x{lim['seconds'] / tot['seconds']:.2f} the unlimited run, against (requests + heads) / rate "
                     f"= {(req + len(t)) / rate:.2f} s: "
                     + ", ".join(f"{n} {r['limited_s']:.2f} s" for n, r in t.items()))
    for c in result["checks"]:
        wrong = f" EXCEPT {', '.join(c['wrong'])}" if c["wrong"] else ""
        lines.append(f"mirror check: {c['mirrored']} of {c['hosts']} hosts mirrored, {c['sampled']} sampled equal "
                     f"field by field{wrong}, host_relation keys {'equal' if c['relations_equal'] else 'DIFFER'}: "
                     + ("OK" if c["ok"] else "FAILED"))
    lines.append(f"peak RSS {result['rss_mb_before']:.0f} MB with the simulator built, {result['rss_mb_after']:.0f} "
                 f"MB after the first rwatch run; simulator built in {result['build_s']} s; "
                 f"total {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=100_000)
    parser.add_argument("--bizs", type=int, default=20)
    parser.add_argument("--sets-per-biz", type=int, default=5)
    parser.add_argument("--modules", type=int, default=1000, help="in all, split evenly over the sets")
    parser.add_argument("--bus", choices=("memory", "amqp"), default="memory")
    parser.add_argument("--mirror", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=2, help="rwatch/baseline pairs, order alternating")
    parser.add_argument("--rate-limited", action=argparse.BooleanOptionalAction, default=True,
                        help="also one rwatch run at the shipped cmdb.rate_limit")
    parser.add_argument("--mirror-alone", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the first round's snapshot events applied straight to a fresh mirror")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_bench(parse_args, main, report)
    sys.exit(1 if failures else 0)
