"""Benchmark: mirror sink apply throughput in batches of 500, against a baseline from the same run.

Run (PostgreSQL at RWATCH_TEST_PG_URL or postgresql://postgres@127.0.0.1:5432/test; a scratch database is
created and dropped):

    python bench/mirror_apply.py [--events 50000] [--batch 500] [--rounds 3]

For each backend (a SQLite file with WAL + synchronous=FULL, and PostgreSQL): ``--events`` host events applied
through ``MirrorSink.apply`` in batches of ``--batch``, three passes: creates into an empty table, updates of
every key (the fenced upsert changes each row), and a redelivery of the updates (every row fenced off).
Baseline: the same rows as a plain ``executemany`` INSERT (no conflict clause, no fence, no collapsing) into
a table of the same shape, one transaction per batch, same engine. Prints events/s and apply/baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from typing import Any

import asyncpg
from sqlalchemy import MetaData, Table

from rwatch.config import MirrorSinkConfig, SecretUrl
from rwatch.events import Event
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.mirror_schema import objects_table

PG_URL = os.environ.get("RWATCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
baseline_table = objects_table.to_metadata(MetaData(), name="rwatch_bench_baseline")


def make_events(n: int, sec: int, action: str) -> list[Event]:
    return [
        Event(id=f"{sec}-{k}", resource="host", action=action, key=str(k), version=(sec, k % 7),  # type: ignore[arg-type]
              occurred_at="2024-11-19T00:00:00Z", observed_at="2024-11-19T00:00:00Z",
              data={"bk_host_id": k, "bk_host_innerip": f"10.{k // 65536}.{k // 256 % 256}.{k % 256}",
                    "bk_cloud_id": 0, "bk_host_name": f"host-{k}", "bk_os_type": "1", "operator": "ops",
                    "bk_agent_id": uuid.UUID(int=k).hex})
        for k in range(n)
    ]


async def timed_applies(sink: MirrorSink, events: list[Event], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(events), batch):
        await sink.apply(events[i:i + batch])
    return len(events) / (time.perf_counter() - start)


async def timed_baseline(sink: MirrorSink, table: Table, events: list[Event], batch: int) -> float:
    engine = sink._engine
    assert engine is not None
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: table.drop(c, checkfirst=True))
        await conn.run_sync(lambda c: table.create(c))
    start = time.perf_counter()
    for i in range(0, len(events), batch):
        rows: list[dict[str, Any]] = [
            {"tenant": e.tenant, "resource": e.resource, "key": e.key, "version_s": e.version[0],
             "version_i": e.version[1], "deleted": False, "data": e.data, "event_id": e.id, "updated_at": 0.0}
            for e in events[i:i + batch]
        ]
        async with engine.connect() as conn:
            conn = await conn.execution_options(rwatch_write=True)
            async with conn.begin():
                await conn.execute(table.insert(), rows)
    return len(events) / (time.perf_counter() - start)


async def bench(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    creates = make_events(args.events, 1_700_000_000, "create")
    updates = make_events(args.events, 1_700_000_100, "update")
    out: dict[str, list[float]] = {"create": [], "update": [], "redeliver": [], "baseline": []}
    for _ in range(args.rounds):
        async with MirrorSink("bench", MirrorSinkConfig(kind="mirror", url=SecretUrl(url))) as sink:
            engine = sink._engine
            assert engine is not None
            async with engine.begin() as conn:
                await conn.execute(objects_table.delete())
            out["baseline"].append(await timed_baseline(sink, baseline_table, creates, args.batch))
            out["create"].append(await timed_applies(sink, creates, args.batch))
            out["update"].append(await timed_applies(sink, updates, args.batch))
            out["redeliver"].append(await timed_applies(sink, updates, args.batch))
            assert len(await sink.objects("host")) == args.events
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = await bench(f"sqlite:///{tmp}/mirror.db", args)
    name = f"rwatch_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = PG_URL.rpartition("/")
        results["postgresql"] = await bench(f"{base}/{name}", args)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"{args.events} events, batches of {args.batch}, median of {args.rounds} rounds (events/s)")
    print(f"{'backend':<11} {'create':>9} {'update':>9} {'redeliver':>9} {'baseline':>9} {'create/baseline':>16}")
    for backend, r in results.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        print(f"{backend:<11} {med['create']:>9.0f} {med['update']:>9.0f} {med['redeliver']:>9.0f} "
              f"{med['baseline']:>9.0f} {med['create'] / med['baseline']:>16.2f}")


if __name__ == "__main__":
    asyncio.run(main())
