"""End to end: simulator -> rwatch watcher -> RabbitMQ -> a test consumer, against the real broker.

The oracle is the simulator's own event chain: every event it produced after rwatch's first answer must
arrive, in order per resource, equal field by field to what rwatch was configured to ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from rwatch.app import run_async
from rwatch.cmdb.protocol import NO_EVENT_CURSOR
from rwatch.events import watch_event_id
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from rwatch.store.records import Gap
from tests.integration.harness import (
    MakeSetup,
    Parts,
    QueueReader,
    Setup,
    chain_suffix_from,
    close_connections,
    expected_event,
    published_view,
    rabbitmqctl,
    reading,
    running,
    watcher_parts,
)

pytestmark = pytest.mark.amqp

RESOURCES = ["host", "host_relation", "biz", "set", "module", "process", "plat"]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=7, bizs=3, hosts=60)) as s:
        yield s


async def wait_long_polling(sim: Simulator, resources: list[str], timeout: float = 30.0) -> None:
    """Until every resource has a cursor-mode long-poll open: rwatch is past its first answer."""
    await sim.stats.wait_for(lambda s: all(s.in_flight(r) >= 1 for r in resources), timeout)


@contextlib.asynccontextmanager
async def rwatch_in_process(setup: Setup) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_async(setup.config(), stop, role="watcher"))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def check_stream(setup: Setup, sim: Simulator, reader: QueueReader, resource: str) -> int:
    """Every event from rwatch's first one on, in chain order, field by field. Returns the count."""
    got = reader.events[resource]
    nodes = sim.state.chain(resource)
    if not got:
        assert not nodes, f"{resource}: nothing published but the simulator has {len(nodes)} events"
        return 0
    expected = [expected_event(setup, resource, n) for n in chain_suffix_from(nodes, got[0]["cursor"])]
    assert [published_view(e) for e in got] == expected, f"{resource}: stream differs from the truth"
    return len(got)


def complete(sim: Simulator, resources: list[str]) -> object:
    def done(reader: QueueReader) -> bool:
        for res in resources:
            nodes = sim.state.chain(res)
            got = reader.events[res]
            if nodes and (not got or got[-1]["cursor"] != nodes[-1].cursor):
                return False
        return True

    return done


async def test_every_event_arrives_in_order_matching_the_truth(
    sim: Simulator, setups: MakeSetup
) -> None:
    setup = setups(sim.url, RESOURCES)
    async with rwatch_in_process(setup):
        await wait_long_polling(sim, RESOURCES)
        async with reading(setup) as reader:
            before = sum(len(sim.state.chain(r)) for r in RESOURCES)
            sim.load.run(4500)
            produced = sum(len(sim.state.chain(r)) for r in RESOURCES) - before
            assert produced >= 5000, f"the workload must produce at least 5,000 events, made {produced}"
            await reader.wait_for(complete(sim, RESOURCES), timeout=120)
    total = sum(check_stream(setup, sim, reader, res) for res in RESOURCES)
    assert total >= 5000
    assert sum(1 for r in RESOURCES if reader.events[r]) >= 5
    # Message properties: persistent, JSON, the event id in x-event-id, a fresh message_id per publish.
    for res in RESOURCES:
        for event, headers in zip(reader.events[res], reader.headers[res], strict=True):
            assert headers["x-event-id"] == event["id"]
            assert headers["routing_key"] == f"cmdb.{res}.{event['action']}"
            assert headers["delivery_mode"] == 2 and headers["content_type"] == "application/json"
            assert event["schema"] == 1 and event["origin"] == "watch" and event["tenant"] == "0"
    ids = [h["message_id"] for r in RESOURCES for h in reader.headers[r]]
    assert len(set(ids)) == len(ids)
    # The saved cursors are the last ones.
    store = open_store(setup.store_url)
    await store.open()
    try:
        for res in RESOURCES:
            state = await store.load("0", res)
            assert state is not None and state.cursor == sim.state.chain(res)[-1].cursor
            assert state.cursor != NO_EVENT_CURSOR
    finally:
        await store.close()



