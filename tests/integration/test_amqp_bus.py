"""AmqpBus against the real RabbitMQ: topology, confirms, returns, nacks, lost connections.

Every test works in its own namespace (exchange and queue prefix from ``unique``), deletes what it
declared, and only ever closes its own connections (found by their client-provided name), because
other people's tests share the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client import REGISTRY

from rwatch.bus.amqp import AmqpBus
from rwatch.bus.topology import (
    dead_queue_name,
    declare_topology,
    dlx_name,
    queue_arguments,
    queue_name,
)
from rwatch.config import Config
from rwatch.errors import Stopping, TopologyConflict
from rwatch.events import Event, iso_utc, watch_event_id
from rwatch.retry import HealthyResetWait, Policy
from tests.chaos.proxy import Proxy
from tests.integration.harness import close_connections

pytestmark = pytest.mark.amqp

RESOURCES = {"mirror": ["host", "module"], "hooks": ["host"]}


def event(resource: str, n: int, action: str = "update") -> Event:
    return Event.model_validate({
        "id": watch_event_id(resource, f"c{n}"), "resource": resource, "action": action, "key": str(n),
        "version": (1_700_000_000 + n, n), "occurred_at": iso_utc(1_700_000_000 + n),
        "observed_at": iso_utc(1_700_000_000), "cursor": f"c{n}", "data": {"bk_host_id": n},
    })


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def make_config(url: str, unique: str, sinks: dict[str, list[str]] | None = None, **bus: Any) -> Config:
    sinks = RESOURCES if sinks is None else sinks
    return Config.model_validate({
        "bus": {"url": url, "exchange": f"t-{unique}", "queue_prefix": f"t-{unique}", "delivery_limit": 2,
                **bus},
        "watch": {"resources": {"module": {"enabled": True}}},
        "sinks": {name: {"kind": "jsonl", "resources": res} for name, res in sinks.items()},
    })


@pytest.fixture
async def channel(amqp_connection: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    ch = await amqp_connection.channel()
    yield ch
    if not ch.is_closed:
        await ch.close()


@pytest.fixture
async def cleanup(amqp_url: str, unique: str) -> AsyncIterator[list[str]]:
    """Queue names a test declared by hand; at the end these and the namespace's topology are deleted."""
    extra: list[str] = []
    yield extra
    config = make_config(amqp_url, unique)
    conn = await aio_pika.connect(amqp_url)
    try:
        ch = await conn.channel()
        names = [queue_name(config, s, r) for s, rs in RESOURCES.items() for r in rs]
        names += [dead_queue_name(config, s) for s in RESOURCES]
        for name in names + extra:
            await ch.queue_delete(name)
        for ex in (config.bus.exchange, dlx_name(config)):
            await ch.exchange_delete(ex)
    finally:
        await conn.close()


_NOTIFIERS: set[asyncio.Task[None]] = set()


class RetrySpy(HealthyResetWait):
    """The bus's wait with 1 ms pauses that lets a test await the n-th retry instead of sleeping."""

    retries = 0
    changed: asyncio.Condition | None = None

    def next_delay(self) -> float:
        cls = type(self)
        cls.retries += 1
        if cls.changed is not None:
            changed = cls.changed

            async def notify() -> None:
                async with changed:
                    changed.notify_all()

            task = asyncio.get_running_loop().create_task(notify())
            _NOTIFIERS.add(task)
            task.add_done_callback(_NOTIFIERS.discard)
        self.streak += 1
        return 0.001

    @classmethod
    async def wait_for(cls, n: int) -> None:
        assert cls.changed is not None
        async with cls.changed:
            await cls.changed.wait_for(lambda: cls.retries >= n)


class _SpyPolicy(Policy):
    def wait(self, **kwargs: Any) -> HealthyResetWait:
        return RetrySpy()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> type[RetrySpy]:
    monkeypatch.setattr(RetrySpy, "retries", 0)
    monkeypatch.setattr(RetrySpy, "changed", asyncio.Condition())
    monkeypatch.setattr(AmqpBus, "policy", _SpyPolicy("spy", 0.001, 0.001))
    return RetrySpy


def at_least(n: int) -> Callable[[list[AbstractIncomingMessage]], bool]:
    return lambda messages: len(messages) >= n


