"""Benchmark: the consumer's sustained apply rate into the SQLite mirror, against a baseline from the same run.

Run (RabbitMQ on 127.0.0.1:5672, or RWATCH_TEST_AMQP_URL; about 2 minutes on 2 cores):

    python bench/apply.py            # --help for the knobs

Each round declares a fresh exchange with rwatch's topology (``declare_topology``: the quorum queue
``<prefix>.mirror.host`` with its arguments and binding) plus a second queue with the same arguments and
binding for the baseline, and pre-loads both with one confirmed publish of ``--events`` normalized host events
(one distinct host each, realistic ``bk_detail``). Then, in alternating order:

- rwatch: ``ConsumerGroup`` (as ``run_async`` runs it) with a ``MirrorSink`` on a fresh SQLite file (WAL,
  ``synchronous=FULL``): batches of what the broker delivered (at most ``bus.prefetch`` unacknowledged) ->
  one upsert transaction -> ``ack(multiple)``. Timed from ``ConsumerGroup.run()`` (connect included) until
  the last event is applied; then checked: every host in the mirror at its version, the queue empty.
- baseline: the simplest correct consumer a user would write: aio-pika, ``set_qos(prefetch)`` with the same
  prefetch, ``async for message in queue.iterator(): await message.ack()``; no sink work. Timed the same way.

Claim: median over rounds of rwatch rate / baseline rate (goal >= 0.8). Both run in this process with the
start-up heap frozen (``gc.freeze()``, as ``rwatch run`` does). Every queue, exchange and file is removed.
Prints a table and writes bench/results/apply.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika

from rwatch.bus.consumer import ConsumerGroup
from rwatch.bus.topology import dead_queue_name, declare_topology, dlx_name, queue_arguments, queue_name
from rwatch.config import Config
from rwatch.events import Event, iso_utc, watch_event_id
from rwatch.sinks.mirror import MirrorSink
from watch_publish import GC, URL, busy_fraction, machine_jiffies, quiesce, ratio, run_bench

RESULTS = Path(__file__).resolve().parent / "results" / "apply.json"
SINK = "mirror"
BASE_SECONDS = 1_732_000_000


# --- the events ------------------------------------------------------------------------------------------


def make_events(n: int) -> list[Event]:
    """``n`` host updates, one distinct host each, with the detail fields rwatch's config asks CMDB for."""
    events = []
    for i in range(n):
        cursor = f"bench-{i:08d}"
        seconds = BASE_SECONDS + i // 100
        events.append(Event(
            id=watch_event_id("host", cursor), resource="host", action="update", key=str(i + 1),
            version=(seconds, i % 100 + 1), occurred_at=iso_utc(seconds), observed_at=iso_utc(seconds + 0.2),
            cursor=cursor,
            data={"bk_host_id": i + 1, "bk_host_innerip": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                  "bk_host_innerip_v6": "", "bk_host_outerip": "", "bk_cloud_id": 0,
                  "bk_host_name": f"host-{i + 1:06d}", "bk_os_type": "1", "bk_os_name": "linux centos",
                  "bk_agent_id": uuid.UUID(int=i + 1).hex, "operator": "ops", "bk_bak_operator": "ops2",
                  "bk_supplier_account": "0"},
        ))
    return events


# --- RabbitMQ ----------------------------------------------------------------------------------------------


def bench_config(tag: str, tmp: Path, **sink: Any) -> Config:
    return Config.model_validate({
        "watch": {"resources": {r: {"enabled": r == "host"} for r in ("host", "host_relation", "biz", "set",
                                                                       "module")}},
        "bus": {"url": URL, "exchange": f"bench-{tag}", "queue_prefix": f"bench-{tag}"},
        "sinks": {SINK: {"kind": "mirror", "url": f"sqlite:///{tmp}/mirror-{tag}.db", **sink}},
    })


def baseline_queue(config: Config) -> str:
    return f"{config.bus.queue_prefix}.baseline.host"