async def stored_gaps(setup: Setup, resource: str) -> list[Gap]:
    store = open_store(setup.store_url)
    await store.open()
    try:
        return await store.gaps("0", resource)
    finally:
        await store.close()


# --- CMDB failures: no crash, visible backoff, the cursor moves only with real progress --------------------


def metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def saved_cursor(parts: Parts, resource: str) -> str | None:
    state = await parts.store.load("0", resource)
    return state.cursor if state else None


async def test_cmdb_failures_back_off_and_keep_the_cursor(
    sim: Simulator, setups: MakeSetup
) -> None:
    setup = setups(sim.url, ["host"])
    async with watcher_parts(setup, timeout=2.0) as parts, running(parts.watcher("host")) as watcher, \
            reading(setup) as reader:
        await wait_long_polling(sim, ["host"])
        sim.state.update("host", next(iter(sim.state.objects("host"))), {"bk_host_name": "before-faults"})
        await reader.wait_for(complete(sim, ["host"]))
        newest = sim.state.chain("host")[-1].cursor
        await asyncio.wait_for(watcher.wait_saved(lambda s: s.cursor == newest), 30)
        cursor = await saved_cursor(parts, "host")
        assert cursor == newest
        backoffs = sum(metric("rwatch_watch_backoffs_total", resource="host", reason=r)
                       for r in ("transient", "rate_limited", "malformed"))
        faults = [
            {"kind": "http_500", "resource": "host"}, {"kind": "http_502", "resource": "host"},
            {"kind": "http_429", "resource": "host"}, {"kind": "code", "code": 1199997, "resource": "host"},
            {"kind": "code", "code": 1199017, "resource": "host"}, {"kind": "malformed", "resource": "host"},
            {"kind": "truncated", "resource": "host"}, {"kind": "drop", "resource": "host"},
            {"kind": "slow", "delay": 3.0, "resource": "host"},  # past the 2 s client timeout
        ]
        sim.faults.schedule(faults)
        await sim.stats.wait_for(lambda _: not sim.faults.script, 60)
        # Every fault was answered with a pause, and none moved the cursor.
        after = sum(metric("rwatch_watch_backoffs_total", resource="host", reason=r)
                    for r in ("transient", "rate_limited", "malformed"))
        assert after - backoffs >= len(faults) - 1  # the last one may still be pausing
        assert await saved_cursor(parts, "host") == cursor
        # Real progress after the storm: every change arrives and the cursor follows.
        sim.load.run(150)
        await reader.wait_for(complete(sim, ["host"]), timeout=60)
        newest = sim.state.chain("host")[-1].cursor
        await asyncio.wait_for(watcher.wait_saved(lambda s: s.cursor == newest), 30)
        assert await saved_cursor(parts, "host") == newest
    check_stream(setup, sim, reader, "host")


async def test_permanent_cmdb_errors_are_logged_and_retried_never_fatal(
    sim: Simulator, setups: MakeSetup
) -> None:
    setup = setups(sim.url, ["host"])
    labels = {"resource": "host", "reason": "permission"}
    refused = REGISTRY.get_sample_value("rwatch_cmdb_refusals_total", labels)
    async with watcher_parts(setup) as parts:
        # Refusals wait cmdb.refusal_retry (2 min by default); short here, so the test does not wait minutes.
        parts.client.config = parts.client.config.model_copy(update={"refusal_retry": 0.3})
        async with running(parts.watcher("host")) as watcher, reading(setup) as reader:
            await wait_long_polling(sim, ["host"])
            sim.faults.schedule([{"kind": "code", "code": 9900403, "resource": "host", "count": 2},
                                 {"kind": "code", "code": 1199998, "resource": "host"}])
            await sim.stats.wait_for(lambda _: not sim.faults.script, 30)
            sim.load.run(50)
            await reader.wait_for(complete(sim, ["host"]), timeout=60)
            # The two refusals waited the refusal pace; only the bad-options error went through the backoff.
            assert watcher.backoff.streak >= 1
            after = REGISTRY.get_sample_value("rwatch_cmdb_refusals_total", labels)
            assert (after or 0) - (refused or 0) == 2
            assert watcher.refused is None  # accepted again: /readyz no longer names it
    check_stream(setup, sim, reader, "host")


