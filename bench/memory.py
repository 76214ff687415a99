"""Benchmark: peak memory of the watcher and of the consumer while each drains a backlog, at growing backlog sizes.

Run (RabbitMQ on 127.0.0.1:5672, or RWATCH_TEST_AMQP_URL; about 5 minutes on 2 cores with the default sizes):

    python bench/memory.py [--sizes 100000,1000000]

A simulator in its own process (1,000 hosts, CMDB's 20 s hold) holds a backlog of ``max(--sizes)`` host updates,
built once. For each size, smallest first, on a fresh exchange, queue, cursor store and mirror:

1. Watcher. ``rwatch run --role watcher`` (host only, the shipped defaults, ``gc.freeze()`` after start-up as
   always) in its own process resumes from a cursor saved just before the backlog's last ``size`` events. The
   simulator holds its first long-poll for a few seconds (a ``slow`` fault): meanwhile the process is idle
   after start-up and its RSS is the baseline. Then it drains the backlog into the queue; its RSS (VmRSS) is
   sampled every 50 ms until the queue holds every event, and its VmHWM (the kernel's own peak) is read last.
2. Consumer. ``rwatch run --role consumer`` (SQLite mirror) in its own process, on the queue the watcher just
   filled. A placeholder consumer of ours attached first (the queue is single-active-consumer), so rwatch's
   consumer starts as a standby: idle after start-up, its baseline. Closing the placeholder hands it the
   queue; it drains it (the backlog's last event in the mirror and the queue empty) while sampled the same way.

Claim: memory is flat, i.e. peak RSS does not grow with the backlog: peak(largest) / peak(smallest) per process
(1.00 = flat; the goal here is <= 1.10 for a 10x backlog). Prints a table, writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from rwatch.bus.topology import declare_topology, queue_name
from rwatch.config import Config
from rwatch.events import watch_event_id
from rwatch.store.base import open_store
from rwatch.store.records import CursorState
from watch_publish import (
    URL,
    Child,
    busy_fraction,
    delete_topology,
    host_mirror_toml,
    pyspy_stacks,
    spawn,
    start_sim,
    stop_pyspy,
    summarize_stacks,
)

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
SINK = "mirror"
OTHER_RESOURCES = ("host_relation", "biz", "set", "module")
IDLE_HOLD = 4.0  # seconds the simulator holds the watcher's first poll: its idle window after start-up
FLAT_GOAL = 1.10  # peak(largest) / peak(smallest): at most 10 % more for the largest backlog
CHUNK = 100_000  # host updates per /admin/load/run request while building the backlog


# --- memory of a process -----------------------------------------------------------------------------------


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB, from /proc/<pid>/status (no psutil needed)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


@dataclass
class Sampler:
    """VmRSS of one process every ``period`` seconds while running; keeps the peak and a 1 s timeline."""

    pid: int
    period: float = 0.05
    peak_kb: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, kB), one a second

    async def run(self, halt: asyncio.Event) -> None:
        t0 = last = time.perf_counter()
        while not halt.is_set():
            rss, _ = memory_kb(self.pid)
            self.peak_kb = max(self.peak_kb, rss)
            now = time.perf_counter()
            if now - last >= 1.0 or not self.timeline:
                self.timeline.append((round(now - t0, 1), rss))
                last = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), self.period)


async def idle_rss(pid: int, seconds: float = 1.5) -> int:
    """The median VmRSS over ``seconds`` (the process idle)."""
    samples = []
    for _ in range(max(1, int(seconds / 0.1))):
        samples.append(memory_kb(pid)[0])
        await asyncio.sleep(0.1)
    return int(statistics.median(samples))


async def sampled_drain(child: Child, done: Callable[[], Awaitable[bool]], timeout: float,
                        profile: Path | None = None) -> dict[str, Any]:
    """Sample ``child``'s RSS until ``done()`` (polled every 0.25 s): seconds, peak RSS, VmHWM, timeline."""
    sampler, halt = Sampler(child.pid), asyncio.Event()
    task = asyncio.create_task(sampler.run(halt))
    spy = await start_pyspy(child.pid, profile) if profile is not None else None
    t0, cpu0 = time.perf_counter(), child.cpu_seconds()
    try:
        async with asyncio.timeout(timeout):
            while not await done():
                if child.proc.returncode is not None:
                    raise RuntimeError(f"{child.name} exited: {child.log.read_text()[-2000:]}")
                await asyncio.sleep(0.25)
        seconds, cpu = time.perf_counter() - t0, child.cpu_seconds() - cpu0
        _, hwm = memory_kb(child.pid)
    finally:
        halt.set()
        await task
        if spy is not None:
            await stop_pyspy(spy)
    return {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "peak_rss_kb": sampler.peak_kb, "hwm_kb": hwm,
            "timeline": sampler.timeline}