async def preload(config: Config, events: Sequence[Event], window: int) -> float:
    """rwatch's topology plus the baseline's twin queue, both filled by one confirmed publish of ``events``."""
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare_topology(channel, config)
        twin = await channel.declare_queue(baseline_queue(config), durable=True,
                                           arguments=queue_arguments(config, SINK))
        await twin.bind(exchange, routing_key="cmdb.host.*")
        sem = asyncio.Semaphore(window)

        async def one(event: Event) -> None:
            try:
                message = aio_pika.Message(event.to_json(), content_type="application/json",
                                           delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                           message_id=uuid.uuid4().hex, headers={"x-event-id": event.id})
                await exchange.publish(message, event.routing_key, mandatory=True, timeout=60)
            finally:
                sem.release()

        t0 = time.perf_counter()
        tasks = []
        for event in events:
            await sem.acquire()
            tasks.append(asyncio.create_task(one(event)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def queue_depth(name: str) -> int:
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await conn.close()


async def delete_queues(config: Config, *names: str) -> None:
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await conn.close()


async def delete_topology(config: Config) -> None:
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        for name in (queue_name(config, SINK, "host"), baseline_queue(config), dead_queue_name(config, SINK)):
            await channel.queue_delete(name)
        await channel.exchange_delete(config.bus.exchange)
        await channel.exchange_delete(dlx_name(config))
    finally:
        await conn.close()


# --- the two consumers -------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    cpu: float  # CPU seconds of this process during the run
    events: int
    machine: float  # share of all CPUs busy (this process, the broker, others)
    gc: float  # seconds in the cyclic garbage collector
    batches: list[int]  # batch sizes the sink saw (rwatch only)

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seconds": round(self.seconds, 3), "events_per_s": round(self.rate, 1),
            "cpu_us_per_event": round(self.cpu / self.events * 1e6, 1),
            "process_cores": round(self.cpu / self.seconds, 2), "machine_busy": round(self.machine, 2),
            "gc_share_of_cpu": round(self.gc / self.cpu, 3) if self.cpu else 0.0,
        }
        if self.batches:
            out["batches"] = len(self.batches)
            out["mean_batch"] = round(statistics.fmean(self.batches), 1)
            out["median_batch"] = statistics.median(self.batches)
        return out


class CountingMirror(MirrorSink):
    """The mirror sink, noting each batch it committed, so the drain's end is known to the event."""

    def __init__(self, *args: Any, expect: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.applied = 0
        self.expect = expect
        self.done = asyncio.Event()

    async def apply(self, events: Sequence[Event]) -> None:
        await super().apply(events)
        self.batches.append(len(events))
        self.applied += len(events)
        if self.applied >= self.expect:
            self.done.set()


def check_mirror(path: Path, events: Sequence[Event]) -> None:
    """Every host of the drain is in the mirror, live, at its event's version (read-only, sqlite3)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = {key: (vs, vi, deleted) for key, vs, vi, deleted in
                db.execute("SELECT key, version_s, version_i, deleted FROM rwatch_objects WHERE resource = 'host'")}
    if len(rows) != len(events):
        raise RuntimeError(f"the mirror holds {len(rows)} hosts, expected {len(events)}")
    wrong = [e.key for e in events if rows.get(e.key) != (e.version[0], e.version[1], 0)]
    if wrong:
        raise RuntimeError(f"{len(wrong)} hosts are not at their event's version, e.g. {wrong[:3]}")


async def rwatch_drain(config: Config, events: Sequence[Event]) -> Run:
    n = len(events)
    sink = CountingMirror(SINK, config.sinks[SINK], expect=n)  # type: ignore[arg-type]
    await sink.open()  # set-up (schema), not timed: run_async opens sinks before the consumers start
    stop = asyncio.Event()
    group = ConsumerGroup(config, {SINK: sink}, stop, name=f"bench {config.bus.exchange}")
    try:
        g0, m0, c0, t0 = GC.total, machine_jiffies(), time.process_time(), time.perf_counter()
        task = asyncio.create_task(group.run(), name="bench-consumers")
        try:
            async with asyncio.timeout(60 + n / 200):  # far beyond any healthy drain: fail, never hang
                await sink.done.wait()
            seconds, cpu, m1 = time.perf_counter() - t0, time.process_time() - c0, machine_jiffies()
            gc_seconds = GC.total - g0
        finally:
            stop.set()  # the consumer acknowledges the batch in hand and closes
            await task
    finally:
        await sink.close()
    depth = await queue_depth(queue_name(config, SINK, "host"))
    if depth:
        raise RuntimeError(f"rwatch's queue still holds {depth} messages after the drain")
    database = config.sinks[SINK].url.get_secret_value().removeprefix("sqlite:///")  # type: ignore[union-attr]
    check_mirror(Path(database), events)
    return Run(seconds, cpu, n, (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), gc_seconds, sink.batches)


async def baseline_drain(config: Config, n: int) -> Run:
    """The simplest correct consumer: same prefetch, consume, ack each message; no sink work."""
    name = baseline_queue(config)
    g0, m0, c0, t0 = GC.total, machine_jiffies(), time.process_time(), time.perf_counter()
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=config.bus.prefetch)
        queue = await channel.get_queue(name, ensure=False)
        got = 0
        async with asyncio.timeout(60 + n / 200), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                got += 1
                if got == n:
                    break
        seconds, cpu, m1 = time.perf_counter() - t0, time.process_time() - c0, machine_jiffies()
        gc_seconds = GC.total - g0
    finally:
        await conn.close()
    depth = await queue_depth(name)
    if depth:
        raise RuntimeError(f"the baseline's queue still holds {depth} messages after the drain")
    return Run(seconds, cpu, n, (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), gc_seconds, [])


# --- main ------------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "amqp": URL.split("@")[-1],
                    "sqlite": sqlite3.sqlite_version},
        "params": {"events": args.events, "rounds": args.rounds, "batch_wait": args.batch_wait,
                   "extra_batch_wait": args.extra_batch_wait},
    }
    before = await busy_fraction(1.0)
    result["machine"]["busy_before_start"] = round(before, 2)
    if before > 0.2:
        print(f"warning: the machine is {before:.0%} busy before the bench starts; numbers will be noisy",
              file=sys.stderr)
    events = make_events(args.events)
    gc.collect()
    gc.freeze()  # as `rwatch run` does after start-up; the events above are start-up data here
    sink_settings: dict[str, Any] = {} if args.batch_wait is None else {"batch_wait": args.batch_wait}
    live: list[Config] = []
    with tempfile.TemporaryDirectory(prefix="rwatch-bench-apply-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            rounds = []
            prefetch = batch_wait = None
            for r in range(args.rounds):
                config = bench_config(f"{tag}-r{r}", tmp, **sink_settings)
                live.append(config)
                prefetch, batch_wait = config.bus.prefetch, config.sinks[SINK].batch_wait  # type: ignore[union-attr]
                loaded = await preload(config, events, config.bus.publish_window)
                await quiesce()
                order = ("baseline", "rwatch") if r % 2 == 0 else ("rwatch", "baseline")
                runs: dict[str, Run] = {}
                for side in order:
                    if side == "rwatch":
                        runs[side] = await rwatch_drain(config, events)
                    else:
                        runs[side] = await baseline_drain(config, len(events))
                    await quiesce()
                await delete_topology(config)
                live.remove(config)
                w, b = runs["rwatch"], runs["baseline"]
                rounds.append({"order": list(order), "preload_s": round(loaded, 1), "rwatch": w.to_json(),
                               "baseline": b.to_json(), "ratio": ratio(w.rate, b.rate),
                               "cpu_ratio": ratio(w.cpu / w.events, b.cpu / b.events)})
                print(f"round {r}: rwatch {w.rate:.0f}/s (mean batch {statistics.fmean(w.batches):.0f}, "
                      f"{w.cpu / w.seconds:.2f} cores), baseline {b.rate:.0f}/s ({b.cpu / b.seconds:.2f} cores), "
                      f"ratio {w.rate / b.rate:.2f} (pre-load {loaded:.1f} s)", file=sys.stderr)
            med = statistics.median
            result["drain"] = {
                "events": args.events, "prefetch": prefetch, "batch_wait": batch_wait, "rounds": rounds,
                "median_ratio": med(x["ratio"] for x in rounds),
                "median_cpu_ratio": med(x["cpu_ratio"] for x in rounds),
            }
            for side in ("rwatch", "baseline"):
                for key in ("events_per_s", "cpu_us_per_event", "gc_share_of_cpu", "process_cores", "machine_busy"):
                    result["drain"][f"median_{side}_{key}"] = med(x[side][key] for x in rounds)
            result["drain"]["median_rwatch_mean_batch"] = med(x["rwatch"]["mean_batch"] for x in rounds)
            for wait in args.extra_batch_wait:
                # One more drain with another batch_wait, against this run's median baseline.
                config = bench_config(f"{tag}-w{len(result.get('extra', []))}", tmp, batch_wait=wait)
                live.append(config)
                await preload(config, events, config.bus.publish_window)
                await delete_queues(config, baseline_queue(config))
                await quiesce()
                run = await rwatch_drain(config, events)
                await delete_topology(config)
                live.remove(config)
                await quiesce()
                result.setdefault("extra", []).append({
                    "batch_wait": wait, **run.to_json(),
                    "ratio": ratio(run.rate, result["drain"]["median_baseline_events_per_s"])})
                print(f"batch_wait {wait}: rwatch {run.rate:.0f}/s", file=sys.stderr)
        finally:
            for config in list(live):
                with contextlib.suppress(Exception):
                    await delete_topology(config)
    gc.unfreeze()
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    d = result["drain"]
    lines = [
        f"Drain of {d['events']} host events into the SQLite mirror (prefetch {d['prefetch']}, batch_wait "
        f"{d['batch_wait'] * 1000:g} ms, median of {len(d['rounds'])} rounds)",
        f"{'':44} {'events/s':>9} {'CPU us/event':>13} {'of it GC':>9} {'process cores':>14} {'machine busy':>13}",
        *(f"{label:44} {d[f'median_{side}_events_per_s']:>9.0f} {d[f'median_{side}_cpu_us_per_event']:>13.1f} "
          f"{d[f'median_{side}_gc_share_of_cpu']:>9.0%} {d[f'median_{side}_process_cores']:>14.2f} "
          f"{d[f'median_{side}_machine_busy']:>13.0%}"
          for side, label in (("rwatch", "rwatch ConsumerGroup -> MirrorSink (SQLite)"),
                              ("baseline", "baseline: aio-pika consume + ack, no sink"))),
        f"ratio rwatch/baseline: rate {d['median_ratio']:.2f} (goal >= 0.80), "
        f"CPU per event {d['median_cpu_ratio']:.2f}",
        "rounds: " + ", ".join(f"{x['ratio']:.2f}" for x in d["rounds"])
        + f"; rwatch's mean batch {d['median_rwatch_mean_batch']:.0f} events",
    ]
    for x in result.get("extra", []):
        lines.append(f"with batch_wait = {x['batch_wait'] * 1000:g} ms (one drain): {x['events_per_s']:.0f} events/s, "
                     f"mean batch {x['mean_batch']:.0f}, ratio {x['ratio']:.2f}")
    lines.append(f"\n(total {result['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events pre-loaded per queue")
    parser.add_argument("--rounds", type=int, default=3, help="rwatch/baseline pairs, order alternating")
    parser.add_argument("--batch-wait", type=float, default=None,
                        help="sinks.mirror.batch_wait for the rounds (default: rwatch's default)")
    parser.add_argument("--extra-batch-wait", type=float, action="append", default=[],
                        help="also one drain with this batch_wait (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_bench(parse_args, main, report)
