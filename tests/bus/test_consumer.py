"""Consumers against the real RabbitMQ: batching, ack after apply, retries, isolation, dead letters, replay.

The sink here is a recording double of the Sink protocol: the consumer's rules are under test, and a
double lets each test decide what the sink answers. The real sinks have their own suites.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aio_pika
import pytest
from prometheus_client import REGISTRY

from rwatch.bus.amqp import AmqpBus
from rwatch.bus.consumer import ConsumerGroup
from rwatch.bus.dlq import list_dead, replay
from rwatch.bus.topology import dead_queue_name, dlx_name, queue_name
from rwatch.config import Config
from rwatch.errors import BusError, SinkRejected, SinkUnavailable
from rwatch.events import Event, ResyncMark
from tests.chaos.proxy import Proxy
from tests.sinks.doubles import (  # noqa: F401 - fast_backoff is an autouse fixture
    RecordingSink,
    applied_ids,
    event,
    failing_with,
    fast_backoff,
    ids,
    isolations,
    mark,
    swept_total,
)

pytestmark = pytest.mark.amqp


def make_config(url: str, unique: str, **sink: Any) -> Config:
    return Config.model_validate({
        "bus": {"url": url, "exchange": f"c-{unique}", "queue_prefix": f"c-{unique}", "prefetch": 64},
        "watch": {"resources": {"process": {"enabled": True}}},
        "sinks": {"rec": {"kind": "jsonl", "resources": ["host", "process"], "batch_max": 50,
                          "batch_wait": 0.02, **sink}},
    })


@pytest.fixture
async def config(amqp_url: str, unique: str) -> AsyncIterator[Config]:
    cfg = make_config(amqp_url, unique)
    yield cfg
    await delete_queues(amqp_url, cfg)


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
        await delete_queues(amqp_url, config)


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


async def test_a_sink_that_never_returns_is_abandoned_after_the_stop_grace_and_redelivered(
    amqp_url: str, unique: str
) -> None:
    """Invariant 6: a batch in hand whose apply hangs cannot hold the stop past ``run.stop_grace``; the broker
    keeps it unacknowledged and delivers it again to the next consumer (invariant 1)."""
    config = make_config(amqp_url, unique)
    config.run.shutdown_timeout = 2.0  # stop_grace 1 s
    sink, hung = RecordingSink(), asyncio.Event()

    async def never(events: Sequence[Event]) -> None:
        hung.set()
        await asyncio.Event().wait()

    sink.apply = never  # type: ignore[method-assign]
    try:
        await publish(config, [event(i) for i in range(5)])
        stop = asyncio.Event()
        task = asyncio.create_task(ConsumerGroup(config, {"rec": sink}, stop).run())  # type: ignore[dict-item]
        await asyncio.wait_for(hung.wait(), 30)
        stop.set()
        await asyncio.wait_for(task, config.run.stop_grace + 2 * config.run.close_timeout + 1)
        del sink.apply  # the class's recording apply again
        async with consuming(config, sink):
            await sink.wait(lambda: len(sink.applied) >= 5)
        assert [e.data["n"] for e in sink.applied] == list(range(5))
    finally:
        await delete_queues(amqp_url, config)


async def test_a_stop_while_the_broker_answers_nothing_ends_within_the_grace(amqp_url: str, unique: str) -> None:
    """Invariant 6: consumers connecting (or declaring) through a partition TCP does not notice — the chaos
    suite's seed 30 — are abandoned after ``run.stop_grace`` instead of waiting for the broker for ever."""
    async with Proxy.before("amqp", amqp_url) as proxy:
        config = make_config(proxy.via(amqp_url), unique)
        config.run.shutdown_timeout = 2.0
        proxy.stall()
        stop = asyncio.Event()
        task = asyncio.create_task(ConsumerGroup(config, {"rec": RecordingSink()}, stop).run())  # type: ignore[dict-item]
        for _ in range(200):  # the group is connecting: its connection reached the proxy
            if proxy.counts["connections"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the consumers never connected")
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, config.run.stop_grace + 2 * config.run.close_timeout + 1)


async def delete_queues(amqp_url: str, cfg: Config) -> None:
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        channel = await conn.channel()
        for res in ("host", "process"):
            await channel.queue_delete(queue_name(cfg, "rec", res))
        await channel.queue_delete(dead_queue_name(cfg, "rec"))
        await channel.exchange_delete(cfg.bus.exchange)
        await channel.exchange_delete(dlx_name(cfg))


async def test_a_mark_through_the_broker_is_swept_in_its_place(config: Config) -> None:
    sink = RecordingSink()
    sink.on_sweep = lambda m: 2
    before = swept_total()
    events = [event(i) for i in range(10)]
    end = mark()
    await publish(config, [*events[:6], end, *events[6:]])
    async with consuming(config, sink):
        await sink.wait(lambda: len(sink.applied) >= 10)
    flat = [(kind, i) for kind, batch in sink.calls for i in batch]
    assert flat == [("apply", e.id) for e in events[:6]] + [("sweep", end.id)] + [("apply", e.id) for e in events[6:]]
    assert swept_total() == before + 2
    assert await queue_depth(config, queue_name(config, "rec", "host")) == 0


