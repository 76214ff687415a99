"""Consumers against the real RabbitMQ: batching, ack after apply, retries, isolation, dead letters, replay.

The sink here is a recording double of the Sink protocol: the consumer's rules are under test, and a
double lets each test decide what the sink answers. The real sinks have their own suites.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aio_pika
import pytest

from rwatch.bus.amqp import AmqpBus, dead_queue_name, dlx_name, queue_name
from rwatch.config import Config
from rwatch.errors import SinkRejected, SinkUnavailable
from rwatch.events import Event, iso_utc, watch_event_id
from rwatch.sinks import consumer as consumer_module
from rwatch.sinks.consumer import ConsumerGroup
from rwatch.sinks.dlq import list_dead, replay

pytestmark = pytest.mark.amqp


def make_config(url: str, unique: str, **sink: Any) -> Config:
    return Config.model_validate({
        "bus": {"url": url, "exchange": f"c-{unique}", "queue_prefix": f"c-{unique}", "prefetch": 64},
        "watch": {"resources": {"process": {"enabled": True}}},
        "sinks": {"rec": {"kind": "jsonl", "resources": ["host", "process"], "batch_max": 50,
                          "batch_wait": 0.02, **sink}},
    })


def event(i: int, resource: str = "host", key: str | None = None) -> Event:
    cursor = f"cursor-{i}"
    return Event(id=watch_event_id(resource, cursor), resource=resource, action="update", key=key or str(i % 7),
                 version=(1_700_000_000 + i, 0), occurred_at=iso_utc(1_700_000_000 + i),
                 observed_at=iso_utc(1_700_000_000 + i), cursor=cursor, data={"n": i})


class RecordingSink:
    """Records what it applied; ``refuse`` decides, per batch, what to refuse or when to fail."""

    def __init__(self) -> None:
        self.name = "rec"
        self.batches: list[list[Event]] = []
        self.refuse: Callable[[Sequence[Event]], None] = lambda events: None
        self.changed = asyncio.Event()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, events: Sequence[Event]) -> None:
        self.refuse(events)
        self.batches.append(list(events))
        self.changed.set()

    @property
    def applied(self) -> list[Event]:
        return [e for batch in self.batches for e in batch]

    async def wait(self, done: Callable[[], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def config(amqp_url: str, unique: str) -> AsyncIterator[Config]:
    cfg = make_config(amqp_url, unique)
    yield cfg
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        for res in ("host", "process"):
            await channel.queue_delete(queue_name(cfg, "rec", res))
        await channel.queue_delete(dead_queue_name(cfg, "rec"))
        await channel.exchange_delete(cfg.bus.exchange)
        await channel.exchange_delete(dlx_name(cfg))


@contextlib.asynccontextmanager
async def consuming(config: Config, sink: RecordingSink) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    group = ConsumerGroup(config, {"rec": sink}, stop)  # type: ignore[dict-item]
    task = asyncio.create_task(group.run())
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def publish(config: Config, events: list[Event]) -> None:
    bus = AmqpBus(config)
    await bus.start()
    try:
        await bus.publish(events)
    finally:
        await bus.close()


async def queue_depth(config: Config, name: str) -> int:
    conn = await aio_pika.connect(config.bus.url.get_secret_value())
    async with conn:
        channel = await conn.channel()
        declared = await channel.declare_queue(name, passive=True)
        return declared.declaration_result.message_count or 0


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    original = consumer_module.HealthyResetWait
    monkeypatch.setattr(consumer_module, "HealthyResetWait",
                        lambda **_: original(initial=0.01, maximum=0.05))


async def test_batches_in_order_and_acknowledged_after_apply(config: Config) -> None:
    sink = RecordingSink()
    events = [event(i) for i in range(400)] + [event(i, "process") for i in range(100)]
    await publish(config, events)
    async with consuming(config, sink):
        await sink.wait(lambda: len(sink.applied) >= 500)
    assert [e.id for e in sink.applied if e.resource == "host"] == [e.id for e in events[:400]]
    assert [e.id for e in sink.applied if e.resource == "process"] == [e.id for e in events[400:]]
    assert all(len(b) <= 50 and len({e.resource for e in b}) == 1 for b in sink.batches)
    assert await queue_depth(config, queue_name(config, "rec", "host")) == 0


async def test_a_lone_event_is_applied_without_waiting_batch_wait(amqp_url: str, unique: str) -> None:
    config = make_config(amqp_url, f"{unique}-lone", batch_wait=5.0)
    sink = RecordingSink()
    try:
        async with consuming(config, sink):
            await asyncio.sleep(0.5)  # connected, consuming, idle
            started = asyncio.get_running_loop().time()
            await publish(config, [event(1)])
            await sink.wait(lambda: len(sink.applied) == 1, timeout=10)
            # The batch does not wait out batch_wait when nothing more arrives.
            assert asyncio.get_running_loop().time() - started < 2.5
            # A burst delivered together still goes in large batches, bounded by batch_max and the prefetch.
            await publish(config, [event(i) for i in range(2, 202)])
            await sink.wait(lambda: len(sink.applied) == 201)
        assert all(len(b) <= 50 for b in sink.batches)
        assert len(sink.batches) < 100
    finally:
        conn = await aio_pika.connect(amqp_url)
        async with conn:
            channel = await conn.channel()
            for res in ("host", "process"):
                await channel.queue_delete(queue_name(config, "rec", res))
            await channel.queue_delete(dead_queue_name(config, "rec"))
            await channel.exchange_delete(config.bus.exchange)
            await channel.exchange_delete(dlx_name(config))


async def test_transient_failures_hold_the_batch_until_it_applies(config: Config) -> None:
    sink = RecordingSink()
    failures = iter(range(3))

    def flaky(events: Sequence[Event]) -> None:
        if next(failures, None) is not None:
            raise SinkUnavailable("database restarting")

    sink.refuse = flaky
    events = [event(i) for i in range(60)]
    await publish(config, events)
    async with consuming(config, sink):
        await sink.wait(lambda: len(sink.applied) >= 60)
    assert [e.id for e in sink.applied] == [e.id for e in events]


async def test_refused_events_are_dead_lettered_with_the_reason_and_replayed(config: Config) -> None:
    sink = RecordingSink()
    poison = {event(13).id, event(31).id}

    def picky(events: Sequence[Event]) -> None:
        bad = tuple(e.id for e in events if e.id in poison)
        if bad and len(events) > 1:
            raise SinkRejected("400 from the endpoint")  # cannot say which: the consumer must find out
        if bad:
            raise SinkRejected("400 from the endpoint", event_ids=bad, status=400)

    sink.refuse = picky
    events = [event(i) for i in range(80)]
    await publish(config, events)
    async with consuming(config, sink):
        await sink.wait(lambda: len(sink.applied) >= 78)
        assert {e.id for e in sink.applied} == {e.id for e in events} - poison
        # Dead letters are confirmed before the batch is acknowledged: the queue holds both now.
        dead = await list_dead(config, "rec")
        assert {d.event_id for d in dead} == poison
        assert all(d.reason == "400 from the endpoint" and d.resource == "host" for d in dead)
        # Listing took nothing away.
        assert len(await list_dead(config)) == 2
        # The endpoint is fixed; replay puts them back and they apply.
        sink.refuse = lambda events: None
        assert await replay(config, sink="rec", resource="process") == 0
        assert await replay(config, sink="rec") == 2
        await sink.wait(lambda: poison <= {e.id for e in sink.applied})
    assert await list_dead(config) == []


async def test_malformed_messages_go_to_the_dead_letter_queue(config: Config) -> None:
    sink = RecordingSink()
    conn = await aio_pika.connect(config.bus.url.get_secret_value())
    await publish(config, [event(1)])  # declares the topology
    async with conn:
        channel = await conn.channel()
        await channel.default_exchange.publish(aio_pika.Message(b"{not json"),
                                               routing_key=queue_name(config, "rec", "host"))
        await channel.default_exchange.publish(aio_pika.Message(event(2, "process").to_json()),
                                               routing_key=queue_name(config, "rec", "host"))
    await publish(config, [event(3)])
    async with consuming(config, sink):
        await sink.wait(lambda: len(sink.applied) >= 2)
        dead = await list_dead(config)
    assert [e.id for e in sink.applied] == [event(1).id, event(3).id]
    reasons = sorted(d.reason for d in dead)
    assert len(reasons) == 2 and "not a valid rwatch event" in reasons[1] and "'process'" in reasons[0]


async def test_stop_while_the_sink_fails_leaves_the_batch_in_the_queue(config: Config) -> None:
    sink = RecordingSink()
    attempted = asyncio.Event()

    def down(events: Sequence[Event]) -> None:
        attempted.set()
        raise SinkUnavailable("down")

    sink.refuse = down
    await publish(config, [event(i) for i in range(10)])
    async with consuming(config, sink):
        await asyncio.wait_for(attempted.wait(), 30)
    # Not applied, not acknowledged: the broker has all ten back for the next consumer.
    assert await queue_depth(config, queue_name(config, "rec", "host")) == 10
    sink.refuse = lambda events: None
    async with consuming(config, sink):
        await sink.wait(lambda: len(sink.applied) >= 10)