# --- cursor loss while stopped (invariant 4) ---------------------------------------------------------------


def host_requests(sim: Simulator) -> int:
    return sim.stats.watch_requests("host")


async def run_until_caught_up(setup: Setup, sim: Simulator, reader: QueueReader) -> None:
    """Run a host watcher until its saved cursor is the simulator's newest, then stop it."""
    async with watcher_parts(setup) as parts, running(parts.watcher("host")) as watcher:
        await reader.wait_for(complete(sim, ["host"]), timeout=60)
        newest = sim.state.chain("host")[-1].cursor
        await asyncio.wait_for(watcher.wait_saved(lambda s: s.cursor == newest), 30)


async def test_unknown_cursor_resumes_by_time_inside_the_window(
    sim: Simulator, setups: MakeSetup
) -> None:
    setup = setups(sim.url, ["host"])
    async with reading_after_declare(setup) as reader:
        await run_until_caught_up(setup, sim, reader)
        # Stopped: CMDB changes, then forgets every cursor but its newest (data cleanup, upgrade).
        missed_from = len(sim.state.chain("host"))
        for i, key in enumerate(list(sim.state.objects("host"))[:30]):
            sim.state.update("host", key, {"bk_host_name": f"while-stopped-{i}"})
        sim.faults.schedule({"kind": "expire_cursors", "resource": "host"})
        requests = host_requests(sim)
        await run_until_caught_up(setup, sim, reader)
        # 1103007, one start_from reply, then a long-poll that holds: a bounded number of calls.
        assert host_requests(sim) - requests <= 4
    got = {e["id"] for e in reader.events["host"]}
    missed = sim.state.chain("host")[missed_from:]
    assert all(watch_event_id("host", n.cursor) in got for n in missed)
    assert await stored_gaps(setup, "host") == []


async def test_cursor_older_than_retention_records_the_gap_and_moves_on(
    setups: MakeSetup
) -> None:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=3, retention=3 * 3600)) as sim:
        setup = setups(sim.url, ["host"])
        async with reading_after_declare(setup) as reader:
            await run_until_caught_up(setup, sim, reader)
            last_seen = sim.state.chain("host")[-1]
            # Stopped for longer than CMDB keeps history: these changes are lost for good...
            lost_key = next(iter(sim.state.objects("host")))
            sim.state.update("host", lost_key, {"bk_host_name": "lost"})
            sim.state.clock.jump(4 * 3600)
            # ...and these happened inside the window that is left.
            after_from = len(sim.state.chain("host"))
            for i, key in enumerate(list(sim.state.objects("host"))[:20]):
                sim.state.update("host", key, {"bk_host_name": f"after-jump-{i}"})
            requests = host_requests(sim)
            await run_until_caught_up(setup, sim, reader)
            assert host_requests(sim) - requests <= 4  # cursor (1103007), start_from, long-poll(s)
        got = {e["id"] for e in reader.events["host"]}
        assert all(watch_event_id("host", n.cursor) in got for n in sim.state.chain("host")[after_from:])
        gaps = await stored_gaps(setup, "host")
        assert len(gaps) == 1
        gap = gaps[0]
        assert gap.reason == "cursor_expired" and gap.start == float(last_seen.sec)
        now = sim.state.clock.now()
        assert now - 3 * 3600 < gap.end < now - 3 * 3600 + 120  # the oldest retained second + margin