async def collect(queue: aio_pika.abc.AbstractQueue, done: Callable[[list[AbstractIncomingMessage]], bool],
                  ) -> list[AbstractIncomingMessage]:
    """Consume (auto-ack) until ``done(messages)``; the per-test timeout bounds a wait that never ends."""
    got: list[AbstractIncomingMessage] = []
    async with queue.iterator(no_ack=True) as it:
        if done(got):
            return got
        async for message in it:
            got.append(message)
            if done(got):
                break
    return got


async def test_topology_has_the_contract_arguments_and_bindings(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel
) -> None:
    config = make_config(amqp_url, unique)
    bus = AmqpBus(config, connection_name=f"rwatch-test-{unique}")
    await bus.start()
    assert bus.connected
    try:
        # Re-declaring with exactly the contract's arguments succeeds only if the broker holds the same ones
        # (it checks x-queue-type, x-single-active-consumer, x-delivery-limit and both DLX arguments).
        for sink, resources in RESOURCES.items():
            args = queue_arguments(config, sink)
            assert args == {
                "x-queue-type": "quorum", "x-single-active-consumer": True, "x-delivery-limit": 2,
                "x-dead-letter-exchange": f"t-{unique}.dlx",
                "x-dead-letter-routing-key": f"t-{unique}.{sink}.dead",
            }
            for resource in resources:
                await channel.declare_queue(f"t-{unique}.{sink}.{resource}", durable=True, arguments=args)
            quorum: dict[str, Any] = {"x-queue-type": "quorum"}
            await channel.declare_queue(f"t-{unique}.{sink}.dead", durable=True, arguments=quorum)
        await channel.declare_exchange(f"t-{unique}", aio_pika.ExchangeType.TOPIC, durable=True, passive=True)

        # Binding cmdb.<resource>.*: every action of a resource reaches exactly the sinks that take it.
        batch = [event("host", 1, "create"), event("module", 2, "delete"), event("host", 3, "update")]
        await bus.publish(batch)
        mirror_host = await channel.get_queue(f"t-{unique}.mirror.host")
        mirror_module = await channel.get_queue(f"t-{unique}.mirror.module")
        hooks_host = await channel.get_queue(f"t-{unique}.hooks.host")
        for queue, expected in ((mirror_host, [1, 3]), (mirror_module, [2]), (hooks_host, [1, 3])):
            got = await collect(queue, at_least(len(expected)))
            assert [json.loads(m.body)["data"]["bk_host_id"] for m in got] == expected

        # Delivery limit and DLX: rejected more than delivery_limit times, it lands in <prefix>.<sink>.dead.
        await bus.publish([event("module", 7)])
        deliveries = 0
        async with mirror_module.iterator() as it:
            async for message in it:
                deliveries += 1
                await message.reject(requeue=True)
                if deliveries > config.bus.delivery_limit:
                    break
        dead = await channel.get_queue(f"t-{unique}.mirror.dead")
        [dead_letter] = await collect(dead, at_least(1))
        assert dead_letter.headers["x-event-id"] == event("module", 7).id
        assert deliveries == config.bus.delivery_limit + 1

        # The DLX routes <prefix>.<sink>.dead to that sink's dead queue only.
        dlx = await channel.get_exchange(f"t-{unique}.dlx")
        await dlx.publish(aio_pika.Message(b"x"), routing_key=f"t-{unique}.hooks.dead")
        hooks_dead = await channel.get_queue(f"t-{unique}.hooks.dead")
        [direct] = await collect(hooks_dead, at_least(1))
        assert direct.body == b"x"
    finally:
        await bus.close()
    assert not bus.connected


async def test_declare_is_idempotent(cleanup: list[str], amqp_url: str, unique: str,
                                     channel: AbstractChannel) -> None:
    config = make_config(amqp_url, unique)
    await declare_topology(channel, config)
    exchange = await declare_topology(channel, config)
    assert exchange.name == f"t-{unique}"
    assert not channel.is_closed


async def test_conflicting_queue_arguments_raise_a_clear_error(
    cleanup: list[str], amqp_url: str, unique: str, amqp_connection: AbstractConnection
) -> None:
    config = make_config(amqp_url, unique)
    ch = await amqp_connection.channel()
    name = f"t-{unique}.mirror.module"
    differing = {**queue_arguments(config, "mirror"), "x-delivery-limit": 9}
    await ch.declare_queue(name, durable=True, arguments=differing)
    bus = AmqpBus(config, connection_name=f"rwatch-test-{unique}")
    with pytest.raises(TopologyConflict) as info:
        await bus.start()
    err = info.value
    assert err.extra["queue"] == name
    assert err.extra["argument"] == "x-delivery-limit"
    assert name in str(err)
    assert "x-delivery-limit" in str(err)
    assert not bus.connected
    await bus.close()


