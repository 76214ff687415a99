"""High availability: two ``rwatch run --role watcher`` processes on one PostgreSQL store and one exchange.

The first holds every resource's lease; the second waits. SIGKILL the holder mid-stream: the standby must
take every resource over within 15 s of the kill (default ``lease_ttl`` 10 s, tried every ttl/3), lose
nothing, and never have two long-polls of one resource open at the simulator at any instant.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import text

from rwatch import metrics as m
from rwatch.errors import StoreError
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.backends import PostgresCursorStore, SqlCursorStore
from rwatch.store.base import open_store
from rwatch.store.records import CursorState
from tests.integration.harness import Daemon, MakeSetup, Setup, reading, running, watcher_parts
from tests.integration.test_watch_e2e import wait_long_polling
from tests.integration.test_watch_process import RESOURCES, audit, settle

pytestmark = [pytest.mark.amqp, pytest.mark.postgres, pytest.mark.slow]

TAKE_OVER_WITHIN = 15.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01, seed=23, bizs=3, hosts=80)) as s:
        yield s


async def wait_logged(daemon: Daemon, event: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for e in daemon.log_events() if e.get("event") == event) < count:
        assert daemon.running, f"rwatch exited: see {daemon.log}"
        assert time.monotonic() < deadline, f"{count} x {event!r} not logged within {timeout} s ({daemon.log})"
        await asyncio.sleep(0.1)


async def until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        await asyncio.sleep(0.02)


async def cursor_fences(store: SqlCursorStore) -> dict[str, int | None]:
    return {res: fence for res, (_, fence) in (await cursor_rows(store)).items()}


async def cursor_rows(store: SqlCursorStore) -> dict[str, tuple[str, int | None]]:
    async with store._live("test").connect() as conn:
        rows = (await conn.execute(text("SELECT resource, cursor, fence FROM rwatch_cursors"))).all()
    return {r.resource: (r.cursor, r.fence) for r in rows}


async def leader_and_standby(sim: Simulator, setup: Setup, env: dict[str, str] | None = None) -> tuple[Daemon, Daemon]:
    """Two `rwatch run` processes on one store: the first long-polling every resource, the second queued."""
    leader, standby = Daemon(setup, env=env), Daemon(setup, env=env)
    standby.log = setup.tmp / f"rwatch-{setup.unique}-standby.log"
    leader.start()
    await wait_long_polling(sim, RESOURCES)
    standby.start()
    await wait_logged(standby, "lease_waiting", len(RESOURCES))
    return leader, standby


async def test_standby_takes_over_within_15_s_of_the_leaders_death_and_loses_nothing(
    sim: Simulator, setups: MakeSetup, pg_url: str
) -> None:
    setup = setups(sim.url, RESOURCES, store_url=pg_url)
    leader, standby = await leader_and_standby(sim, setup)
    async with open_store(pg_url) as store, reading(setup) as reader:
        leases = await store.leases()
        assert sorted(lease.resource for lease in leases) == sorted(RESOURCES)
        owners = {lease.owner for lease in leases}
        assert len(owners) == 1, owners
        (old_owner,) = owners
        assert leader.proc is not None and int(old_owner.split(":")[1]) == leader.proc.pid
        old_fences = {lease.resource: lease.fence for lease in leases}

        sim.stats.reset()  # from here on, at most one long-poll per resource may ever be open
        sim.load.start(rate=300, seed=5)
        await asyncio.sleep(2.0)
        leader.signal(signal.SIGKILL)
        killed = time.monotonic()
        await leader.wait()

        # Taken over = the standby holds the lease (seen in the store) and a watch request of the resource
        # completed after that (the dead leader's last parked poll may still complete at the simulator once).
        polls_at_take_over: dict[str, int] = {}
        took: dict[str, float] = {}
        while len(took) < len(RESOURCES) and time.monotonic() - killed < TAKE_OVER_WITHIN + 10:
            held = {lease.resource for lease in await store.leases() if lease.owner != old_owner}
            for res in RESOURCES:
                if res in held and res not in polls_at_take_over:
                    polls_at_take_over[res] = sim.stats.watch_requests(res)
                elif res in polls_at_take_over and res not in took \
                        and sim.stats.watch_requests(res) > polls_at_take_over[res]:
                    took[res] = time.monotonic() - killed
            await asyncio.sleep(0.05)
        print(f"\ntake-over after kill (s): { {r: round(t, 2) for r, t in sorted(took.items())} }")
        assert set(took) == set(RESOURCES), f"not taken over: {set(RESOURCES) - set(took)}"
        assert max(took.values()) <= TAKE_OVER_WITHIN, took

        await asyncio.sleep(2.0)  # the stream keeps flowing through the new leader
        sim.load.stop()
        await settle(sim, reader)
        audit(sim, reader)  # every chain event, in order, from the first one published

        leases = await store.leases()
        assert {lease.owner for lease in leases} != {old_owner}
        assert all(lease.owner != old_owner for lease in leases)
        new_fences = {lease.resource: lease.fence for lease in leases}
        assert all(new_fences[r] == old_fences[r] + 1 for r in RESOURCES), (old_fences, new_fences)
        # Cursors saved since the take-over carry the new leader's fence.
        saved = await cursor_fences(store)
        assert any(saved.get(r) == new_fences[r] for r in RESOURCES), (saved, new_fences)
        assert all(saved[r] in (old_fences[r], new_fences[r]) for r in saved), (saved, new_fences)

        assert await standby.stop() == 0
    over = {r: n for r, n in sim.stats.inflight_max.items() if n > 1}
    assert not over, f"two long-polls of one resource at once: {over}"
    events = [e.get("event") for e in standby.log_events()]
    assert events.count("lease_acquired") == len(RESOURCES)
    assert events.count("lease_released") == len(RESOURCES)


async def test_a_clean_stop_hands_the_leases_over_at_once(
    sim: Simulator, setups: MakeSetup, pg_url: str
) -> None:
    setup = setups(sim.url, RESOURCES, store_url=pg_url)
    leader, standby = await leader_and_standby(sim, setup)
    async with reading(setup) as reader:
        sim.stats.reset()
        sim.load.start(rate=300, seed=6)
        await asyncio.sleep(1.5)
        stopped = time.monotonic()
        assert await leader.stop() == 0
        # Released on the way out: the standby's next try (every ttl/3 = 3.3 s) takes over.
        await wait_logged(standby, "lease_acquired", len(RESOURCES), timeout=10)
        assert time.monotonic() - stopped < 8.0
        await asyncio.sleep(1.0)
        sim.load.stop()
        await settle(sim, reader)
        duplicates = audit(sim, reader)
        assert await standby.stop() == 0
    # The leader saved the cursor of everything it published before releasing: nothing comes twice.
    assert sum(duplicates.values()) == 0, duplicates
    over = {r: n for r, n in sim.stats.inflight_max.items() if n > 1}
    assert not over, f"two long-polls of one resource at once: {over}"


async def test_a_paused_leader_wakes_up_without_polling_or_saving_after_the_take_over(
    sim: Simulator, setups: MakeSetup, pg_url: str
) -> None:
    """SIGSTOP the leader past its lease, let the standby take over, SIGCONT it: the old leader must not
    open another long-poll nor move a cursor; it queues for the leases instead."""
    ttl = {"RWATCH_WATCH__LEASE_TTL": "3s"}
    setup = setups(sim.url, RESOURCES, store_url=pg_url)
    leader, standby = await leader_and_standby(sim, setup, env=ttl)
    async with open_store(pg_url) as store, reading(setup) as reader:
        assert isinstance(store, SqlCursorStore)
        (old_owner,) = {lease.owner for lease in await store.leases()}
        sim.stats.reset()
        sim.load.start(rate=300, seed=7)
        await asyncio.sleep(1.0)
        leader.signal(signal.SIGSTOP)
        await wait_logged(standby, "lease_acquired", len(RESOURCES), timeout=15)
        await asyncio.sleep(1.5)  # the new leader saves under its fences
        new_fences = {lease.resource: lease.fence for lease in await store.leases()}
        assert all(lease.owner != old_owner for lease in await store.leases())
        before = await cursor_rows(store)
        leader.signal(signal.SIGCONT)
        await wait_logged(leader, "lease_lost", len(RESOURCES), timeout=10)
        await wait_logged(leader, "lease_waiting", len(RESOURCES), timeout=10)
        await asyncio.sleep(1.0)
        # Every cursor is the new leader's (its fence) or untouched since before the old one woke up.
        after = await cursor_rows(store)
        moved = {r: row for r, row in after.items() if row[1] != new_fences[r] and before.get(r) != row}
        assert not moved, f"the old leader moved cursors after the take-over: {moved} ({new_fences})"
        sim.load.stop()
        await settle(sim, reader)
        audit(sim, reader)
        assert all(lease.owner != old_owner for lease in await store.leases())
        assert await standby.stop() == 0
        assert await leader.stop() == 0
    over = {r: n for r, n in sim.stats.inflight_max.items() if n > 1}
    assert not over, f"two long-polls of one resource at once: {over}"
    reasons = sorted({e.get("reason") for e in leader.log_events() if e.get("event") == "lease_lost"})
    print(f"\nold leader's lease_lost reasons: {reasons}")


# --- one Watcher in process: what it does when its lease goes ----------------------------------------------


class FlakyStore(PostgresCursorStore):
    """The real store, whose lease calls hang while it is cut off (a partition from the store), until it is
    reachable again or the store's own timeout (10 s) passes."""

    def __init__(self, inner: PostgresCursorStore) -> None:
        self.__dict__.update(inner.__dict__)
        self.reachable = asyncio.Event()
        self.reachable.set()
        self.saves: list[tuple[CursorState, int | None]] = []

    async def acquire(self, tenant: str, resource: str, owner: str, ttl: float, *,
                      now: float | None = None) -> int | None:
        try:
            await asyncio.wait_for(self.reachable.wait(), 10.0)
        except TimeoutError:
            raise StoreError("unreachable") from None
        return await super().acquire(tenant, resource, owner, ttl, now=now)

    async def save(self, state: CursorState, *, fence: int | None = None) -> None:
        self.saves.append((state, fence))
        await super().save(state, fence=fence)