# --- profile (optional): py-spy on the child, raw collapsed stacks -------------------------------------------


async def start_pyspy(pid: int, out: Path) -> asyncio.subprocess.Process | None:
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        pyspy, "record", "--pid", str(pid), "--rate", "200", "--native", "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(0.5)
    return proc


def profile_summary(path: Path, top: int = 15) -> dict[str, Any] | None:
    if not path.exists() or not path.stat().st_size:
        return None
    return summarize_stacks(pyspy_stacks(path.read_text(), 200), top)


# --- the simulator's backlog -------------------------------------------------------------------------------


class Sim:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def get(self, path: str) -> Any:
        async with self.http.get(self.url + path) as resp:
            resp.raise_for_status()
            return await resp.json(loads=orjson.loads)

    async def post(self, path: str, body: Any) -> Any:
        async with self.http.post(self.url + path, json=body) as resp:
            resp.raise_for_status()
            return await resp.json(loads=orjson.loads)

    async def cursor_at(self, seq: int) -> str:
        return str((await self.get(f"/admin/chain/host?since={seq}&limit=1"))["nodes"][0]["cursor"])

    async def build(self, n: int) -> tuple[int, str]:
        """Append ``n`` host updates to the host chain; returns the seq of the first and the last cursor."""
        start = (await self.get("/admin/stats"))["chains"]["host"]["end"]
        made = 0
        while made < n:
            made += (await self.post("/admin/load/run", {"ops": min(CHUNK, n - made), "mix": {"host.update": 1}}))[
                "events"]
        end = (await self.get("/admin/stats"))["chains"]["host"]["end"]
        if end - start != n:
            raise RuntimeError(f"asked for {n} host events, the chain grew by {end - start}")
        return start, await self.cursor_at(end - 1)

    async def slow_fired(self) -> int:
        return int((await self.get("/admin/stats"))["faults_fired"].get("slow", 0))


# --- one size ---------------------------------------------------------------------------------------------


def config_for(tag: str, tmp: Path, sim_url: str) -> tuple[Config, Path]:
    """The rwatch configuration of one size: as a Config (for the topology) and as the TOML the children read."""
    state, mirror = tmp / f"state-{tag}.db", tmp / f"mirror-{tag}.db"
    config = Config.model_validate({
        "cmdb": {"base_url": sim_url},
        "watch": {"resources": {"host": {"enabled": True}, **{r: {"enabled": False} for r in OTHER_RESOURCES}}},
        "bus": {"url": URL, "exchange": f"bench-{tag}", "queue_prefix": f"bench-{tag}"},
        "store": {"url": f"sqlite:///{state}"},
        "sinks": {SINK: {"kind": "mirror", "url": f"sqlite:///{mirror}"}},
    })
    path = host_mirror_toml(tmp / f"rwatch-{tag}.toml", sim_url, tag, state, mirror)
    return config, path


def logged(child: Child, event: str) -> bool:
    for line in child.log.read_text().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            if orjson.loads(line).get("event") == event:
                return True
    return False


def mirrored(path: Path, event_id: str) -> bool:
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM rwatch_objects WHERE event_id = ?", (event_id,)).fetchone() is not None
    except sqlite3.OperationalError:  # the schema is not there yet
        return False