async def test_a_refused_mark_goes_to_the_dead_letter_queue_and_replays(config: Config) -> None:
    sink = RecordingSink()
    end = mark()

    def refuse(m: ResyncMark) -> int:
        raise SinkRejected("mark refused", event_ids=(m.id,), status=422)

    sink.on_sweep = refuse
    await publish(config, [event(1), end, event(2)])
    async with consuming(config, sink):
        await sink.wait(lambda: len(sink.applied) >= 2)
        dead = await list_dead(config, "rec")
        assert [(d.event_id, d.resource, d.action, d.reason) for d in dead] == [(end.id, "host", "resync",
                                                                                "mark refused")]
        sink.on_sweep = lambda m: 1
        assert await replay(config, sink="rec") == 1
        await sink.wait(lambda: ("sweep", [end.id]) in sink.calls)
    assert await list_dead(config) == []


# --- through the broker: a held lone poison grows with what is delivered meanwhile; a crash is counted -----------


async def test_a_lone_poison_in_the_queue_goes_once_later_deliveries_prove_the_sink_up(amqp_url: str,
                                                                                       unique: str) -> None:
    config = make_config(amqp_url, unique, max_attempts=2, retry_backoff="1ms", retry_backoff_max="5ms")
    sink = RecordingSink()
    poison = event(1, key="a")
    sink.refuse = failing_with(sink, poison)
    held = isolations("held")
    try:
        await publish(config, [poison])
        async with consuming(config, sink):
            # Alone in its queue it cannot be told from a sink that is down: held, not dead-lettered.
            await sink.wait(lambda: isolations("held") >= held + 3)
            assert await list_dead(config) == []
            later = [event(i, key=f"k{i}") for i in range(2, 6)]
            await publish(config, later)  # delivered while it is held: the batch grows, they apply
            await sink.wait(lambda: len(sink.applied) == 4)
            for _ in range(100):
                dead = await list_dead(config)
                if dead:
                    break
                await asyncio.sleep(0.05)
        assert [(d.event_id, d.reason, d.attempts) for d in dead] == [
            (poison.id, "poison: HTTP 500 Internal Server Error", dead[0].attempts)]
        assert dead[0].attempts is not None and dead[0].attempts >= 6
        assert applied_ids(sink) == ids(*later)
        assert await queue_depth(config, queue_name(config, "rec", "host")) == 0
    finally:
        await delete_queues(amqp_url, config)


async def test_a_message_that_crashes_the_sink_is_dead_lettered_by_the_broker_and_the_rest_are_not_charged(
    amqp_url: str, unique: str
) -> None:
    config = make_config(amqp_url, unique)
    config.bus.delivery_limit = 2
    sink = RecordingSink()
    events = [event(i, key=f"k{i}") for i in range(40)]
    crasher = events[17]
    deliveries = 0

    def buggy(batch: Sequence[Event]) -> None:
        nonlocal deliveries
        if [e.id for e in batch] == [crasher.id]:
            deliveries += 1  # it crashes alone once per delivery
        if crasher.id in {e.id for e in batch}:
            raise KeyError("bk_host_innerip")

    sink.refuse = buggy
    crashes = REGISTRY.get_sample_value("rwatch_apply_crashes_total", {"sink": "rec", "resource": "host"}) or 0.0
    try:
        await publish(config, events)
        async with consuming(config, sink):
            await sink.wait(lambda: len(sink.applied) == 39)
            dead: list[Any] = []
            for _ in range(200):
                dead = await list_dead(config)
                if dead:
                    break
                await asyncio.sleep(0.05)
            more = [event(i, key=f"k{i}") for i in range(40, 45)]
            await publish(config, more)  # the queue moved on
            await sink.wait(lambda: len(sink.applied) == 44)
        # Rejected on each delivery, counted by the quorum queue, dead-lettered past x-delivery-limit redeliveries.
        assert [(d.event_id, d.reason, d.attempts) for d in dead] == [(crasher.id, "broker: delivery_limit", 3)]
        assert deliveries == 3
        assert (REGISTRY.get_sample_value("rwatch_apply_crashes_total", {"sink": "rec", "resource": "host"})
                or 0.0) == crashes + 3
        # The innocent messages of the crashing batches were acknowledged, never returned: each applied once.
        assert sorted(applied_ids(sink)) == sorted(ids(*events[:17], *events[18:], *more))
        assert len(applied_ids(sink)) == 44
        assert await queue_depth(config, queue_name(config, "rec", "host")) == 0
    finally:
        await delete_queues(amqp_url, config)


async def test_a_connection_that_closes_as_the_consumers_open_their_channels_is_lost_not_a_crash(
    config: Config,
) -> None:
    """Chaos seed 12 (amqp_reset): the broker's connection went between the session's declare and a consumer's
    ``connection.channel()``, before aio-pika ran the close callback that tells the group. aio-pika answers with
    a bare ``RuntimeError("... closed")``; that is broker trouble (``BusError``: the next session after a pause),
    never a crash of the consumers' task."""
    connection = await aio_pika.connect(config.bus.url.get_secret_value())
    try:
        await connection.transport.connection.close()  # closed under aio-pika: its close callbacks have not run
        group = ConsumerGroup(config, {"rec": RecordingSink()}, asyncio.Event())  # type: ignore[dict-item]
        with pytest.raises(BusError, match="closed under a consumer"):
            await group._run_until_lost(connection, asyncio.Event())
    finally:
        await connection.close()