async def test_a_watcher_whose_lease_is_taken_stops_polling_at_once_and_queues_again(
    sim: Simulator, setups: MakeSetup, pg_url: str
) -> None:
    ttl = 1.5
    setup = setups(sim.url, ["host"], store_url=pg_url)
    async with watcher_parts(setup) as parts, running(parts.watcher("host", owner="me", lease_ttl=ttl)) as w:
        await wait_long_polling(sim, ["host"])
        assert w.fence == 1
        sim.load.start(rate=50, mix={"host.update": 1.0}, seed=3)
        await asyncio.sleep(1.0)
        # Another owner takes the lease as if ours had expired (its clock is ahead by more than the TTL).
        assert await parts.store.acquire("0", "host", "thief", ttl, now=time.time() + ttl + 0.1) == 2
        thief_until = time.time() + 2 * ttl + 0.1
        taken = time.monotonic()
        await until(lambda: w.fence is None, timeout=ttl)  # the next renewal noticed
        assert time.monotonic() - taken <= ttl / 3 + 0.3
        # The abandoned long-poll ends at the simulator by its hold (1 s) at the latest; none follows it.
        await sim.stats.wait_for(lambda s: s.in_flight("host") == 0, timeout=1.5)
        saved = await parts.store.load("0", "host")
        polls = sim.stats.watch_requests("host")
        await asyncio.sleep(ttl)  # the thief's lease lives on: no poll, no save
        assert sim.stats.watch_requests("host") == polls
        assert await parts.store.load("0", "host") == saved
        await asyncio.sleep(max(0.0, thief_until - time.time()))  # then it lapses: the watcher takes it back
        await wait_long_polling(sim, ["host"], timeout=5)
        assert w.fence == 3
        sim.load.stop()