async def test_publish_delivers_in_order_with_the_contract_properties(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel
) -> None:
    config = make_config(amqp_url, unique, publish_window=16)
    bus = AmqpBus(config, connection_name=f"rwatch-test-{unique}")
    await bus.start()
    actions = ("create", "update", "delete")
    batch = [event("host" if n % 3 else "module", n, actions[n % 3]) for n in range(600)]
    before = metric("rwatch_events_published_total", resource="module", action="create")
    try:
        await bus.publish(batch[:100])
        await bus.publish(batch[100:])
    finally:
        await bus.close()
    assert metric("rwatch_events_published_total", resource="module", action="create") - before == 200

    for resource in ("host", "module"):
        expected = [e for e in batch if e.resource == resource]
        queue = await channel.get_queue(f"t-{unique}.mirror.{resource}")
        got = await collect(queue, at_least(len(expected)))
        # Queue order is stream order.
        assert [m.headers["x-event-id"] for m in got] == [e.id for e in expected]
        for message, sent in zip(got, expected, strict=True):
            assert message.body == sent.to_json()
            assert message.routing_key == sent.routing_key
            assert message.content_type == "application/json"
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.headers == {"x-event-id": sent.id, "x-resource": sent.resource,
                                       "x-action": sent.action}
            assert message.timestamp is not None
            assert int(message.timestamp.timestamp()) == sent.version[0]
            assert message.message_id is not None
            assert len(message.message_id) == 32
        assert len({m.message_id for m in got}) == len(got)


