"""Poison cannot block a queue (issue 12), with the real webhook sink, a real receiver and the real RabbitMQ.

A payload the receiver fails for ever (HTTP 500, a transient status) is isolated once the batch passed its
sink's bound and dead-lettered with its reason and attempt count, while everything else is delivered; `rwatch
dlq replay` brings it back. A receiver that is down for every event holds the queue through many bounds and
dead-letters nothing. An event that crashes the sink (a bug) is rejected on each delivery until the broker
dead-letters it, and the other events of its batches are delivered exactly once.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from prometheus_client import REGISTRY

from rwatch.events import Event, watch_event_id
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.sinks.webhook import WebhookSink
from tests.entrypoint import RWATCH
from tests.integration.harness import MakeSetup, Receiver, Setup, rabbitmqctl
from tests.integration.test_apply_e2e import rwatch_all
from tests.integration.test_watch_e2e import wait_long_polling


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=12, bizs=2, hosts=30)) as s:
        yield s


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


def hook(receiver: Receiver) -> str:
    """The webhook sink with a short bound and short pauses, so each test takes seconds."""
    return receiver.sink_toml(batch_wait="10ms", max_attempts=2, retry_backoff="10ms", retry_backoff_max="50ms")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"sink": "hook", "resource": "host", **labels}) or 0.0


def rwatch_cli(setup: Setup, *args: str) -> str:
    proc = subprocess.run([RWATCH, *args, "--config", str(setup.path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def dlq_listing(setup: Setup, done: Callable[[str], bool]) -> str:
    """`rwatch dlq list` as an operator runs it, until ``done`` accepts its output."""
    listing = ""
    for _ in range(100):
        listing = await asyncio.to_thread(rwatch_cli, setup, "dlq", "list")
        if done(listing):
            return listing
        await asyncio.sleep(0.1)
    raise AssertionError(f"rwatch dlq list never showed what was expected:\n{listing}")


def dead_row(listing: str, event_id: str) -> list[str]:
    [row] = [line.split(maxsplit=6) for line in listing.splitlines() if event_id[:16] in line]
    return row  # sink, resource, action, failed at, event id, attempts, reason


def event_id_of(sim: Simulator, name: str) -> str:
    node = next(n for n in sim.state.chain("host") if n.detail.get("bk_host_name") == name)
    return watch_event_id("host", node.cursor)


async def queue_counts(name: str) -> int:
    """Messages in the queue, ready or delivered and not yet acknowledged, as the broker counts them."""
    out = await rabbitmqctl("-q", "list_queues", "name", "messages_ready", "messages_unacknowledged")
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1]) + int(parts[2])
    raise AssertionError(f"queue {name} not found")


@pytest.mark.parametrize("bus", [pytest.param("amqp", marks=pytest.mark.amqp), "memory"])
async def test_a_payload_the_receiver_fails_for_ever_is_dead_lettered_and_the_queue_moves_on(
    sim: Simulator, setups: MakeSetup, receiver: Receiver, bus: str
) -> None:
    setup = setups(sim.url, ["host"], bus=bus, extra=hook(receiver))
    hosts = sorted(sim.state.objects("host"), key=int)[:8]
    poison_key = hosts[3]
    # HTTP 500 to this one payload, for ever: the receiver chokes on it, and on nothing else.
    receiver.refuse = lambda event: 500 if event["data"].get("bk_host_name") == "run-3" else None
    poisons = metric("rwatch_poison_events_total")
    async with rwatch_all(setup):
        await wait_long_polling(sim, ["host"])
        for i, key in enumerate(hosts):
            sim.state.update("host", key, {"bk_host_name": f"run-{i}"})
        sim.state.update("host", poison_key, {"bk_host_name": "after"})  # a newer event of the poison's object
        poison_id = event_id_of(sim, "run-3")
        # Everything else is delivered, the poison's object included (its newer event, after the poison left).
        want = {key: ("after" if key == poison_key else f"run-{i}") for i, key in enumerate(hosts)}
        await receiver.wait(lambda: {k: receiver.live("host").get(k, {}).get("bk_host_name") for k in hosts} == want)
        assert poison_id not in receiver.deliveries
        assert metric("rwatch_poison_events_total") == poisons + 1
        if bus == "memory":
            return  # no dead-letter queue: the event is logged whole as event_dead_lettered
        # The poison waits in <prefix>.hook.dead with its reason and attempt count, as `rwatch dlq list` shows.
        listing = await dlq_listing(setup, lambda out: poison_id[:16] in out)
        assert "1 dead letter(s)" in listing
        row = dead_row(listing, poison_id)
        assert row[:3] == ["hook", "host", "update"]
        assert int(row[5]) > 2  # held through the bound (2), then isolated
        assert row[6].startswith("poison: webhook endpoint failed for 1 event(s): HTTP 500")
        # The receiver is fixed; replay brings it back and it is delivered, once. Being older than what the
        # receiver holds for that host, it changes nothing there (the receiver's version fence).
        receiver.refuse = lambda event: None
        assert "replayed 1 dead letter(s)" in await asyncio.to_thread(rwatch_cli, setup, "dlq", "replay")
        await receiver.wait(lambda: poison_id in receiver.deliveries)
        assert receiver.live("host")[poison_key]["bk_host_name"] == "after"
        assert "0 dead letter(s)" in await asyncio.to_thread(rwatch_cli, setup, "dlq", "list")
    assert receiver.deliveries.count(poison_id) == 1


@pytest.mark.amqp
async def test_a_receiver_down_for_every_event_holds_the_queue_and_dead_letters_nothing(
    sim: Simulator, setups: MakeSetup, receiver: Receiver
) -> None:
    setup = setups(sim.url, ["host"], extra=hook(receiver))
    hosts = sorted(sim.state.objects("host"), key=int)[:10]
    receiver.refuse = lambda event: 503  # down, for everything
    held = metric("rwatch_apply_isolations_total", outcome="held")
    async with rwatch_all(setup):
        await wait_long_polling(sim, ["host"])
        for key in hosts:
            sim.state.update("host", key, {"bk_host_name": "while-down"})
        for _ in range(300):  # several bounds passed, each bisected the batch and found the receiver down
            if metric("rwatch_apply_isolations_total", outcome="held") >= held + 3:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the batch was never isolated")
        # Nothing dead-lettered, nothing lost: the queue holds every event, delivered and not acknowledged.
        assert "0 dead letter(s)" in await asyncio.to_thread(rwatch_cli, setup, "dlq", "list")
        for _ in range(150):  # the broker's queue statistics lag by its stats interval (5 s)
            if (held_in_queue := await queue_counts(setup.queue("host", "hook"))) >= len(hosts):
                break
            await asyncio.sleep(0.1)
        assert held_in_queue >= len(hosts)
        receiver.refuse = lambda event: None  # back
        await receiver.wait(lambda: all(receiver.live("host").get(k, {}).get("bk_host_name") == "while-down"
                                        for k in hosts))
        assert "0 dead letter(s)" in await asyncio.to_thread(rwatch_cli, setup, "dlq", "list")
    updates = [watch_event_id("host", n.cursor) for n in sim.state.chain("host")
               if n.detail.get("bk_host_name") == "while-down"]
    assert len(updates) == len(hosts)
    assert all(receiver.deliveries.count(i) == 1 for i in updates)  # each delivered once, none lost


@pytest.mark.amqp
async def test_an_event_that_crashes_the_sink_is_dead_lettered_by_the_broker_and_the_rest_delivered_once(
    sim: Simulator, setups: MakeSetup, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = setups(sim.url, ["host"], delivery_limit=2, extra=hook(receiver))
    apply = WebhookSink.apply

    async def buggy(self: WebhookSink, events: Sequence[Event]) -> None:
        if any(e.data.get("bk_host_name") == "crash-3" for e in events):
            raise KeyError("bk_host_innerip")  # a bug in the sink that this one event trips
        await apply(self, events)

    monkeypatch.setattr(WebhookSink, "apply", buggy)
    hosts = sorted(sim.state.objects("host"), key=int)[:8]
    crashes = metric("rwatch_apply_crashes_total")
    async with rwatch_all(setup):
        await wait_long_polling(sim, ["host"])
        for i, key in enumerate(hosts):
            sim.state.update("host", key, {"bk_host_name": f"crash-{i}"})
        crasher = event_id_of(sim, "crash-3")
        innocents = [event_id_of(sim, f"crash-{i}") for i in range(8) if i != 3]
        await receiver.wait(lambda: set(innocents) <= set(receiver.deliveries))
        # Rejected on each delivery; past bus.delivery_limit (2) redeliveries the broker dead-letters it.
        listing = await dlq_listing(setup, lambda out: crasher[:16] in out)
        assert "1 dead letter(s)" in listing
        row = dead_row(listing, crasher)
        assert row[5] == "3" and row[6] == "broker: delivery_limit"
        assert metric("rwatch_apply_crashes_total") == crashes + 3
        # The queue moved on.
        sim.state.update("host", hosts[0], {"bk_host_name": "later"})
        await receiver.wait(lambda: receiver.live("host")[hosts[0]]["bk_host_name"] == "later")
    # The innocent events of the crashing batches were acknowledged, never returned: each delivered once.
    assert all(receiver.deliveries.count(i) == 1 for i in innocents)
    assert crasher not in receiver.deliveries
