"""rwatch as a process: SIGTERM and SIGKILL mid-stream, restarts, and nothing missing afterwards.

The simulator runs in the test's event loop; rwatch runs as ``rwatch run --role watcher`` in a child
process, killed at seeded random moments and at the fail point between the broker's confirm and the
cursor save. The oracle: after the last restart, every event of the simulator's chain (from rwatch's
first answer on) is in the queues; duplicates are counted and bounded by one batch per kill.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator

import pytest

from rwatch.events import watch_event_id
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from tests.integration.harness import Daemon, MakeSetup, QueueReader, chain_suffix_from, dedupe, reading
from tests.integration.test_watch_e2e import wait_long_polling

pytestmark = [pytest.mark.amqp, pytest.mark.slow]

RESOURCES = ["host", "host_relation", "module", "set", "biz"]
BATCH = 200  # the server's page: the most a kill can make rwatch publish twice, per resource


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=11, bizs=3, hosts=80)) as s:
        yield s


async def settle(sim: Simulator, reader: QueueReader, timeout: float = 90) -> None:
    def done(r: QueueReader) -> bool:
        ids = {e["id"] for res in RESOURCES for e in r.events[res]}
        return all(not sim.state.chain(res) or
                   watch_event_id(res, sim.state.chain(res)[-1].cursor) in ids for res in RESOURCES)

    await reader.wait_for(done, timeout=timeout)


def audit(sim: Simulator, reader: QueueReader) -> dict[str, int]:
    """Nothing missing, first occurrences in chain order; returns the duplicates per resource."""
    duplicates = {}
    for res in RESOURCES:
        got = reader.events[res]
        unique_events = dedupe(got)
        expected = chain_suffix_from(sim.state.chain(res), got[0]["cursor"])
        assert [e["cursor"] for e in unique_events] == [n.cursor for n in expected], f"{res}: missing or reordered"
        duplicates[res] = len(got) - len(unique_events)
    return duplicates


async def test_sigterm_mid_stream_exits_0_and_restart_misses_nothing(
    sim: Simulator, setups: MakeSetup
) -> None:
    setup = setups(sim.url, RESOURCES)
    daemon = Daemon(setup)
    daemon.start()
    await wait_long_polling(sim, RESOURCES)
    async with reading(setup) as reader:
        sim.load.start(rate=400)
        await asyncio.sleep(1.5)
        assert await daemon.stop() == 0
        events = [e.get("event") for e in daemon.log_events()]
        assert events.count("startup") == 1 and events.count("shutdown") == 1
        await asyncio.sleep(0.5)  # changes keep coming while rwatch is down
        daemon.start()
        await asyncio.sleep(1.0)
        sim.load.stop()
        await settle(sim, reader)
        assert await daemon.stop() == 0
        duplicates = audit(sim, reader)
    # A clean stop saves the cursor of everything it published: nothing comes twice.
    assert sum(duplicates.values()) == 0, duplicates


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_sigkill_at_random_moments_loses_nothing(
    sim: Simulator, setups: MakeSetup, seed: int
) -> None:
    rng = random.Random(seed)
    # A killed process's leases stay its until they expire: a short lease keeps the restarts from waiting out the
    # 10 s default three times (the wait itself is test_ha's subject, not this test's).
    setup = setups(sim.url, RESOURCES, watch="lease_ttl = 3")
    daemon = Daemon(setup)
    daemon.start()
    await wait_long_polling(sim, RESOURCES)
    kills = 0
    async with reading(setup) as reader:
        sim.load.start(rate=300, seed=seed)
        for round_ in range(3):
            if seed % 2 == 0 and round_ == 1:
                # Crash exactly between the broker's confirm and the cursor save.
                daemon.signal(signal.SIGTERM)
                await daemon.wait()
                daemon.start(env={"RWATCH_FAILPOINTS": f"watch.after_publish=kill@{rng.randint(2, 6)}"})
                assert await daemon.wait(timeout=60) == -signal.SIGKILL
            else:
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                daemon.signal(signal.SIGKILL)
                await daemon.wait()
            kills += 1
            daemon.start()
            await asyncio.sleep(rng.uniform(0.3, 1.0))
        sim.load.stop()
        await settle(sim, reader)
        assert await daemon.stop() == 0
        duplicates = audit(sim, reader)
    print(f"\nseed={seed} kills={kills} events={sum(len(reader.events[r]) for r in RESOURCES)} "
          f"duplicates={duplicates}")
    for res, dups in duplicates.items():
        assert dups <= kills * BATCH, f"{res}: {dups} duplicates after {kills} kills"
    if seed % 2 == 0:
        # The fail point fired after a confirm and before the save: that batch must have come twice,
        # which proves the crash landed where it was meant to.
        assert sum(duplicates.values()) > 0
