"""Probe: confirmed publishes written in bulk versus one ``basic_publish`` task per message (what AmqpBus does).

Run: python bench/_bulk_publish_probe.py [N] [ROUNDS]. Needs RabbitMQ at RWATCH_TEST_AMQP_URL (default local guest).

"task": a task per message awaiting aiormq's ``basic_publish`` (a lock, a timeout, a frame write and a socket
send per message), ``window`` in flight. "bulk": the messages that fit the free window are registered with
the channel (delivery tag, confirmation future, message id for returns) and marshalled into one frame
write under one hold of the channel lock. Both publish to a quorum queue with confirms and ``mandatory``.
The bulk side reaches into aiormq's channel state (``confirmations``, ``delivery_tag``,
``message_id_delivery_tag``, ``write_queue``, ``_split_body``): this is a measurement, not a design.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

URL = os.environ.get("RWATCH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
WINDOW = 256
ROUTING_KEY = "cmdb.host.update"
_Properties = aiormq.spec.Basic.Properties


def properties(i: int) -> aiormq.spec.Basic.Properties:
    headers = {"x-event-id": f"{i:064x}", "x-resource": "host", "x-action": "update"}
    return _Properties(content_type="application/json", delivery_mode=2, headers=headers, message_id=uuid.uuid4().hex)


async def per_task(channel: aiormq.Channel, exchange: str, bodies: list[bytes]) -> None:
    window = asyncio.Semaphore(WINDOW)

    async def send(i: int) -> None:
        try:
            result = await channel.basic_publish(bodies[i], exchange=exchange, routing_key=ROUTING_KEY,
                                                 properties=properties(i), mandatory=True, timeout=30, wait=False)
            if type(result) is not aiormq.spec.Basic.Ack:
                raise RuntimeError(f"not confirmed: {result!r}")
        finally:
            window.release()

    tasks = []
    for i in range(len(bodies)):
        await window.acquire()
        tasks.append(asyncio.create_task(send(i)))
    await asyncio.gather(*tasks)


async def bulk(channel: aiormq.Channel, exchange: str, bodies: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    freed = asyncio.Event()
    futures: list[asyncio.Future[object]] = []
    inflight = 0

    def confirmed(_: asyncio.Future[object]) -> None:
        nonlocal inflight
        inflight -= 1
        freed.set()

    def forget(message_id: str, tag: int) -> Callable[[asyncio.Future[object]], None]:
        def drop(_: asyncio.Future[object]) -> None:
            if channel.message_id_delivery_tag.get(message_id) == tag:
                channel.message_id_delivery_tag.pop(message_id)
        return drop

    publish = spec.Basic.Publish(exchange=exchange, routing_key=ROUTING_KEY, mandatory=True)
    i, n = 0, len(bodies)
    while i < n:
        while inflight >= WINDOW:
            freed.clear()
            await freed.wait()
        chunk = min(WINDOW - inflight, n - i)
        frames: list[object] = []
        async with channel.lock:
            for j in range(i, i + chunk):
                props = properties(j)
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                future: asyncio.Future[object] = loop.create_future()
                channel.confirmations[tag] = future
                channel.message_id_delivery_tag[props.message_id] = tag
                future.add_done_callback(forget(props.message_id, tag))
                future.add_done_callback(confirmed)
                futures.append(future)
                frames += [publish, ContentHeader(properties=props, body_size=len(bodies[j])),
                           *channel._split_body(bodies[j])]
            await channel.write_queue.put(ChannelFrame.marshall(frames=frames, channel_number=channel.number))
        inflight += chunk
        i += chunk
    for result in await asyncio.gather(*futures):
        if type(result) is not aiormq.spec.Basic.Ack:
            raise RuntimeError(f"not confirmed: {result!r}")


async def measure(side: Callable[[aiormq.Channel, str, list[bytes]], Awaitable[None]],
                  bodies: list[bytes]) -> tuple[float, float]:
    name = f"probe-bulk-{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"{name}.q", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "cmdb.host.*")
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        c0, t0 = time.process_time(), time.perf_counter()
        await side(raw, name, bodies)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        depth = (await channel.declare_queue(f"{name}.q", passive=True)).declaration_result.message_count
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
    finally:
        await conn.close()
    if depth != len(bodies):
        raise RuntimeError(f"queue holds {depth}, expected {len(bodies)}")
    return len(bodies) / seconds, cpu / len(bodies) * 1e6


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    bodies = [b'{"data": "' + b"x" * 600 + b'", "n": %d}' % i for i in range(n)]  # about a host event's size
    sides = {"task": per_task, "bulk": bulk}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in ("task", "bulk") if r % 2 == 0 else ("bulk", "task"):
            rate, cpu = await measure(sides[name], bodies)
            results[name].append((rate, cpu))
            print(f"round {r} {name}: {rate:7.0f} msg/s, {cpu:5.1f} us CPU/msg")
            await asyncio.sleep(2)  # the broker cleans up the deleted queue
    task, blk = results["task"], results["bulk"]
    ratios = [b[0] / t[0] for t, b in zip(task, blk, strict=True)]
    cpu = [t[1] / b[1] for t, b in zip(task, blk, strict=True)]
    print(f"median over {rounds} rounds: rate bulk/task {statistics.median(ratios):.2f}, "
          f"CPU per message task/bulk {statistics.median(cpu):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