async def test_lookback_zero_still_replays_the_events_that_shared_the_last_ones_second(
    sim: Simulator, setups: MakeSetup
) -> None:
    """Issue 12, point 8: ``watch.lookback = 0`` used to resume an expired cursor at the last event's own second,
    and CMDB answers only the events *after* the second it is given: the events that shared that second and came
    after the cursor were skipped, with no gap recorded. It now means "from the second before"."""
    setup = setups(sim.url, ["host"])
    setup.path.write_text(setup.path.read_text().replace('lookback = "5m"', 'lookback = "0s"'))
    assert setup.config().watch.lookback == 0
    frozen = float(int(sim.state.clock.now()) + 1)
    sim.state.clock.now = lambda: frozen  # type: ignore[method-assign]  # every event from here shares a second
    keys = list(sim.state.objects("host"))
    async with reading_after_declare(setup) as reader:
        sim.state.update("host", keys[0], {"bk_host_name": "saved"})
        await run_until_caught_up(setup, sim, reader)
        missed_from = len(sim.state.chain("host"))
        for i, key in enumerate(keys[1:6]):
            sim.state.update("host", key, {"bk_host_name": f"same-second-{i}"})
        sim.faults.schedule({"kind": "expire_cursors", "resource": "host"})
        await run_until_caught_up(setup, sim, reader)
    missed = sim.state.chain("host")[missed_from:]
    assert {n.sec for n in missed} == {int(frozen)} and len(missed) == 5
    got = {e["id"] for e in reader.events["host"]}
    assert [n.cursor for n in missed if watch_event_id("host", n.cursor) not in got] == []
    assert await stored_gaps(setup, "host") == []


async def test_start_time_refused_resumes_inside_the_window_and_records_only_what_was_lost(
    setups: MakeSetup
) -> None:
    """Issue 12, point 6: CMDB keeps less than ``watch.retention`` (1 h here, 3 h configured). After a long stop
    the cursor is gone (1103007) and the start time it leads to is refused too (1199006). rwatch searches inside
    the window (3 h, then 1 h 30, then 45 min back) instead of jumping to "from now", and records as a gap only
    what lies between the last event it saw and the start the server accepted."""
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=5, retention=3600)) as sim:
        setup = setups(sim.url, ["host"])
        keys = list(sim.state.objects("host"))
        async with reading_after_declare(setup) as reader:
            await run_until_caught_up(setup, sim, reader)
            last_seen = sim.state.chain("host")[-1]
            # Stopped for two hours. A change 50 min ago is still in CMDB's window but before the start rwatch
            # will find (45 min back): lost, and inside the recorded gap. Later changes arrive.
            sim.state.clock.jump(70 * 60)
            sim.state.update("host", keys[0], {"bk_host_name": "in-the-hole"})
            lost = sim.state.chain("host")[-1]
            sim.state.clock.jump(50 * 60)
            after_from = len(sim.state.chain("host"))
            for i, key in enumerate(keys[1:11]):
                sim.state.update("host", key, {"bk_host_name": f"after-{i}"})
            before = {mode: sim.stats.watch_requests("host", mode) for mode in ("cursor", "start_from", "now")}
            await run_until_caught_up(setup, sim, reader)
            asked = {mode: sim.stats.watch_requests("host", mode) - n for mode, n in before.items()}
        # 1103007; start_from refused twice (2 h 5 min, 1 h 30 back), then accepted (45 min back); never from now.
        assert asked["now"] == 0
        assert asked["start_from"] == 3
        assert sim.stats.watch_count("host", "start_from", "error:1199006") == 2
        got = {e["id"] for e in reader.events["host"]}
        assert all(watch_event_id("host", n.cursor) in got for n in sim.state.chain("host")[after_from:])
        assert watch_event_id("host", lost.cursor) not in got
        gaps = await stored_gaps(setup, "host")
        assert [(g.reason, g.start) for g in gaps] == [("start_out_of_window", float(last_seen.sec))]
        # It ends where the accepted start is: inside the server's window, after the lost change, before the rest.
        now = sim.state.clock.now()
        end = gaps[0].end
        assert now - 3600 < end and lost.sec <= end < sim.state.chain("host")[after_from].sec
        assert end < now - 40 * 60  # not "from now": a 1 h 15 min hole, not the whole 2 h


