"""SIGKILL of the consumer process mid-batch, several seeds: afterwards every sink equals the truth and no
event takes effect twice. Webhook deliveries are counted by webhook-id: a kill between delivery and ack
can deliver an event again (at-least-once), and the receiver's dedupe by that id keeps its effect single."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from tests.integration.harness import Daemon, MakeSetup, Receiver
from tests.integration.test_apply_e2e import MIX, TOPOLOGY, async_url, differences, seed_from_start, truth

pytestmark = [pytest.mark.amqp, pytest.mark.slow]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sigkill_of_the_consumer_mid_batch_leaves_every_sink_equal_to_cmdb(
    setups: MakeSetup, receiver: Receiver, seed: int
) -> None:
    rng = random.Random(seed)
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=seed, bizs=3, hosts=60)) as sim:
        setup = setups(sim.url, TOPOLOGY, extra=receiver.sink_toml(batch_max=50, concurrency=4))
        await seed_from_start(setup)
        watcher, consumer = Daemon(setup, role="watcher"), Daemon(setup, role="consumer")
        watcher.start()
        consumer.start()
        sim.load.set_mix(MIX)
        sim.load.start(rate=300, seed=seed)
        kills = 0
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.4, 1.5))
            consumer.signal(signal.SIGKILL)
            await consumer.wait()
            kills += 1
            consumer.start()
        await asyncio.sleep(0.5)
        sim.load.stop()
        engine = create_async_engine(async_url(setup.config().sinks["mirror"].url.get_secret_value()))  # type: ignore[union-attr]
        try:
            deadline = time.monotonic() + 120
            while problems := await differences(engine, setup, sim) + [
                f"webhook {r} differs" for r in TOPOLOGY if receiver.live(r) != truth(setup, sim, r)
            ]:
                assert time.monotonic() < deadline, "\n".join(problems)
                await asyncio.sleep(0.2)
        finally:
            await engine.dispose()
        assert await consumer.stop() == 0
        assert await watcher.stop() == 0
    duplicates = len(receiver.deliveries) - len(set(receiver.deliveries))
    print(f"\nseed={seed} kills={kills} webhook deliveries={len(receiver.deliveries)} "
          f"distinct={len(set(receiver.deliveries))} redelivered={duplicates}")
    # Each event took effect once: the receiver applied exactly the distinct ids, whatever came twice.
    assert sum(len(receiver.live(r)) for r in TOPOLOGY) > 100
