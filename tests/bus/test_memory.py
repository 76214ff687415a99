"""MemoryBus: routing to subscribers, waiting for them, transient retry, returns, stop; and make_bus."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from rwatch.bus import make_bus
from rwatch.bus.amqp import AmqpBus
from rwatch.bus.memory import MemoryBus
from rwatch.config import Config
from rwatch.errors import BusError, MessageReturned, Stopping
from rwatch.events import Event, iso_utc, watch_event_id
from rwatch.retry import Policy


def event(resource: str, n: int, action: str = "update") -> Event:
    return Event.model_validate({
        "id": watch_event_id(resource, f"c{n}"), "resource": resource, "action": action, "key": str(n),
        "version": (1_700_000_000, n), "occurred_at": iso_utc(1_700_000_000),
        "observed_at": iso_utc(1_700_000_000),
        "cursor": f"c{n}", "data": {"n": n},
    })


def published(resource: str, action: str = "update") -> float:
    return REGISTRY.get_sample_value(
        "rwatch_events_published_total", {"resource": resource, "action": action}
    ) or 0.0


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries pause 1 ms instead of 0.1 s doubling: the retry logic is under test, not the clock."""
    monkeypatch.setattr(MemoryBus, "policy", Policy("test", 0.001, 0.001))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[Event]] = []

    async def __call__(self, events: Sequence[Event]) -> None:
        self.calls.append(list(events))


async def test_routes_each_subscriber_its_events_in_order() -> None:
    bus = MemoryBus()
    mirror, hooks = Recorder(), Recorder()
    bus.subscribe("mirror", ["host", "module"], mirror)
    bus.subscribe("hooks", ["host"], hooks)
    await bus.start()
    batch = [event("host", 1), event("module", 2), event("host", 3), event("module", 4)]
    before = published("host")

    await bus.publish(batch)

    assert mirror.calls == [batch]
    assert hooks.calls == [[batch[0], batch[2]]]
    assert published("host") - before == 2


async def test_subscriber_with_nothing_in_the_batch_is_not_called() -> None:
    bus = MemoryBus()
    mirror, biz = Recorder(), Recorder()
    bus.subscribe("mirror", ["host"], mirror)
    bus.subscribe("biz", ["biz"], biz)
    await bus.publish([event("host", 1)])
    await bus.publish([])
    assert len(mirror.calls) == 1
    assert biz.calls == []


async def test_publish_returns_only_after_every_handler_returned() -> None:
    bus = MemoryBus()
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(events: Sequence[Event]) -> None:
        entered.set()
        await release.wait()

    fast = Recorder()
    bus.subscribe("slow", ["host"], slow)
    bus.subscribe("fast", ["host"], fast)
    task = asyncio.create_task(bus.publish([event("host", 1)]))
    await entered.wait()
    assert not task.done()
    assert len(fast.calls) == 1  # handlers run side by side; the fast one is not held up
    release.set()
    await task


async def test_transient_handler_error_is_retried_until_it_succeeds() -> None:
    bus = MemoryBus()
    calls: list[list[Event]] = []

    async def flaky(events: Sequence[Event]) -> None:
        calls.append(list(events))
        if len(calls) < 3:
            raise BusError("sink unavailable")

    bus.subscribe("flaky", ["host"], flaky)
    batch = [event("host", 1), event("host", 2)]
    await bus.publish(batch)
    assert calls == [batch, batch, batch]


async def test_permanent_handler_error_propagates_after_the_others_finished() -> None:
    bus = MemoryBus()
    other = Recorder()

    async def broken(events: Sequence[Event]) -> None:
        raise ValueError("bug in a sink")

    bus.subscribe("broken", ["host"], broken)
    bus.subscribe("other", ["host"], other)
    before = published("host")
    with pytest.raises(ValueError, match="bug in a sink"):
        await bus.publish([event("host", 1)])
    assert len(other.calls) == 1
    assert published("host") == before


async def test_no_subscriber_for_a_resource_is_a_return_and_nothing_is_applied() -> None:
    bus = MemoryBus()
    mirror = Recorder()
    bus.subscribe("mirror", ["host"], mirror)
    with pytest.raises(MessageReturned) as info:
        await bus.publish([event("host", 1), event("biz", 2)])
    assert info.value.extra["resource"] == "biz"
    assert info.value.extra["routing_key"] == "cmdb.biz.update"
    assert mirror.calls == []


async def test_stop_ends_a_failing_publish_with_stopping() -> None:
    stop = asyncio.Event()
    bus = MemoryBus(stop=stop)
    attempts = 0

    async def down(events: Sequence[Event]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            stop.set()
        raise ConnectionError("sink down")

    bus.subscribe("down", ["host"], down)
    with pytest.raises(Stopping):
        await bus.publish([event("host", 1)])
    assert attempts == 3


async def test_stop_does_not_interrupt_a_healthy_publish() -> None:
    stop = asyncio.Event()
    stop.set()
    bus = MemoryBus(stop=stop)
    rec = Recorder()
    bus.subscribe("mirror", ["host"], rec)
    await bus.publish([event("host", 1)])  # in-flight batches still complete during shutdown
    assert len(rec.calls) == 1


async def test_close_ends_retries_and_later_publishes() -> None:
    bus = MemoryBus()
    entered = asyncio.Event()

    async def down(events: Sequence[Event]) -> None:
        entered.set()
        raise ConnectionError("sink down")

    bus.subscribe("down", ["host"], down)
    await bus.start()
    assert bus.connected
    task = asyncio.create_task(bus.publish([event("host", 1)]))
    await entered.wait()
    await bus.close()
    with pytest.raises(Stopping):
        await task
    assert not bus.connected
    with pytest.raises(Stopping):
        await bus.publish([event("host", 2)])


def test_duplicate_subscriber_name_is_refused() -> None:
    bus = MemoryBus()
    bus.subscribe("mirror", ["host"], Recorder())
    with pytest.raises(ValueError, match="mirror"):
        bus.subscribe("mirror", ["biz"], Recorder())


def test_make_bus_follows_the_configured_kind() -> None:
    assert isinstance(make_bus(Config.model_validate({"bus": {"kind": "memory"}})), MemoryBus)
    assert isinstance(make_bus(Config.model_validate({"bus": {"kind": "amqp"}})), AmqpBus)


async def test_a_retry_pause_raises_stopping_when_stop_is_set_during_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MemoryBus, "policy", Policy("slow", 60.0, 60.0))
    stop = asyncio.Event()
    bus = MemoryBus(stop=stop)
    failed = asyncio.Event()

    async def down(events: Sequence[Event]) -> None:
        failed.set()
        raise ConnectionError("sink down")

    bus.subscribe("down", ["host"], down)
    pausing = asyncio.create_task(bus.publish([event("host", 1)]))
    await failed.wait()
    await asyncio.sleep(0)  # let the pause start waiting
    stop.set()
    with pytest.raises(Stopping):
        await asyncio.wait_for(pausing, 5)
