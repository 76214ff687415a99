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
from prometheus_client import REGISTRY

from rwatch.bus.amqp import AmqpBus
from rwatch.bus.topology import dead_queue_name, dlx_name, queue_name
from rwatch.config import Config
from rwatch.errors import PermanentError, SinkRejected, SinkUnavailable, Stopping
from rwatch.events import Event, Message, ResyncMark, iso_utc, resync_event_id, watch_event_id
from rwatch.sinks import applier as applier_module
from rwatch.sinks.applier import Applier, RetryPolicy, apply_counting_crashes
from rwatch.sinks.consumer import ConsumerGroup
from rwatch.sinks.dlq import list_dead, replay
from rwatch.sinks.isolation import SinkHealth
from tests.chaos.proxy import Proxy

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
        self.on_sweep: Callable[[ResyncMark], int] = lambda mark: 0  # the number swept, or raises
        self.calls: list[tuple[str, list[str]]] = []  # ("apply", ids) and ("sweep", [mark id]), in order
        self.changed = asyncio.Event()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, events: Sequence[Event]) -> None:
        assert all(isinstance(e, Event) for e in events), "a mark must never reach apply"
        self.refuse(events)
        self.batches.append(list(events))
        self.calls.append(("apply", [e.id for e in events]))
        self.changed.set()

    async def sweep(self, mark: ResyncMark) -> int:
        swept = self.on_sweep(mark)
        self.calls.append(("sweep", [mark.id]))
        self.changed.set()
        return swept

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


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    original = applier_module.HealthyResetWait
    monkeypatch.setattr(applier_module, "HealthyResetWait",
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


# --- resync marks: the Applier splits batches at them -------------------------------------------------------


def mark(resource: str = "host", resync_id: str = "r1", i: int = 500) -> ResyncMark:
    version = (1_700_000_000 + i, 0)
    return ResyncMark(id=resync_event_id(resource, f"mark:{resync_id}", version), resource=resource, version=version,
                      resync_id=resync_id, listed=3, started_at=iso_utc(1_700_000_000),
                      observed_at=iso_utc(1_700_000_000 + i))


class DeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[Message, str, dict[str, Any]]] = []

    async def __call__(self, message: Message, reason: str, fields: dict[str, Any]) -> None:
        self.letters.append((message, reason, fields))


def swept_total(resource: str = "host", sink: str = "rec") -> float:
    return REGISTRY.get_sample_value("rwatch_resync_swept_total", {"sink": sink, "resource": resource}) or 0.0


def ids(*messages: Message) -> list[str]:
    return [m.id for m in messages]


async def test_a_mark_splits_the_batch_in_order() -> None:
    sink, dead = RecordingSink(), DeadLetters()
    applier = Applier(sink, "host", asyncio.Event(), dead)  # type: ignore[arg-type]
    e1, e2, end, e3 = event(1), event(2), mark(), event(3)
    await applier.apply([e1, e2, end, e3])
    assert sink.calls == [("apply", ids(e1, e2)), ("sweep", [end.id]), ("apply", ids(e3))]
    assert dead.letters == []


async def test_marks_at_the_edges_and_together_apply_no_empty_batch() -> None:
    sink = RecordingSink()
    applier = Applier(sink, "host", asyncio.Event(), DeadLetters())  # type: ignore[arg-type]
    first, second = mark(resync_id="a"), mark(resync_id="b")
    await applier.apply([first])
    assert sink.calls == [("sweep", [first.id])]
    sink.calls.clear()
    await applier.apply([first, second, event(1), second])
    assert sink.calls == [("sweep", [first.id]), ("sweep", [second.id]), ("apply", ids(event(1))),
                          ("sweep", [second.id])]
    sink.calls.clear()
    await applier.apply([])
    assert sink.calls == []


async def test_the_swept_count_is_counted_per_sink_and_resource() -> None:
    sink = RecordingSink()
    sink.on_sweep = lambda m: 7 if m.resync_id == "r1" else 0
    applier = Applier(sink, "host", asyncio.Event(), DeadLetters())  # type: ignore[arg-type]
    before, other = swept_total(), swept_total("module")
    await applier.apply([event(1), mark(), event(2)])
    assert swept_total() == before + 7
    await applier.apply([mark(resync_id="r2")])  # nothing swept: nothing counted
    assert swept_total() == before + 7
    assert swept_total("module") == other


