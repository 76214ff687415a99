"""Every figure of the benchmarks in one command: each next to its baseline from the same run, in one table.

Run (RabbitMQ on 127.0.0.1:5672, or RWATCH_TEST_AMQP_URL; under 10 minutes on 2 cores, ``--quick`` about 4):

    python bench/run.py [--quick] [--budget SECONDS] [--zabbix]

In sequence, in this process (reusing each bench module's ``main``), sized to fit the time budget:

1. publish (bench/watch_publish.py): a watcher draining a simulator's backlog against a plain aio-pika
   confirmed publisher; rounds alternate which side goes first.
2. apply (bench/apply.py): rwatch's consumers into the SQLite mirror against a plain consume-and-ack loop.
3. latency (bench/latency.py): change -> broker and change -> mirror at 100 changes/s, next to the
   simulator's own delivery to a plain long-poll client.
4. resync (bench/resync.py): 100,000 hosts, against a plain client replaying rwatch's list requests, and the
   requests against the fewest the page limits allow.
5. memory (bench/memory.py), with idle cost (watch_publish.idle_cost) alongside: peak RSS of the watcher and of
   the consumer processes draining backlogs of growing size, against their own RSS idle after start-up; the
   largest backlog is the biggest of 1,000,000 / 500,000 / ... that the remaining budget allows at the drain
   rates measured in steps 1 and 2. The idle rwatch process makes a poll per resource every 20 s: it does not
   disturb a memory measurement, and nothing it measures (requests, its own CPU) depends on the machine's load.
6. only with ``--zabbix`` (the real Zabbix of tests/downstream; about 3 minutes more, outside the budget):
   bench/zabbix_sync.py (an initial sync of 1,000 hosts against a naive one-call-per-object sync, one round) and
   bench/zabbix_latency.py (change -> Zabbix at 20 changes/s for 30 s against change -> mirror).

Prints one table (figure | rwatch | baseline | ratio or percentile | goal | met?) and writes bench/results/run.json
with every bench's full result, the git revision and the machine (cores, CPU, Python, RabbitMQ, how busy).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from resource import RUSAGE_CHILDREN, RUSAGE_SELF, getrusage
from typing import Any

import aio_pika
import aiohttp

import apply
import latency
import memory
import resync
import watch_publish
from watch_publish import TICK, URL, busy_fraction, machine_jiffies, run_bench

RESULTS = Path(__file__).resolve().parent / "results" / "run.json"
LADDERS = ((100_000, 300_000, 1_000_000), (100_000, 1_000_000), (50_000, 500_000), (30_000, 300_000),
           (20_000, 200_000), (10_000, 100_000), (5_000, 50_000))
QUIESCE_S = 4.0  # the longest wait for an idle machine between drains (the benches' own default is 8 s)


@dataclass(frozen=True)
class Plan:
    budget_s: float
    publish_events: int
    publish_rounds: int
    apply_events: int
    apply_rounds: int
    latency_seconds: float
    resync_hosts: int
    resync_rounds: int
    idle_seconds: float  # a multiple of the 20 s hold


FULL = Plan(budget_s=570, publish_events=20_000, publish_rounds=3, apply_events=20_000, apply_rounds=3,
            latency_seconds=30, resync_hosts=100_000, resync_rounds=1, idle_seconds=60)
QUICK = Plan(budget_s=240, publish_events=10_000, publish_rounds=1, apply_events=10_000, apply_rounds=1,
             latency_seconds=10, resync_hosts=100_000, resync_rounds=1, idle_seconds=40)


# --- the machine -------------------------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def rabbitmq_version() -> str:
    conn = await aio_pika.connect(URL)
    try:
        transport = conn.transport
        version = transport.connection.server_properties.get("version", "unknown") if transport else "unknown"
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await conn.close()


def broker_cpu_seconds() -> float:
    """utime + stime of RabbitMQ's beam.smp (0 when it is not a local process we can see)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(beam.smp)" in text:
            fields = text[text.rindex(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def own_cpu_seconds() -> float:
    """This process and its finished children (simulators, rwatch processes): user + system."""
    return sum(getrusage(who).ru_utime + getrusage(who).ru_stime for who in (RUSAGE_SELF, RUSAGE_CHILDREN))


class Accounting:
    """Where the machine's CPU went during the run: the bench and its children, the broker, everything else."""

    def __init__(self) -> None:
        self.jiffies, self.own, self.broker = machine_jiffies(), own_cpu_seconds(), broker_cpu_seconds()

    def summary(self) -> dict[str, float]:
        busy0, total0 = self.jiffies
        busy1, total1 = machine_jiffies()
        wall_cpu = (total1 - total0) / TICK  # CPU-seconds available (cores x wall time)
        busy = (busy1 - busy0) / TICK
        own, broker = own_cpu_seconds() - self.own, broker_cpu_seconds() - self.broker
        return {"busy_during_run": round(busy / wall_cpu, 2) if wall_cpu else 0.0,
                "bench_and_children_cpu_s": round(own, 1), "broker_cpu_s": round(broker, 1),
                "other_processes_cpu_s": round(max(0.0, busy - own - broker), 1)}


# --- the steps ---------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


def choose_sizes(left: float, watcher_rate: float, consumer_rate: float) -> tuple[list[int], float]:
    """The first ladder of backlog sizes whose estimated time fits ``left`` seconds (else the smallest)."""
    def estimate(sizes: tuple[int, ...]) -> float:
        drains = sum(s / watcher_rate + s / consumer_rate for s in sizes) * 1.25  # drains, with a margin
        return max(sizes) / 40_000 + drains + 12 * len(sizes) + 5  # + building the backlog, spawning, idling

    for sizes in LADDERS:
        if estimate(sizes) <= left:
            return list(sizes), round(estimate(sizes), 1)
    return list(LADDERS[-1]), round(estimate(LADDERS[-1]), 1)


async def memory_and_idle(sizes: list[int], idle_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="rwatch-bench-idle-") as tmpdir:
        async with aiohttp.ClientSession() as http:
            idle = asyncio.create_task(watch_publish.idle_cost(Path(tmpdir), http, idle_seconds,
                                                               f"{uuid.uuid4().hex[:8]}-idle"))
            try:
                mem = await memory.main(memory.parse_args(["--sizes", ",".join(map(str, sizes))]))
            finally:
                idle_result = await idle
    return mem, idle_result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    watch_publish.QUIESCE_TIMEOUT = QUIESCE_S
    plan = QUICK if args.quick else FULL
    if args.budget is not None:
        plan = Plan(**{**asdict(plan), "budget_s": args.budget})
    began = time.perf_counter()
    account = Accounting()
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full", "plan": asdict(plan),
        "machine": {"cores": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
                    "rabbitmq": await rabbitmq_version(), "sqlite": sqlite3.sqlite_version,
                    "amqp": URL.split("@")[-1], "loadavg_at_start": list(os.getloadavg())},
        "steps": {},
    }
    result["machine"]["busy_before_start"] = before = round(await busy_fraction(1.0), 2)
    if before > 0.2:
        print(f"warning: the machine is {before:.0%} busy before the run starts; numbers will be noisy",
              file=sys.stderr)

    async def step(name: str, coro: Any) -> Any:
        say(f"{name} (at {time.perf_counter() - began:.0f} s)")
        t0, during = time.perf_counter(), Accounting()
        out = await coro
        result["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), **during.summary()}
        gc.collect()
        return out

    p = plan
    result["publish"] = await step("publish", watch_publish.main(watch_publish.parse_args([
        "--events", str(p.publish_events), "--rounds", str(p.publish_rounds), "--idle-seconds", "0",
        "--no-profile", "--no-rate-limited", "--no-gc-freeze"])))
    result["apply"] = await step("apply", apply.main(apply.parse_args([
        "--events", str(p.apply_events), "--rounds", str(p.apply_rounds)])))
    result["latency"] = await step("latency", latency.main(latency.parse_args([
        "--seconds", str(p.latency_seconds), "--run", ""])))
    result["resync"] = await step("resync", resync.main(resync.parse_args([
        "--hosts", str(p.resync_hosts), "--rounds", str(p.resync_rounds), "--no-rate-limited",
        "--no-mirror-alone"])))
    if resync.failures:
        raise RuntimeError(f"resync: {resync.failures}")

    left = p.budget_s - (time.perf_counter() - began)
    sizes, estimate = choose_sizes(left, result["publish"]["drain"]["median_watcher_events_per_s"],
                                   result["apply"]["drain"]["median_rwatch_events_per_s"])
    result["memory_plan"] = {"left_s": round(left, 1), "sizes": sizes, "estimate_s": estimate}
    result["memory"], result["idle"] = await step(f"memory {sizes} and idle {p.idle_seconds:g} s",
                                                  memory_and_idle(sizes, p.idle_seconds))
    if args.zabbix:  # imported here: they need the real Zabbix (and pytest, for its instance helpers)
        import zabbix_latency
        import zabbix_sync

        result["zabbix_sync"] = await step("zabbix sync", zabbix_sync.main(zabbix_sync.parse_args(["--rounds", "1"])))
        result["zabbix_latency"] = await step("zabbix latency", zabbix_latency.main(zabbix_latency.parse_args([
            "--seconds", "30"])))
    result["machine"].update(account.summary())
    result["table"] = table(result)
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


# --- the table -----------------------------------------------------------------------------------------------


def row(figure: str, rwatch: str, baseline: str, measure: str, goal: str, met: bool | None) -> dict[str, Any]:
    return {"figure": figure, "rwatch": rwatch, "baseline": baseline, "measure": measure, "goal": goal,
            "met": met}


def table(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    d = r["publish"]["drain"]
    rows.append(row(f"publish: watcher drain, {d['events']:,} events, events/s",
                    f"{d['median_watcher_events_per_s']:,.0f}",
                    f"{d['median_baseline_events_per_s']:,.0f} plain aio-pika", f"ratio {d['median_ratio']:.2f}",
                    ">= 0.90", d["median_ratio"] >= 0.9))
    d = r["apply"]["drain"]
    rows.append(row(f"apply: consumer drain, {d['events']:,} events, events/s",
                    f"{d['median_rwatch_events_per_s']:,.0f}",
                    f"{d['median_baseline_events_per_s']:,.0f} consume+ack", f"ratio {d['median_ratio']:.2f}",
                    ">= 0.80", d["median_ratio"] >= 0.8))
    run = r["latency"]["runs"][0]
    base = run["sim_baseline"]
    for key, name, goal in (("mirror", "change -> mirror", 50.0), ("watch_path", "change -> broker (watch path)",
                                                                     25.0)):
        s = run[key]
        rows.append(row(f"latency {name} at {r['latency']['params']['rate']:g}/s, ms", f"{s['p50_ms']:.1f}",
                        f"{base['p50_ms']:.1f} sim delivery", "p50", "-", None))
        complete = s["missing"] == 0
        rows.append(row(f"latency {name}, ms" + ("" if complete else f" ({s['missing']} MISSING)"),
                        f"{s['p99_ms']:.1f}", f"{base['p99_ms']:.1f} sim delivery", f"p99 (n={s['n']})",
                        f"< {goal:g} ms", complete and s["p99_ms"] < goal))
    m = r["memory"]["memory"]
    for side in ("watcher", "consumer"):
        large, small = m["runs"][-1][side], m["runs"][0][side]
        flat = m[f"{side}_flat_ratio"]
        rows.append(row(f"memory: {side} peak RSS draining {m['sizes'][-1]:,} (vs {m['sizes'][0]:,}), MB",
                        f"{large['peak_mb']:.0f} (vs {small['peak_mb']:.0f})", f"{large['idle_mb']:.0f} idle",
                        f"peak ratio {flat:.2f}", f"<= {m['flat_goal']:.2f} (flat)", flat <= m["flat_goal"]))
    i = r["idle"]
    rows.append(row("idle: CMDB requests per resource per minute", f"{i['requests_per_resource_per_min']:.2f}",
                    f"{i['minimum_per_resource_per_min']:g} (20 s hold)", f"ratio {i['requests_vs_minimum']:.2f}",
                    "<= 3.5", i["requests_per_resource_per_min"] <= 3.5))
    rows.append(row("idle: CPU-s per resource per minute", f"{i['cpu_s_per_resource_per_min']:.4f}", "-", "-",
                    "<= 0.1", i["cpu_s_per_resource_per_min"] <= 0.1))
    t = r["resync"]["resources"]
    hosts = r["resync"]["params"]["hosts"]
    secs, base_s = sum(x["seconds"] for x in t.values()), sum(x["baseline_seconds"] for x in t.values())
    checks = all(c["ok"] for c in r["resync"]["checks"])
    rows.append(row(f"resync {hosts:,} hosts, all 5 resources, s" + ("" if checks else " (MIRROR CHECK FAILED)"),
                    f"{secs:.1f}", f"{base_s:.1f} replayed requests", f"ratio {secs / base_s:.2f}", "none set",
                    None if checks else False))
    req = sum(sum(x["requests"].values()) for x in t.values())
    low = sum(sum(x["minimum"].values()) for x in t.values())
    rows.append(row("resync list requests", f"{req}", f"{low} minimum", f"ratio {req / low:.2f}", "= minimum",
                    req <= low))
    if "zabbix_sync" in r:
        rows += zabbix_rows(r["zabbix_sync"], r["zabbix_latency"])
    return rows


def zabbix_rows(sync: dict[str, Any], lat: dict[str, Any]) -> list[dict[str, Any]]:
    w, n = sync["rounds"][0]["rwatch"], sync["rounds"][0]["naive"]
    rows = [row(f"zabbix: initial sync of {sync['hosts']:,} hosts, API calls", f"{w['calls']:,}",
                f"{n['calls']:,} naive, one call per object", f"ratio {sync['calls_ratio']:g}", ">= 10",
                sync["calls_ratio"] >= 10),
            row("zabbix: the same, seconds", f"{w['seconds']:.2f}", f"{n['seconds']:.1f} naive",
                f"ratio {sync['seconds_ratio']:g}", ">= 5", sync["seconds_ratio"] >= 5)]
    z, m = lat["latency"]["all"]["zabbix"], lat["latency"]["all"]["mirror"]
    rate = lat["params"]["rate"]
    rows.append(row(f"zabbix: change -> Zabbix at {rate:g}/s, ms", f"{z['p50_ms']:.0f}", f"{m['p50_ms']:.0f} mirror",
                    "p50", "-", None))
    missing = lat["missing"]["zabbix"]
    rows.append(row("zabbix: change -> Zabbix, ms" + (f" ({missing} MISSING)" if missing else ""),
                    f"{z['p99_ms']:.0f}", f"{m['p99_ms']:.0f} mirror", f"p99 (n={z['n']})",
                    f"< {lat['goal_p99_ms']:g} ms", lat["goal_met"]))
    return rows


def report(result: dict[str, Any]) -> str:
    header = ("figure", "rwatch", "baseline", "ratio / pctl", "goal", "met?")
    cells = [[x["figure"], x["rwatch"], x["baseline"], x["measure"], x["goal"],
              {True: "yes", False: "NO", None: "-"}[x["met"]]] for x in result["table"]]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, ["-" * w for w in widths], *cells]]
    mach, plan = result["machine"], result["memory_plan"]
    lines += [
        "",
        f"memory backlog sizes {', '.join(f'{s:,}' for s in plan['sizes'])} (chosen for {plan['left_s']:.0f} s left, "
        f"estimated {plan['estimate_s']:.0f} s)",
        f"machine: {mach['cores']} x {mach['cpu_model']}, Python {mach['python']}, RabbitMQ {mach['rabbitmq']}, "
        f"SQLite {mach['sqlite']}; busy {mach['busy_before_start']:.0%} before, {mach['busy_during_run']:.0%} during "
        f"(bench and children {mach['bench_and_children_cpu_s']:.0f} CPU-s, broker {mach['broker_cpu_s']:.0f}, "
        f"other processes {mach['other_processes_cpu_s']:.0f})",
        f"total {result['elapsed_s']:.0f} s ({result['mode']}, budget {result['plan']['budget_s']:.0f} s); per step "
        "(seconds, machine busy, CPU-s of processes that are neither this bench, its children nor the broker):",
        *(f"  {k}: {v['seconds']:.0f} s, {v['busy_during_run']:.0%} busy, other processes "
          f"{v['other_processes_cpu_s']:.0f}" for k, v in result["steps"].items()),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about 4 minutes")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds the whole run should take (sizes the memory backlog; default 570, quick 240)")
    parser.add_argument("--zabbix", action="store_true",
                        help="also the zabbix sink's benches (the real Zabbix; about 3 minutes more)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_bench(parse_args, main, report)
