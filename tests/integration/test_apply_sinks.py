"""The apply half with real sinks and a real receiver: poison events and `rwatch dlq`, a stalled sink,
and a stream full of duplicates, replays and redeliveries that must end where the clean stream ends."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from rwatch.config import load_config
from rwatch.events import Event, iso_utc, watch_event_id
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.sinks.webhook import WebhookSink
from tests.entrypoint import RWATCH
from tests.integration.harness import MakeSetup, Receiver, Setup, rabbitmqctl
from tests.integration.test_apply_e2e import async_url, mirror_rows, rwatch_all
from tests.integration.test_watch_e2e import wait_long_polling

pytestmark = pytest.mark.amqp


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=5, bizs=2, hosts=40)) as s:
        yield s


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


def rwatch_cli(setup: Setup, *args: str) -> str:
    proc = subprocess.run([RWATCH, *args, "--config", str(setup.path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_poison_event_is_dead_lettered_and_replayed_once_the_sink_accepts_it(
    sim: Simulator, setups: MakeSetup, receiver: Receiver
) -> None:
    setup = setups(sim.url, ["host"], extra=receiver.sink_toml(batch_wait="10ms"))
    hosts = sorted(sim.state.objects("host"), key=int)
    poison_key = hosts[3]
    receiver.refuse = lambda event: 400 if event["key"] == poison_key else None
    async with rwatch_all(setup):
        await wait_long_polling(sim, ["host"])
        for i, key in enumerate(hosts[:8]):
            sim.state.update("host", key, {"bk_host_name": f"poison-run-{i}"})
        poison_id = watch_event_id("host", sim.state.chain("host")[-5].cursor)
        # The events around the poison apply...
        await receiver.wait(lambda: {k for k in hosts[:8] if k != poison_key} <= set(receiver.live("host"))
                            and all(receiver.live("host")[k]["bk_host_name"].startswith("poison-run")
                                    for k in hosts[:8] if k != poison_key))
        # ...and the poison waits in <prefix>.hook.dead with its reason, as `rwatch dlq list` shows.
        await asyncio.sleep(0)
        listing = ""
        for _ in range(100):
            listing = await asyncio.to_thread(rwatch_cli, setup, "dlq", "list")
            if poison_id[:16] in listing:
                break
            await asyncio.sleep(0.1)
        assert poison_id[:16] in listing and "HTTP 400" in listing and "1 dead letter(s)" in listing
        assert receiver.live("host").get(poison_key, {}).get("bk_host_name") != "poison-run-3"
        # The receiver is fixed; replay puts it back and it applies, once.
        receiver.refuse = lambda event: None
        assert "replayed 1 dead letter(s)" in await asyncio.to_thread(rwatch_cli, setup, "dlq", "replay",
                                                                       "--sink", "hook")
        await receiver.wait(lambda: receiver.live("host").get(poison_key, {}).get("bk_host_name") == "poison-run-3")
    assert receiver.deliveries.count(poison_id) == 1
    assert "0 dead letter(s)" in rwatch_cli(setup, "dlq", "list")


async def queue_counts(name: str) -> tuple[int, int]:
    """(ready, unacknowledged) as the broker counts them."""
    out = await rabbitmqctl("-q", "list_queues", "name", "messages_ready", "messages_unacknowledged")
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {name} not found")


async def test_a_stalled_sink_backs_up_in_rabbitmq_not_in_rwatch_and_catches_up(
    sim: Simulator, setups: MakeSetup, receiver: Receiver
) -> None:
    prefetch = 40
    setup = setups(sim.url, ["host"], prefetch=prefetch, extra=receiver.sink_toml(batch_max=20, timeout=120))
    receiver.gate.clear()  # every webhook request hangs until the gate opens
    async with rwatch_all(setup):
        await wait_long_polling(sim, ["host"])
        for round_ in range(6):
            for key in list(sim.state.objects("host"))[:40]:
                sim.state.update("host", key, {"bk_host_name": f"stall-{round_}"})
            await asyncio.sleep(0.2)
        total = len(sim.state.chain("host"))
        # The watcher kept going and the mirror kept up: the stall is the webhook's alone.
        await wait_long_polling(sim, ["host"])
        config = setup.config()
        mirror_queue, hook_queue = setup.queue("host"), setup.queue("host", "hook")
        for _ in range(100):
            ready, unacked = await queue_counts(hook_queue)
            if ready + unacked >= 200:
                break
            await asyncio.sleep(0.1)
        # The backlog waits in RabbitMQ; rwatch holds at most `prefetch` of it (its memory bound).
        assert unacked <= prefetch, (ready, unacked)
        assert ready >= 200 - prefetch
        assert config.bus.prefetch == prefetch
        # Meanwhile the mirror has every change: the stall holds back only its own sink.
        engine = create_async_engine(async_url(config.sinks["mirror"].url.get_secret_value()))  # type: ignore[union-attr]
        try:
            for _ in range(100):
                names = {k: d.get("bk_host_name") for k, d in (await mirror_rows(engine, "host")).items()}
                if all(names.get(k) == "stall-5" for k in list(sim.state.objects("host"))[:40]):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the mirror fell behind while the webhook stalled")
        finally:
            await engine.dispose()
        assert (await queue_counts(mirror_queue))[0] == 0
        receiver.gate.set()
        last = {k: "stall-5" for k in list(sim.state.objects("host"))[:40]}
        await receiver.wait(lambda: all(receiver.live("host").get(k, {}).get("bk_host_name") == v
                                        for k, v in last.items()), timeout=120)
    assert total >= 240


def event(i: int, key: str, version: int, action: str = "update") -> Event:
    cursor = f"c-{key}-{version}"
    return Event(id=watch_event_id("host", cursor), resource="host", action=action,  # type: ignore[arg-type]
                 key=key, version=(version, 0), occurred_at=iso_utc(version), observed_at=iso_utc(version),
                 cursor=cursor, data={"bk_host_id": int(key), "n": i})


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_duplicates_replays_and_redeliveries_end_where_the_clean_stream_ends(seed: int) -> None:
    rng = random.Random(seed)
    stream = []
    for i in range(200):
        key = str(rng.randint(1, 12))
        stream.append(event(i, key, 1_700_000_000 + i, rng.choice(["create", "update", "update", "delete"])))
    dirty: list[Event] = []
    for i, e in enumerate(stream):
        dirty.append(e)
        roll = rng.random()
        if roll < 0.15:
            dirty.append(e)  # duplicate
        elif roll < 0.25 and i > 5:
            dirty.append(stream[rng.randint(0, i - 1)])  # replay of an older event
    cuts = sorted(rng.sample(range(1, len(dirty)), 15))
    batches = [dirty[a:b] for a, b in zip([0, *cuts], [*cuts, len(dirty)], strict=True)]
    redelivered = [b for batch in batches for b in ([batch, batch] if rng.random() < 0.2 else [batch])]

    async def deliver(batches: list[list[Event]]) -> dict[str, Any]:
        async with Receiver() as receiver:
            cfg = load_config(None, environ={})
            settings = cfg.sinks["webhook"].model_copy(update={"url": receiver.url, "enabled": True})
            sink = WebhookSink("hook", settings)  # type: ignore[arg-type]
            await sink.open()
            try:
                for batch in batches:
                    await sink.apply(batch)
            finally:
                await sink.close()
            return {k: v for k, v in receiver.state.items()}

    clean = await deliver([stream])
    assert await deliver(redelivered) == clean
