"""The Applier without a broker: resync marks split batches, the bound and the bisection isolate a poison, a sink
that is down is held, and on the memory bus a crashing message is counted to the delivery limit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from rwatch.errors import PermanentError, SinkRejected, SinkUnavailable, Stopping
from rwatch.events import Event, Message, ResyncMark
from rwatch.sinks.applier import Applier, apply_counting_crashes
from rwatch.sinks.isolation import SinkHealth
from tests.sinks.doubles import (  # noqa: F401 - fast_backoff is an autouse fixture
    DeadLetters,
    RecordingSink,
    Timeline,
    applied_ids,
    event,
    failing_with,
    fast_backoff,
    ids,
    isolations,
    mark,
    policy,
    swept_total,
)

# --- resync marks: the Applier splits batches at them -------------------------------------------------------


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


# --- the bound and the bisection: a poison is isolated, a sink that is down is held -----------------------------


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