async def one_size(sim: Sim, size: int, first_seq: int, total: int, last_cursor: str, tmp: Path, tag: str,
                   profile: Path | None) -> dict[str, Any]:
    config, path = config_for(tag, tmp, sim.url)
    queue = queue_name(config, SINK, "host")
    conn = await aio_pika.connect(URL)
    children: list[Child] = []
    out: dict[str, Any] = {"events": size}
    try:
        # The topology, and the placeholder that keeps rwatch's consumer a standby until it is closed.
        holder = await conn.channel()
        await holder.set_qos(prefetch_count=1)
        await declare_topology(holder, config)
        held = await holder.get_queue(queue, ensure=False)
        await held.consume(lambda message: asyncio.sleep(0), no_ack=False)  # never acks: holds one message
        probe = await conn.channel()

        async def depth() -> int:
            declared = await probe.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

        # Resume point: the cursor just before the last ``size`` events of the backlog.
        store = open_store(config.store.url.get_secret_value())
        await store.open()
        await store.save(CursorState.from_cursor(config.cmdb.tenant, "host",
                                                 await sim.cursor_at(first_seq + total - size - 1)))
        await store.close()

        # 1. The watcher: idle while its first poll is held, then the drain into the queue.
        fired = await sim.slow_fired()
        await sim.post("/admin/faults", {"kind": "slow", "resource": "host", "delay": IDLE_HOLD})
        watcher = await spawn(f"watcher-{tag}", ["run", "--role", "watcher", "--config", str(path)],
                              tmp / f"watcher-{tag}.log")
        children.append(watcher)
        async with asyncio.timeout(60):
            while await sim.slow_fired() == fired:
                if watcher.proc.returncode is not None:
                    raise RuntimeError(f"the watcher exited: {watcher.log.read_text()[-2000:]}")
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        idle = await idle_rss(watcher.pid)

        async def published() -> bool:
            return await depth() + 1 >= size  # + the one the placeholder holds

        spy = profile / f"watcher-{size}.txt" if profile else None
        drain = await sampled_drain(watcher, published, 120 + size / 1000, spy)
        out["watcher"] = {"idle_rss_kb": idle, **drain}
        if spy is not None:
            out["watcher"]["profile"] = profile_summary(spy)
        await watcher.stop()

        # 2. The consumer: a standby behind the placeholder, then the drain into the mirror.
        consumer = await spawn(f"consumer-{tag}", ["run", "--role", "consumer", "--config", str(path)],
                               tmp / f"consumer-{tag}.log")
        children.append(consumer)
        async with asyncio.timeout(60):
            while not logged(consumer, "consumers_started"):
                if consumer.proc.returncode is not None:
                    raise RuntimeError(f"the consumer exited: {consumer.log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        idle = await idle_rss(consumer.pid)
        await holder.close()  # its one message goes back; rwatch's consumer becomes the active one
        mirror = Path(config.sinks[SINK].url.get_secret_value().removeprefix("sqlite:///"))  # type: ignore[union-attr]
        last_id = watch_event_id("host", last_cursor)

        async def applied() -> bool:
            return mirrored(mirror, last_id) and await depth() == 0

        spy = profile / f"consumer-{size}.txt" if profile else None
        drain = await sampled_drain(consumer, applied, 120 + size / 1000, spy)
        out["consumer"] = {"idle_rss_kb": idle, **drain}
        if spy is not None:
            out["consumer"]["profile"] = profile_summary(spy)
    finally:
        for child in children:
            await child.stop()
        with contextlib.suppress(Exception):
            await conn.close()
        with contextlib.suppress(Exception):
            await delete_topology(config)
    for side in ("watcher", "consumer"):
        x = out[side]
        rss = [kb for _, kb in x["timeline"]]
        tenth = max(1, len(rss) // 10)  # RSS early and late in the drain: flat in time too
        x["first_tenth_mb"], x["last_tenth_mb"] = round(max(rss[:tenth]) / 1024, 1), round(max(rss[-tenth:]) / 1024, 1)
        x["events_per_s"] = round(size / x["seconds"], 1)
        x["peak_mb"] = round(max(x["peak_rss_kb"], x["hwm_kb"]) / 1024, 1)
        x["idle_mb"] = round(x["idle_rss_kb"] / 1024, 1)
    return out


# --- main --------------------------------------------------------------------------------------------------


async def measure(sizes: list[int], tmp: Path, tag: str, *, hosts: int = 1000,
                  profile: Path | None = None) -> dict[str, Any]:
    """Every size against one simulator holding the largest backlog; the flatness ratios per process."""
    sizes = sorted(sizes)
    sim_child, sim_url = await start_sim(tmp, "sim-memory", hosts)
    out: dict[str, Any] = {"sizes": sizes}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            sim = Sim(http, sim_url)
            t0 = time.perf_counter()
            first_seq, last_cursor = await sim.build(sizes[-1])
            out["build_s"] = round(time.perf_counter() - t0, 1)
            out["sim_rss_mb"] = round(memory_kb(sim_child.pid)[0] / 1024, 1)
            print(f"memory: backlog of {sizes[-1]} host events in {out['build_s']} s "
                  f"(simulator {out['sim_rss_mb']:.0f} MB)", file=sys.stderr)
            runs = []
            for i, size in enumerate(sizes):
                run = await one_size(sim, size, first_seq, sizes[-1], last_cursor, tmp, f"{tag}-m{i}", profile)
                runs.append(run)
                print(f"memory: {size} events: watcher idle {run['watcher']['idle_mb']:.0f} MB, peak "
                      f"{run['watcher']['peak_mb']:.0f} MB ({run['watcher']['events_per_s']:.0f}/s); consumer idle "
                      f"{run['consumer']['idle_mb']:.0f} MB, peak {run['consumer']['peak_mb']:.0f} MB "
                      f"({run['consumer']['events_per_s']:.0f}/s)", file=sys.stderr)
            out["runs"] = runs
    finally:
        await sim_child.stop()
    for side in ("watcher", "consumer"):
        small, large = out["runs"][0][side], out["runs"][-1][side]
        out[f"{side}_flat_ratio"] = round(large["peak_mb"] / small["peak_mb"], 3)
        out[f"{side}_peak_over_idle"] = round(large["peak_mb"] / large["idle_mb"], 3)
    out["flat_goal"] = FLAT_GOAL
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "amqp": URL.split("@")[-1]},
                              "params": {"sizes": args.sizes, "hosts": args.hosts}}
    result["machine"]["busy_before_start"] = round(await busy_fraction(1.0), 2)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rwatch-bench-memory-") as tmpdir:
        result["memory"] = await measure(args.sizes, Path(tmpdir), uuid.uuid4().hex[:8], hosts=args.hosts,
                                         profile=args.profile)
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    m = result["memory"]
    lines = [f"Memory while draining a backlog (MB; idle = the same process after start-up, before the drain; "
             f"first/last 10% = the highest RSS sampled early and late in the drain; backlog of {m['sizes'][-1]} "
             f"built in {m['build_s']} s)",
             f"{'process':10} {'backlog':>9} {'idle':>7} {'peak':>7} {'peak/idle':>10} {'first 10%':>10} "
             f"{'last 10%':>9} {'events/s':>9} {'seconds':>8}"]
    for side in ("watcher", "consumer"):
        for run in m["runs"]:
            x = run[side]
            lines.append(f"{side:10} {run['events']:>9} {x['idle_mb']:>7.1f} {x['peak_mb']:>7.1f} "
                         f"{x['peak_mb'] / x['idle_mb']:>10.2f} {x['first_tenth_mb']:>10.1f} "
                         f"{x['last_tenth_mb']:>9.1f} {x['events_per_s']:>9.0f} {x['seconds']:>8.1f}")
        ratio = m[f"{side}_flat_ratio"]
        lines.append(f"{side}: peak({m['sizes'][-1]}) / peak({m['sizes'][0]}) = {ratio:.2f} "
                     f"(goal <= {m['flat_goal']:.2f}: {'met' if ratio <= m['flat_goal'] else 'MISSED'})")
    for side in ("watcher", "consumer"):
        profile = m["runs"][-1][side].get("profile")
        if profile:
            lines += [f"{side} profile (py-spy, largest drain): {profile['busy_seconds']:.1f} s busy; self time:"]
            lines += [f"  {x['share_of_busy']:6.1%}  {x['function']}" for x in profile["self"][:12]]
    lines.append(f"\n(total {result['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100_000, 1_000_000],
                        help="backlog sizes, comma-separated (the largest is built once)")
    parser.add_argument("--hosts", type=int, default=1000, help="hosts in the simulator (the backlog updates them)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy (--native) both children during every drain; raw stacks kept in DIR")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    from watch_publish import run_bench

    run_bench(parse_args, main, report)