async def test_nacked_publish_is_not_durable_and_retries_until_stop(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel, spy: type[RetrySpy]
) -> None:
    # A queue that refuses everything: the broker nacks each publish routed to it.
    full = f"t-{unique}.full"
    cleanup.append(full)
    config = make_config(amqp_url, unique, sinks={})
    exchange = await declare_topology(channel, config)
    queue = await channel.declare_queue(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    await queue.bind(exchange, "cmdb.host.*")
    stop = asyncio.Event()
    bus = AmqpBus(config, stop=stop, connection_name=f"rwatch-test-{unique}")
    published = metric("rwatch_events_published_total", resource="host", action="update")
    nacks = metric("rwatch_publish_retries_total", reason="nack")

    task = asyncio.create_task(bus.publish([event("host", n) for n in range(5)]))
    await spy.wait_for(3)
    assert not task.done()
    stop.set()
    with pytest.raises(Stopping):
        await task
    await bus.close()
    assert metric("rwatch_events_published_total", resource="host", action="update") == published
    assert metric("rwatch_publish_retries_total", reason="nack") - nacks >= 3


async def test_unroutable_event_is_never_durable_until_a_queue_is_bound(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel, spy: type[RetrySpy]
) -> None:
    late = f"t-{unique}.late"
    cleanup.append(late)
    config = make_config(amqp_url, unique, sinks={"mirror": ["host"]})  # nothing takes module
    stop = asyncio.Event()
    bus = AmqpBus(config, stop=stop, connection_name=f"rwatch-test-{unique}")
    await bus.start()
    returned = metric("rwatch_publish_retries_total", reason="returned")
    batch = [event("host", 1), event("module", 2), event("host", 3)]

    task = asyncio.create_task(bus.publish(batch))
    await spy.wait_for(2)
    assert not task.done()
    assert metric("rwatch_publish_retries_total", reason="returned") - returned >= 2

    # Once something takes module events, the retry goes through and publish returns.
    queue = await channel.declare_queue(late, arguments={"x-queue-type": "quorum"}, durable=True)
    await queue.bind(f"t-{unique}", "cmdb.module.*")
    await task
    [message] = await collect(queue, at_least(1))
    assert message.headers["x-event-id"] == batch[1].id

    # And with stop set while still failing, an unroutable publish ends with Stopping.
    stop.set()
    with pytest.raises(Stopping):
        await bus.publish([event("biz", 4)])
    await bus.close()


async def test_publish_timeout_reconnects_and_republishes(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel, spy: type[RetrySpy]
) -> None:
    # A timeout far below a confirm's round trip: every publish times out until the test relaxes it.
    config = make_config(amqp_url, unique, sinks={"mirror": ["host"]}, publish_timeout=1e-6)
    bus = AmqpBus(config, connection_name=f"rwatch-test-{unique}")
    await bus.start()
    timeouts = metric("rwatch_publish_retries_total", reason="timeout")
    reconnects = metric("rwatch_bus_reconnects_total")
    batch = [event("host", i) for i in range(20)]
    task = asyncio.create_task(bus.publish(batch))
    await spy.wait_for(2)
    bus._timeout = 30.0
    await task
    await bus.close()
    assert metric("rwatch_publish_retries_total", reason="timeout") - timeouts >= 2
    assert metric("rwatch_bus_reconnects_total") - reconnects >= 1  # a timed-out connection is replaced
    queue = await channel.get_queue(f"t-{unique}.mirror.host")
    got = await collect(queue, lambda m: {x.headers["x-event-id"] for x in m} == {e.id for e in batch})
    assert len(got) >= len(batch)


async def test_start_retries_an_unreachable_broker_until_stop(unique: str, spy: type[RetrySpy]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = asyncio.Event()
    config = make_config(f"amqp://guest:guest@127.0.0.1:{port}/", unique, publish_timeout=2)
    bus = AmqpBus(config, stop=stop, connection_name=f"rwatch-test-{unique}")
    task = asyncio.create_task(bus.start())
    await spy.wait_for(2)
    assert not bus.connected
    stop.set()
    with pytest.raises(Stopping):
        await task
    await bus.close()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to close a connection")
async def test_broker_closing_the_connection_mid_stream_loses_nothing(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel
) -> None:
    name = f"rwatch-test-{unique}"
    config = make_config(amqp_url, unique, sinks={"mirror": ["host"]}, publish_window=64)
    bus = AmqpBus(config, connection_name=name)
    await bus.start()
    queue = await channel.get_queue(f"t-{unique}.mirror.host")
    reconnects = metric("rwatch_bus_reconnects_total")
    published: list[str] = []
    seen: list[str] = []
    first, closed, changed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        seen.append(str(message.headers["x-event-id"]))
        first.set()
        changed.set()

    async def stream() -> None:
        # A stream, not one batch: batches keep coming until well after the broker closed the
        # connection, so the close always lands mid-stream however fast the machine is.
        i, after_close = 0, 0
        while after_close < 5:
            batch = [event("host", i * 250 + j) for j in range(250)]
            await bus.publish(batch)
            published.extend(e.id for e in batch)
            i += 1
            after_close += closed.is_set()

    await queue.consume(on_message, no_ack=True)
    task = asyncio.create_task(stream())
    await first.wait()  # the stream is under way
    assert await close_connections(lambda n: n == name) == 1
    closed.set()
    await task
    while set(seen) != set(published):
        changed.clear()
        await asyncio.wait_for(changed.wait(), 30)
    await bus.close()

    assert metric("rwatch_bus_reconnects_total") - reconnects >= 1
    duplicates = len(seen) - len(set(seen))
    print(f"connection closed mid-stream: {len(published)} events, {duplicates} duplicates delivered")


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to close a connection")
async def test_a_publish_stuck_in_the_client_fails_as_soon_as_the_connection_closes(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel
) -> None:
    """A publish waiting inside aiormq's basic_publish when the connection goes is failed and re-published
    at once, not after publish_timeout.

    Deterministic form of the race behind the occasional 30 s stall: the broker closed the connection while
    the connection's bounded write queue was full, so one publish sat in ``write_queue.put`` (its writer
    dead) holding the channel lock and every other one waited for that lock. aiormq only rejects the
    futures it tracks, so nothing woke them until their publish timeout. Holding the channel lock here
    puts the publishes in exactly that state.
    """
    name = f"rwatch-test-{unique}"
    config = make_config(amqp_url, unique, sinks={"mirror": ["host"]}, publish_window=64, publish_timeout=60)
    bus = AmqpBus(config, connection_name=name)
    await bus.start()
    timeouts = metric("rwatch_publish_retries_total", reason="timeout")
    reconnects = metric("rwatch_bus_reconnects_total")
    batch = [event("host", i) for i in range(200)]
    link = bus._connector.link
    assert link is not None
    task: asyncio.Task[None] | None = None
    try:
        async with link.raw.lock:  # as the publish stuck on the full write queue holds it
            task = asyncio.create_task(bus.publish(batch))
            # Until the window is full of stuck publishes (no event tells; the per-test timeout bounds it).
            while len(link.inflight) < config.bus.publish_window:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            assert await close_connections(lambda n: n == name) == 1
            # Without the fix this waits for publish_timeout; the bound is a fraction of it, not a speed claim.
            done, _ = await asyncio.wait([task], timeout=config.bus.publish_timeout / 4)
            assert done, "a publish stuck in the client library waited for its publish timeout"
            await task
    finally:
        if task is not None:
            task.cancel()
        await bus.close()
    assert metric("rwatch_publish_retries_total", reason="timeout") == timeouts
    assert metric("rwatch_bus_reconnects_total") - reconnects >= 1
    queue = await channel.get_queue(f"t-{unique}.mirror.host")
    got = await collect(queue, lambda m: {x.headers["x-event-id"] for x in m} == {e.id for e in batch})
    assert len(got) == len(batch)  # the stuck publishes never reached the broker: nothing twice


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to close a connection")
async def test_repeated_broker_closes_mid_stream_never_wait_for_the_publish_timeout(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel
) -> None:
    """Every recovery from a broker-side close is prompt: no publish gives up by timing out."""
    name = f"rwatch-test-{unique}"
    config = make_config(amqp_url, unique, sinks={"mirror": ["host"]}, publish_window=64, publish_timeout=60)
    bus = AmqpBus(config, connection_name=name)
    await bus.start()
    timeouts = metric("rwatch_publish_retries_total", reason="timeout")
    reconnects = metric("rwatch_bus_reconnects_total")
    budget = config.bus.publish_timeout / 4
    published: list[str] = []
    batches = 0
    progress = asyncio.Event()

    async def stream() -> None:
        nonlocal batches
        while True:
            batch = [event("host", batches * 250 + j) for j in range(250)]
            await bus.publish(batch)
            published.extend(e.id for e in batch)
            batches += 1
            progress.set()

    async def batches_done(n: int) -> None:
        while batches < n:
            progress.clear()
            await progress.wait()

    task = asyncio.create_task(stream())
    recoveries: list[float] = []
    try:
        for _ in range(5):
            await asyncio.wait_for(batches_done(batches + 1), budget)  # the stream is under way
            assert await close_connections(lambda n: n == name) == 1
            closed_at, after = asyncio.get_running_loop().time(), batches
            # The batch in flight at the close and the next one, both complete on a new connection.
            await asyncio.wait_for(batches_done(after + 2), budget)
            recoveries.append(asyncio.get_running_loop().time() - closed_at)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Stopping):
            await task
        await bus.close()
    assert metric("rwatch_publish_retries_total", reason="timeout") == timeouts
    assert metric("rwatch_bus_reconnects_total") - reconnects >= 5
    missing = set(published)

    def all_delivered(messages: list[AbstractIncomingMessage]) -> bool:
        if messages:
            missing.discard(str(messages[-1].headers["x-event-id"]))
        return not missing

    await collect(await channel.get_queue(f"t-{unique}.mirror.host"), all_delivered)
    print(f"recoveries after a broker close: {[round(r, 2) for r in recoveries]} s")


async def test_abrupt_tcp_drop_mid_stream_loses_nothing(
    cleanup: list[str], amqp_url: str, unique: str, channel: AbstractChannel
) -> None:
    n = 3000
    async with Proxy.before("amqp", amqp_url) as proxy:
        config = make_config(proxy.via(amqp_url), unique, sinks={"mirror": ["host"]}, publish_window=64)
        bus = AmqpBus(config, connection_name=f"rwatch-test-{unique}")
        await bus.start()
        queue = await channel.get_queue(f"t-{unique}.mirror.host")
        batch = [event("host", i) for i in range(n)]
        seen: list[str] = []
        first, all_seen = asyncio.Event(), asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            seen.append(str(message.headers["x-event-id"]))
            first.set()
            if len(set(seen)) == n:
                all_seen.set()

        await queue.consume(on_message, no_ack=True)
        task = asyncio.create_task(bus.publish(batch))
        await first.wait()
        proxy.reset()  # abrupt: no AMQP close, both sides aborted
        await task
        await all_seen.wait()
        await bus.close()
    assert set(seen) == {e.id for e in batch}
    print(f"tcp cut mid-stream: {n} events, {len(seen) - n} duplicates delivered")