@pytest.mark.parametrize("kind", ["empty_events", "missing_events", "events_not_list", "unwatched_with_events"])
async def test_a_malformed_reply_keeps_the_position_and_loses_nothing(
    sim: Simulator, setups: MakeSetup, kind: str
) -> None:
    """Issue 12, point 5: a successful reply that says nothing true about where the stream stands (no events, or
    events under ``bk_watched: false``) is counted, logged, retried with backoff from the same cursor. It used to
    restart the watch "from now" (or skip the events as a placeholder), losing what happened in between."""
    setup = setups(sim.url, ["host"])
    async with reading_after_declare(setup) as reader:
        await run_until_caught_up(setup, sim, reader)
        missed_from = len(sim.state.chain("host"))
        for i, key in enumerate(list(sim.state.objects("host"))[:30]):
            sim.state.update("host", key, {"bk_host_name": f"while-stopped-{i}"})
        # The first answer to the restarted watcher's cursor is malformed.
        sim.faults.schedule({"kind": kind, "resource": "host", "mode": "cursor"})
        malformed = metric("rwatch_watch_requests_total", resource="host", outcome="malformed")
        paused = metric("rwatch_watch_backoffs_total", resource="host", reason="malformed")
        from_now = sim.stats.watch_requests("host", "now")
        await run_until_caught_up(setup, sim, reader)
        assert sim.faults.fired[kind] == 1 and not sim.faults.script
        assert sim.stats.watch_requests("host", "now") == from_now  # never restarted "from now"
        assert metric("rwatch_watch_requests_total", resource="host", outcome="malformed") == malformed + 1
        assert metric("rwatch_watch_backoffs_total", resource="host", reason="malformed") == paused + 1
    got = {e["id"] for e in reader.events["host"]}
    missed = sim.state.chain("host")[missed_from:]
    assert len(missed) == 30
    assert [n.cursor for n in missed if watch_event_id("host", n.cursor) not in got] == []
    assert await stored_gaps(setup, "host") == []


@contextlib.asynccontextmanager
async def reading_after_declare(setup: Setup) -> AsyncIterator[QueueReader]:
    """Declare rwatch's topology first (as the bus does at start), then read it."""
    from rwatch.bus import make_bus

    bus = make_bus(setup.config())
    await bus.start()
    await bus.close()
    async with reading(setup) as reader:
        yield reader


# --- the broker goes away mid-stream ----------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["close_connection", "restart_broker"])
async def test_broker_trouble_mid_stream_recovers_and_loses_nothing(
    sim: Simulator, setups: MakeSetup, fault: str
) -> None:
    resources = ["host", "host_relation", "module"]
    setup = setups(sim.url, resources)
    reconnects = metric("rwatch_bus_reconnects_total")
    async with rwatch_in_process(setup):
        await wait_long_polling(sim, resources)
        async with reading(setup) as reader:
            sim.load.start(rate=300, seed=5)
            await reader.wait_for(lambda r: sum(len(r.events[x]) for x in resources) > 100)
            if fault == "close_connection":
                closed = await close_connections(lambda name: f"exchange={setup.exchange}" in name)
                assert closed == 1
            else:
                # A full broker restart: every connection drops, the quorum queues come back from disk.
                await rabbitmqctl("stop_app")
                await asyncio.sleep(1.0)  # changes keep coming in CMDB while the broker is down
                await rabbitmqctl("start_app")
                await rabbitmqctl("await_startup")
        # The reader's own connection died with the broker; a new one reads on.
        async with reading(setup) as reader2:
            await asyncio.sleep(1.0)
            sim.load.stop()
            await reader2.wait_for(complete(sim, resources), timeout=90)
    assert metric("rwatch_bus_reconnects_total") > reconnects
    for res in resources:
        got = reader.events[res] + reader2.events[res]
        ids = {e["id"] for e in got}
        expected = chain_suffix_from(sim.state.chain(res), got[0]["cursor"])
        missing = [n.cursor for n in expected if watch_event_id(res, n.cursor) not in ids]
        assert not missing, f"{res}: {len(missing)} events lost"



async def test_bootstrap_resync_records_the_history_before_now_as_a_gap_once(
    sim: Simulator, setups: MakeSetup
) -> None:
    setup = setups(sim.url, ["host"], bootstrap="resync")
    async with reading_after_declare(setup) as reader:
        await run_until_caught_up(setup, sim, reader)
        await run_until_caught_up(setup, sim, reader)  # a restart resumes from the cursor: no new gap
    gaps = await stored_gaps(setup, "host")
    assert [(g.reason, g.start) for g in gaps] == [("bootstrap", 0.0)]
    assert abs(gaps[0].end - sim.state.clock.now()) < 60