async def test_a_sweep_failing_transiently_is_retried_before_the_events_after_it() -> None:
    sink, dead = RecordingSink(), DeadLetters()
    attempts: list[str] = []

    def flaky(m: ResyncMark) -> int:
        attempts.append(m.id)
        if len(attempts) == 1:
            raise SinkUnavailable("database restarting", sink="rec")
        return 4

    sink.on_sweep = flaky
    applier = Applier(sink, "host", asyncio.Event(), dead)  # type: ignore[arg-type]
    before = swept_total()
    retries = REGISTRY.get_sample_value("rwatch_apply_retries_total", {"sink": "rec"}) or 0.0
    e1, end, e2 = event(1), mark(), event(2)
    async with asyncio.timeout(10):  # the fast_backoff fixture keeps the pause short
        await applier.apply([e1, end, e2])
    assert attempts == [end.id, end.id]
    assert sink.calls == [("apply", ids(e1)), ("sweep", [end.id]), ("apply", ids(e2))]
    assert dead.letters == []
    assert swept_total() == before + 4  # counted once, for the attempt that swept
    assert (REGISTRY.get_sample_value("rwatch_apply_retries_total", {"sink": "rec"}) or 0.0) == retries + 1


@pytest.mark.parametrize("error", [SinkRejected("mark refused", event_ids=("x",), status=422),
                                   PermanentError("cannot sweep this", why="test")],
                         ids=["rejected", "permanent"])
async def test_a_refused_sweep_dead_letters_the_mark_and_the_rest_applies(error: Exception) -> None:
    sink, dead = RecordingSink(), DeadLetters()

    def refuse(m: ResyncMark) -> int:
        raise error

    sink.on_sweep = refuse
    applier = Applier(sink, "host", asyncio.Event(), dead)  # type: ignore[arg-type]
    before = swept_total()
    e1, end, e2, e3 = event(1), mark(), event(2), event(3)
    await applier.apply([e1, end, e2, e3])
    assert sink.calls == [("apply", ids(e1)), ("apply", ids(e2, e3))]
    [(message, reason, fields)] = dead.letters
    assert message is end
    assert reason == str(error)
    assert fields["error"] == str(error)
    assert swept_total() == before


async def test_events_refused_before_a_mark_do_not_stop_the_sweep() -> None:
    sink, dead = RecordingSink(), DeadLetters()
    poison = event(2)

    def picky(events: Sequence[Event]) -> None:
        bad = tuple(e.id for e in events if e.id == poison.id)
        if bad:
            raise SinkRejected("400", event_ids=bad)

    sink.refuse = picky
    applier = Applier(sink, "host", asyncio.Event(), dead)  # type: ignore[arg-type]
    end = mark()
    await applier.apply([event(1), poison, end, event(3)])
    assert [m for m, _, _ in dead.letters] == [poison]
    assert sink.calls[-2:] == [("sweep", [end.id]), ("apply", ids(event(3)))]


async def test_stop_while_the_sweep_fails_raises_stopping_and_applies_nothing_after() -> None:
    sink, stop = RecordingSink(), asyncio.Event()

    def down(m: ResyncMark) -> int:
        stop.set()
        raise SinkUnavailable("down")

    sink.on_sweep = down
    applier = Applier(sink, "host", stop, DeadLetters())  # type: ignore[arg-type]
    with pytest.raises(Stopping):
        await applier.apply([event(1), mark(), event(2)])
    assert sink.calls == [("apply", ids(event(1)))]


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


# --- the bound and the bisection: a poison is isolated, a sink that is down is held -----------------------------


def policy(max_attempts: int = 3, retry_timeout: float = 3600.0) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, retry_timeout=retry_timeout, retry_backoff=0.001,
                       retry_backoff_max=0.005)


def isolations(outcome: str, resource: str = "host") -> float:
    return REGISTRY.get_sample_value("rwatch_apply_isolations_total",
                                     {"sink": "rec", "resource": resource, "outcome": outcome}) or 0.0


class Timeline(DeadLetters):
    """Dead letters recorded into the sink's call log, so a test sees what came before what."""

    def __init__(self, sink: RecordingSink) -> None:
        super().__init__()
        self.sink = sink

    async def __call__(self, message: Message, reason: str, fields: dict[str, Any]) -> None:
        await super().__call__(message, reason, fields)
        self.sink.calls.append(("dead", [message.id]))


def failing_with(sink: RecordingSink, *poison: Event,
                 down: Callable[[], bool] = lambda: False) -> Callable[[Sequence[Event]], None]:
    """A sink that fails transiently for any batch holding a poison event (for ever), or for all while ``down``.
    Every attempt wakes ``sink.wait``."""
    bad = {e.id for e in poison}

    def refuse(events: Sequence[Event]) -> None:
        sink.changed.set()
        if down() or bad & {e.id for e in events}:
            raise SinkUnavailable("HTTP 500 Internal Server Error", status=500)

    return refuse


def applied_ids(sink: RecordingSink) -> list[str]:
    return [i for kind, batch in sink.calls if kind == "apply" for i in batch]


