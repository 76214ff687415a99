"""Probe: AmqpBus.publish throughput against a plain aio-pika confirmed-publish loop (same window, bodies).

Run: python bench/_bus_probe.py [N] [WINDOW]. Needs RabbitMQ at RWATCH_TEST_AMQP_URL (default local guest).
Each side publishes N events to its own exchange with a bound quorum queue; prints the wall-clock rate
(bound by the broker's quorum fsyncs, so noisy on a shared broker) and this process's CPU time per message
(the client-side cost the bus adds), and the bus/plain ratios of both.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid

import aio_pika

from rwatch.bus.amqp import AmqpBus
from rwatch.config import Config
from rwatch.events import Event, iso_utc, watch_event_id

URL = os.environ.get("RWATCH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def make_events(n: int) -> list[Event]:
    now = time.time()
    return [
        Event(id=watch_event_id("host", f"c{i}"), resource="host", action="update", key=str(i),
              version=(int(now), i), occurred_at=iso_utc(now), observed_at=iso_utc(now), cursor=f"c{i}",
              data={"bk_host_id": i, "bk_host_innerip": f"10.0.{i // 256 % 256}.{i % 256}", "bk_cloud_id": 0})
        for i in range(n)
    ]


async def plain_loop(events: list[Event], window: int, exchange_name: str) -> tuple[float, float]:
    conn = await aio_pika.connect(URL)
    ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
    ex = await ch.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
    q = await ch.declare_queue(f"{exchange_name}.q", durable=True, arguments={"x-queue-type": "quorum"})
    await q.bind(ex, "cmdb.host.*")
    bodies = [(e.to_json(), e.routing_key, e.id) for e in events]
    sem = asyncio.Semaphore(window)

    async def one(body: bytes, rk: str, eid: str) -> None:
        try:
            await ex.publish(aio_pika.Message(body, content_type="application/json",
                                              delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                              message_id=uuid.uuid4().hex, headers={"x-event-id": eid}),
                             rk, mandatory=True, timeout=30)
        finally:
            sem.release()

    t0, c0 = time.perf_counter(), time.process_time()
    tasks = []
    for body, rk, eid in bodies:
        await sem.acquire()
        tasks.append(asyncio.create_task(one(body, rk, eid)))
    await asyncio.gather(*tasks)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    await q.delete(if_unused=False, if_empty=False)
    await ex.delete()
    await conn.close()
    return took, cpu


async def bus_publish(events: list[Event], window: int, name: str, batch: int) -> tuple[float, float]:
    config = Config.model_validate({
        "bus": {"url": URL, "exchange": name, "queue_prefix": name, "publish_window": window},
        "sinks": {"s": {"kind": "jsonl", "resources": ["host"]}},
    })
    bus = AmqpBus(config, connection_name=f"probe-{name}")
    await bus.start()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(events), batch):
        await bus.publish(events[i:i + batch])
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    await bus.close()
    conn = await aio_pika.connect(URL)
    ch = await conn.channel()
    for q in (f"{name}.s.host", f"{name}.s.dead"):
        await ch.queue_delete(q)
    for ex in (name, f"{name}.dlx"):
        await ch.exchange_delete(ex)
    await conn.close()
    return took, cpu


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    events = make_events(n)
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    rate_ratios: list[float] = []
    cpu_ratios: list[float] = []
    for rnd in range(rounds):
        tag = uuid.uuid4().hex[:8]
        runs = {}
        # Alternate the order so that neither side always runs on a warmer (or busier) broker.
        order = ["plain", "bus"] if rnd % 2 == 0 else ["bus", "plain"]
        for side in order:
            if side == "plain":
                runs[side] = await plain_loop(events, window, f"probe-plain-{tag}")
            else:
                runs[side] = await bus_publish(events, window, f"probe-bus-{tag}", 500)
        (pw, pc), (bw, bc) = runs["plain"], runs["bus"]
        print(f"round {rnd}: plain {n / pw:7.0f} msg/s {pc / n * 1e6:5.1f} us CPU/msg | "
              f"bus (batches of 500) {n / bw:7.0f} msg/s {bc / n * 1e6:5.1f} us CPU/msg | "
              f"rate bus/plain {pw / bw:.2f}, CPU bus/plain {bc / pc:.2f}")
        rate_ratios.append(pw / bw)
        cpu_ratios.append(bc / pc)
    print(f"median over {rounds} rounds: rate bus/plain {statistics.median(rate_ratios):.2f}, "
          f"CPU per message bus/plain {statistics.median(cpu_ratios):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