async def test_a_watcher_that_cannot_renew_stops_before_its_lease_expires(
    sim: Simulator, setups: MakeSetup, pg_url: str
) -> None:
    ttl = 3.0
    setup = setups(sim.url, ["host"], store_url=pg_url)
    async with watcher_parts(setup) as parts:
        assert isinstance(parts.store, PostgresCursorStore)
        flaky = FlakyStore(parts.store)
        async with running(parts.watcher("host", owner="me", lease_ttl=ttl, store=flaky)) as w:
            await wait_long_polling(sim, ["host"])
            sim.load.start(rate=50, mix={"host.update": 1.0}, seed=4)
            await asyncio.sleep(0.5)
            flaky.reachable.clear()
            cut = time.time()
            (lease,) = await parts.store.leases()
            # Polling stops by the lease's expiry minus ttl/3 at the latest.
            await until(lambda: w.fence is None, timeout=ttl)
            stopped = time.time()
            assert stopped <= lease.expires_at - ttl / 3 + 0.2, (stopped - cut, lease.expires_at - cut)
            await sim.stats.wait_for(lambda s: s.in_flight("host") == 0, timeout=1.5)
            saves = len(flaky.saves)
            await asyncio.sleep(lease.expires_at - time.time() + 0.2)
            assert sim.stats.in_flight("host") == 0 and len(flaky.saves) == saves
            # Another process takes over; the store comes back: the watcher waits its turn.
            assert await parts.store.acquire("0", "host", "other", ttl) == 2
            flaky.reachable.set()
            await asyncio.sleep(ttl / 3 + 0.5)
            assert w.fence is None and sim.stats.in_flight("host") == 0
            await parts.store.release("0", "host", "other")
            await wait_long_polling(sim, ["host"], timeout=ttl)
            assert w.fence == 3
            sim.load.stop()
        assert all(fence in (1, 3) for _, fence in flaky.saves)


async def test_a_save_refused_for_a_stale_fence_ends_the_term_without_waiting_for_the_renewal(
    sim: Simulator, setups: MakeSetup, pg_url: str
) -> None:
    ttl = 9.0  # renewals every 3 s: the refused save must be what stops the watcher, long before that
    setup = setups(sim.url, ["host"], store_url=pg_url)
    refused = m.LEASE_LOSSES.labels("host", "fence_refused")
    before = refused._value.get()
    async with watcher_parts(setup) as parts, running(parts.watcher("host", owner="me", lease_ttl=ttl)) as w:
        await wait_long_polling(sim, ["host"])
        assert w.fence == 1
        sim.load.start(rate=100, mix={"host.update": 1.0}, seed=5)
        await asyncio.sleep(0.3)
        assert await parts.store.acquire("0", "host", "thief", ttl, now=time.time() + ttl + 0.1) == 2
        await until(lambda: w.fence is None, timeout=2.0)
        assert refused._value.get() == before + 1
        kept = await parts.store.load("0", "host")
        await sim.stats.wait_for(lambda s: s.in_flight("host") == 0, timeout=1.5)
        await asyncio.sleep(0.5)
        assert await parts.store.load("0", "host") == kept  # the old leader saved nothing more
        sim.load.stop()