async def test_a_poison_is_isolated_after_the_bound_and_only_it_is_dead_lettered() -> None:
    sink = RecordingSink()
    dead = Timeline(sink)
    events = [event(i, key=f"k{i}") for i in range(16)]
    poison = events[5]
    tried: list[list[str]] = []
    refuse = failing_with(sink, poison)

    def recording(batch: Sequence[Event]) -> None:
        tried.append([e.id for e in batch])
        refuse(batch)

    sink.refuse = recording
    before = isolations("poison")
    applier = Applier(sink, "host", asyncio.Event(), dead, policy(max_attempts=3))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        await applier.apply(events)
    # Held and retried whole up to the bound, then bisected: a handful of probes, not one per event.
    assert tried[:3] == [[e.id for e in events]] * 3
    assert len(tried) <= 3 + 2 * 4 + 2
    assert applied_ids(sink) == [e.id for e in events if e is not poison]  # the rest, in order
    [(message, reason, fields)] = dead.letters
    assert message is poison
    assert reason == "poison: HTTP 500 Internal Server Error"
    assert fields["attempts"] == sum(poison.id in batch for batch in tried) and fields["attempts"] > 3
    assert fields["status"] == 500 and fields["poison"] is True
    assert isolations("poison") == before + 1


async def test_the_poisons_later_events_of_its_object_wait_behind_it() -> None:
    sink = RecordingSink()
    dead = Timeline(sink)
    events = [event(i, key=f"k{i}") for i in range(8)]
    poison, later = events[2], event(6, key="k2")  # a newer event of the poison's object
    events[6] = later
    sink.refuse = failing_with(sink, poison)
    applier = Applier(sink, "host", asyncio.Event(), dead, policy(max_attempts=2))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        await applier.apply(events)
    timeline = [(kind, i) for kind, batch in sink.calls for i in batch]
    # The object's newer event is applied only after the poison left: per-object order holds.
    assert timeline.index(("dead", poison.id)) < timeline.index(("apply", later.id))
    assert applied_ids(sink) == [e.id for e in events if e is not poison]


async def test_poisons_together_at_the_head_of_the_batch_are_all_found() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    events = [event(i, key=f"k{i}") for i in range(12)]
    sink.refuse = failing_with(sink, events[0], events[1], events[7])
    applier = Applier(sink, "host", asyncio.Event(), dead, policy(max_attempts=2))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        await applier.apply(events)
    assert [m.id for m, _, _ in dead.letters] == ids(events[0], events[1], events[7])
    assert sorted(applied_ids(sink)) == sorted(ids(*events[2:7], *events[8:]))


async def test_a_sink_down_for_every_event_is_held_through_many_bounds_and_nothing_is_dead_lettered() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    events = [event(i, key=f"k{i % 5}") for i in range(40)]
    down = True
    calls = 0
    refuse = failing_with(sink, down=lambda: down)

    def counting(batch: Sequence[Event]) -> None:
        nonlocal calls
        calls += 1
        refuse(batch)

    sink.refuse = counting
    held = isolations("held")
    applier = Applier(sink, "host", asyncio.Event(), dead, policy(max_attempts=2))  # type: ignore[arg-type]
    task = asyncio.create_task(applier.apply(events))
    await sink.wait(lambda: isolations("held") >= held + 5, timeout=10)  # five bounds, each found the sink down
    assert not task.done() and dead.letters == [] and sink.applied == []
    down = False  # the endpoint is back
    async with asyncio.timeout(10):
        await task
    assert dead.letters == []
    assert applied_ids(sink) == ids(*events)  # all of it, in order, once it is back
    # Each isolation of a down sink costs a few probes, not one per event.
    assert calls < 5 * (2 + 2 * 6 + 3) + 10


async def test_a_batch_that_fails_a_few_times_then_applies_is_not_dead_lettered() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    failures = iter(range(4))

    def flaky(events: Sequence[Event]) -> None:
        if next(failures, None) is not None:
            raise SinkUnavailable("connection reset")

    sink.refuse = flaky
    events = [event(i) for i in range(10)]
    applier = Applier(sink, "host", asyncio.Event(), dead, policy(max_attempts=2))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        await applier.apply(events)
    assert dead.letters == [] and sorted(applied_ids(sink)) == sorted(ids(*events))


async def test_a_lone_failing_event_is_held_until_events_delivered_meanwhile_prove_the_sink_up() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    poison, later = event(1, key="a"), [event(2, key="b"), event(3, key="c")]
    sink.refuse = failing_with(sink, poison)
    delivered: list[Message] = []
    asked = 0

    async def more() -> list[Message]:
        nonlocal asked
        asked += 1
        sink.changed.set()
        taken = list(delivered)
        delivered.clear()
        return taken

    applier = Applier(sink, "host", asyncio.Event(), dead, policy(max_attempts=2))  # type: ignore[arg-type]
    task = asyncio.create_task(applier.apply([poison], more))
    # Several bounds passed with nothing else to try: it might be the sink that is down.
    await sink.wait(lambda: asked >= 3, timeout=10)
    assert dead.letters == [] and not task.done()
    delivered.extend(later)  # the next changes arrive: they apply, so the sink is up and the lone event is poison
    async with asyncio.timeout(10):
        await task
    assert [m for m, _, _ in dead.letters] == [poison]
    assert applied_ids(sink) == ids(*later)


async def test_a_lone_failing_event_is_proved_poison_by_another_queue_of_the_same_sink() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    health = SinkHealth()
    poison = event(1, key="a")
    sink.refuse = failing_with(sink, poison)
    hosts = Applier(sink, "host", asyncio.Event(), dead, policy(max_attempts=2), health)  # type: ignore[arg-type]
    processes = Applier(sink, "process", asyncio.Event(), dead, policy(max_attempts=2), health)  # type: ignore[arg-type]
    held = isolations("held")
    task = asyncio.create_task(hosts.apply([poison]))
    await sink.wait(lambda: isolations("held") >= held + 2, timeout=10)
    assert dead.letters == []
    await processes.apply([event(2, "process")])  # the sink applies another queue's event: it is up
    async with asyncio.timeout(10):
        await task
    assert [m for m, _, _ in dead.letters] == [poison]


async def test_a_lone_event_of_a_sink_down_for_every_queue_is_never_dead_lettered() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    health = SinkHealth()
    sink.refuse = failing_with(sink, down=lambda: True)
    stop = asyncio.Event()
    hosts = Applier(sink, "host", stop, dead, policy(max_attempts=2), health)  # type: ignore[arg-type]
    processes = Applier(sink, "process", stop, dead, policy(max_attempts=2), health)  # type: ignore[arg-type]
    held = isolations("held") + isolations("held", "process")
    tasks = [asyncio.create_task(hosts.apply([event(1)])),
             asyncio.create_task(processes.apply([event(i, "process") for i in range(2, 6)]))]
    await sink.wait(lambda: isolations("held") + isolations("held", "process") >= held + 10, timeout=10)
    stop.set()
    for task in tasks:
        with pytest.raises(Stopping):
            await task
    assert dead.letters == [] and sink.applied == []


async def test_the_bound_is_also_a_duration() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    now = 0.0

    def clock() -> float:
        return now

    events = [event(i, key=f"k{i}") for i in range(4)]
    tried = 0
    refuse = failing_with(sink, events[1])

    def ticking(batch: Sequence[Event]) -> None:
        nonlocal now, tried
        tried += 1
        now += 10.0  # each attempt takes ten seconds
        refuse(batch)

    sink.refuse = ticking
    applier = Applier(sink, "host", asyncio.Event(), dead,  # type: ignore[arg-type]
                      policy(max_attempts=1000, retry_timeout=25.0), clock=clock)
    async with asyncio.timeout(10):
        await applier.apply(events)
    assert [m for m, _, _ in dead.letters] == [events[1]]
    assert dead.letters[0][2]["attempts"] >= 3  # 0 s, 10 s, 20 s, 30 s: past 25 s after the first failure


async def test_memory_bus_a_message_that_crashes_the_sink_is_dead_lettered_after_the_delivery_limit() -> None:
    sink = RecordingSink()
    dead = DeadLetters()
    events = [event(i, key=f"k{i}") for i in range(6)]
    crasher = events[3]
    crashes = 0

    def buggy(batch: Sequence[Event]) -> None:
        nonlocal crashes
        if crasher in batch:
            crashes += 1
            raise KeyError("bk_host_innerip")  # a bug in the sink, not a verdict on the event

    sink.refuse = buggy
    before = REGISTRY.get_sample_value("rwatch_apply_crashes_total", {"sink": "rec", "resource": "host"}) or 0.0
    applier = Applier(sink, "host", asyncio.Event(), dead, policy())  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        await apply_counting_crashes(applier, events, limit=2)
    # The batch crashed once, then alone 3 times (limit + 1 deliveries), then it was dead-lettered.
    assert crashes == 1 + 3
    [(message, reason, fields)] = dead.letters
    assert message is crasher and reason == "crashed: KeyError: 'bk_host_innerip'" and fields["attempts"] == 3
    assert sorted(applied_ids(sink)) == sorted(ids(*events[:3], *events[4:]))  # each innocent once
    assert len(applied_ids(sink)) == 5
    assert (REGISTRY.get_sample_value("rwatch_apply_crashes_total", {"sink": "rec", "resource": "host"})
            or 0.0) == before + 3


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
