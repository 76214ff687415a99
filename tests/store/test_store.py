"""The cursor store. One contract suite runs on both backends (the ``store`` fixture is parametrised over
SQLite and PostgreSQL), so the two implementations are held to identical behaviour; SQLite-only behaviour
(pragmas, locking, directories) follows it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rwatch.cmdb.protocol import NO_EVENT_CURSOR, Cursor
from rwatch.errors import ConfigError, LeaseLost, PermanentError, StoreError, TransientError
from rwatch.store.backends import PostgresCursorStore, SqlCursorStore, SqliteCursorStore
from rwatch.store.base import CursorStore, StoreUrlError, open_store
from rwatch.store.records import BizSighting, CursorState
from tests.sql_helpers import assert_sqlite_pragmas, unreachable_pg_url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlCursorStore]:
    async with open_store(db_url) as opened:
        yield opened


def state(tenant: str = "0", resource: str = "host", n: int = 1) -> CursorState:
    version = (1_732_000_000 + n, n % 7)
    return CursorState(tenant, resource, f"cursor-{n}", version, float(version[0]), 1_732_600_000.5)


def test_sql_store_satisfies_the_protocol() -> None:
    chosen: CursorStore = open_store("sqlite:///x.db")
    assert isinstance(chosen, SqlCursorStore)


# --- the contract, on both backends ----------------------------------------------------------------------


async def test_load_of_an_unknown_resource_is_none(store: CursorStore) -> None:
    assert await store.load("0", "host") is None
    assert await store.states() == []


@pytest.mark.parametrize(
    "saved",
    [
        CursorState("0", "host", "MQ0yDTVm", (1_732_000_000, 3), 1_732_000_000.0, 1_732_600_000.123456),
        CursorState("0", "host", "not-a-cursor", None, None, 1_732_600_000.0),
        CursorState("0", "host", "x" * 4000, (2**40, 2**31), 1_732_600_000.987654321, 0.0),
        CursorState("租户", "object_instance", NO_EVENT_CURSOR, None, 5.25, 1.0),
    ],
    ids=["decoded", "undecoded", "long", "unicode"],
)
async def test_save_then_load_round_trips_exactly(store: CursorStore, saved: CursorState) -> None:
    await store.save(saved)
    assert await store.load(saved.tenant, saved.resource) == saved


async def test_save_overwrites(store: CursorStore) -> None:
    await store.save(state(n=1))
    await store.save(state(n=2))
    await store.save(CursorState("0", "host", "cursor-3", None, None, 9.0))
    assert await store.load("0", "host") == CursorState("0", "host", "cursor-3", None, None, 9.0)
    assert len(await store.states()) == 1


async def test_positions_are_per_tenant_and_per_resource(store: CursorStore) -> None:
    saved = [state("0", "host", 1), state("0", "biz", 2), state("t2", "host", 3)]
    for one in saved:
        await store.save(one)
    for one in saved:
        assert await store.load(one.tenant, one.resource) == one
    assert await store.load("t2", "biz") is None
    await store.save(state("t2", "host", 4))
    assert await store.load("0", "host") == saved[0]


async def test_states_lists_every_position_or_one_tenants(store: CursorStore) -> None:
    saved = [state("t2", "host", 1), state("0", "set", 2), state("0", "biz", 3)]
    for one in saved:
        await store.save(one)
    assert await store.states() == sorted(saved, key=lambda s: (s.tenant, s.resource))
    assert await store.states("0") == [saved[2], saved[1]]
    assert await store.states("nobody") == []


async def test_delete_forgets_the_position_but_not_the_gaps(store: CursorStore) -> None:
    await store.save(state("0", "host", 1))
    await store.save(state("0", "biz", 2))
    gap = await store.add_gap("0", "host", 10.0, 20.0, "cursor_expired")
    await store.delete("0", "host")
    assert await store.load("0", "host") is None
    assert await store.load("0", "biz") == state("0", "biz", 2)
    assert await store.gaps() == [gap]
    await store.delete("0", "host")  # forgetting twice is fine
    await store.delete("nobody", "nothing")


async def test_gaps_are_recorded_listed_and_filled(store: CursorStore) -> None:
    first = await store.add_gap("0", "host", 100.5, 200.25, "cursor_expired")
    second = await store.add_gap("0", "biz", 150.0, 150.0, "bootstrap")
    third = await store.add_gap("t2", "host", 1.0, 2.0, "cursor_expired")
    assert first.id < second.id < third.id
    assert (first.tenant, first.resource, first.start, first.end, first.reason, first.filled_at) == (
        "0", "host", 100.5, 200.25, "cursor_expired", None)
    assert first.recorded_at > 1_700_000_000

    assert await store.gaps() == [first, second, third]
    assert await store.gaps("0") == [first, second]
    assert await store.gaps(resource="host") == [first, third]
    assert await store.gaps("0", "host") == [first]

    await store.fill_gap(first.id, 300.0)
    assert await store.gaps() == [second, third]
    everything = await store.gaps(open_only=False)
    assert [g.id for g in everything] == [first.id, second.id, third.id]
    assert everything[0].filled_at == 300.0
    assert everything[0].recorded_at == first.recorded_at


async def test_filling_a_gap_again_keeps_the_first_time(store: CursorStore) -> None:
    gap = await store.add_gap("0", "host", 1.0, 2.0, "cursor_expired")
    await store.fill_gap(gap.id, 10.0)
    await store.fill_gap(gap.id, 20.0)  # a retry after an ambiguous failure is harmless
    (filled,) = await store.gaps(open_only=False)
    assert filled.filled_at == 10.0


async def test_filling_an_unknown_gap_is_a_permanent_error(store: CursorStore) -> None:
    with pytest.raises(PermanentError) as caught:
        await store.fill_gap(424242, 1.0)
    assert caught.value.fields()["gap_id"] == 424242


async def test_a_gap_cannot_end_before_it_starts(store: CursorStore) -> None:
    with pytest.raises(ValueError, match="ends before it starts"):
        await store.add_gap("0", "host", 2.0, 1.0, "cursor_expired")
    assert await store.gaps(open_only=False) == []


# --- leases and fenced saves (HA), on both backends --------------------------------------------------------

T0 = 1_732_600_000.0


async def test_acquire_a_free_lease_starts_at_fence_1_and_renewing_keeps_it(store: CursorStore) -> None:
    assert await store.acquire("0", "host", "a", 10.0, now=T0) == 1
    assert await store.acquire("0", "host", "a", 10.0, now=T0 + 3) == 1
    assert await store.acquire("0", "host", "a", 10.0, now=T0 + 12) == 1  # renewed at +3: lives until +13
    (lease,) = await store.leases()
    assert (lease.owner, lease.fence, lease.expires_at) == ("a", 1, T0 + 22)


async def test_another_owner_is_refused_while_the_lease_lives(store: CursorStore) -> None:
    assert await store.acquire("0", "host", "a", 10.0, now=T0) == 1
    assert await store.acquire("0", "host", "b", 10.0, now=T0 + 9.9) is None
    (lease,) = await store.leases()
    assert (lease.owner, lease.fence, lease.expires_at) == ("a", 1, T0 + 10)


async def test_take_over_after_expiry_increments_the_fence(store: CursorStore) -> None:
    assert await store.acquire("0", "host", "a", 10.0, now=T0) == 1
    assert await store.acquire("0", "host", "b", 10.0, now=T0 + 10) == 2
    assert await store.acquire("0", "host", "a", 10.0, now=T0 + 11) is None  # the old owner is out
    assert await store.acquire("0", "host", "b", 10.0, now=T0 + 15) == 2
    # Even the same owner coming back after its own lease expired gets a new fence: it may have been
    # taken and given back meanwhile, and its old fence must not match again.
    assert await store.acquire("0", "host", "b", 10.0, now=T0 + 40) == 3


async def test_leases_are_per_tenant_and_resource(store: CursorStore) -> None:
    assert await store.acquire("0", "host", "a", 10.0, now=T0) == 1
    assert await store.acquire("0", "biz", "b", 10.0, now=T0) == 1
    assert await store.acquire("1", "host", "b", 10.0, now=T0) == 1
    assert [(x.tenant, x.resource, x.owner) for x in await store.leases()] == [
        ("0", "biz", "b"), ("0", "host", "a"), ("1", "host", "b")]
    assert [x.resource for x in await store.leases("1")] == ["host"]


async def test_release_lets_another_owner_take_over_at_once(store: CursorStore) -> None:
    assert await store.acquire("0", "host", "a", 10.0) == 1
    await store.release("0", "host", "b")  # not b's: nothing happens
    assert await store.acquire("0", "host", "b", 10.0) is None
    await store.release("0", "host", "a")
    assert await store.acquire("0", "host", "b", 10.0) == 2
    await store.release("0", "nothing", "a")  # no lease at all: harmless


async def test_acquire_needs_a_positive_ttl(store: CursorStore) -> None:
    with pytest.raises(ValueError):
        await store.acquire("0", "host", "a", 0.0)


async def test_fenced_save_writes_while_the_fence_holds(store: CursorStore) -> None:
    fence = await store.acquire("0", "host", "a", 10.0)
    assert fence == 1
    await store.save(state(n=1), fence=fence)
    await store.save(state(n=2), fence=fence)
    assert await store.load("0", "host") == state(n=2)


async def test_fenced_save_with_a_stale_fence_raises_and_keeps_the_cursor(store: CursorStore) -> None:
    old = await store.acquire("0", "host", "a", 10.0, now=T0)
    assert old is not None
    await store.save(state(n=1), fence=old)
    new = await store.acquire("0", "host", "b", 10.0, now=T0 + 10)
    assert new == old + 1
    with pytest.raises(LeaseLost) as caught:
        await store.save(state(n=2), fence=old)
    assert isinstance(caught.value, PermanentError) and not isinstance(caught.value, TransientError)
    assert caught.value.fields()["fence"] == old
    assert await store.load("0", "host") == state(n=1)
    await store.save(state(n=3), fence=new)
    assert await store.load("0", "host") == state(n=3)


async def test_fenced_save_without_any_lease_raises_and_writes_nothing(store: CursorStore) -> None:
    with pytest.raises(LeaseLost):
        await store.save(state(n=1), fence=1)
    assert await store.load("0", "host") is None
    await store.acquire("0", "biz", "a", 10.0)  # another resource's lease does not count
    with pytest.raises(LeaseLost):
        await store.save(state(n=1), fence=1)
    assert await store.load("0", "host") is None


async def test_fenced_save_records_the_fence_and_unfenced_save_still_works(store: CursorStore) -> None:
    await store.acquire("0", "host", "a", 10.0)
    await store.save(state(n=1), fence=1)
    assert isinstance(store, SqlCursorStore)
    engine = store._live("test")
    async with engine.connect() as conn:
        from sqlalchemy import text

        assert (await conn.execute(text("SELECT fence FROM rwatch_cursors"))).scalar_one() == 1
    await store.save(state(n=2))  # fence=None: today's behaviour, no lease needed
    assert await store.load("0", "host") == state(n=2)


async def test_a_release_after_take_over_changes_nothing(store: CursorStore) -> None:
    assert await store.acquire("0", "host", "a", 10.0, now=T0) == 1
    assert await store.acquire("0", "host", "b", 10.0, now=T0 + 11) == 2
    await store.release("0", "host", "a")  # the old leader's clean stop, late
    assert await store.acquire("0", "host", "c", 10.0, now=T0 + 12) is None


@pytest.mark.parametrize("owners", [8])
async def test_concurrent_acquire_by_many_owners_has_exactly_one_winner(db_url: str, owners: int) -> None:
    # One store (connection pool) per owner, as separate processes would have: real concurrency on PostgreSQL.
    stores = [open_store(db_url) for _ in range(owners)]
    for s in stores:
        await s.open()
    try:
        for round_, now in enumerate((T0, T0 + 100, T0 + 200)):
            start = asyncio.Event()

            async def race(i: int, now: float = now, start: asyncio.Event = start) -> int | None:
                await start.wait()
                return await stores[i].acquire("0", "host", f"owner-{i}", 10.0, now=now)

            tasks = [asyncio.create_task(race(i)) for i in range(owners)]
            await asyncio.sleep(0.05)
            start.set()
            fences = await asyncio.gather(*tasks)
            won = [f for f in fences if f is not None]
            assert won == [round_ + 1], fences
            (lease,) = await stores[0].leases()
            assert lease.owner == f"owner-{fences.index(round_ + 1)}" and lease.fence == round_ + 1
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_fenced_saves_and_take_over_never_write_with_a_stale_fence(db_url: str) -> None:
    """An old leader saving in a loop while a new one takes over: once the take-over returned, no save of
    the old fence lands, and the cursor only ever holds what the fence holder at that time wrote."""
    async with open_store(db_url) as old_store, open_store(db_url) as new_store:
        old = await old_store.acquire("0", "host", "old", 10.0, now=T0)
        assert old == 1
        taken = asyncio.Event()
        late: list[int] = []

        async def old_leader() -> None:
            n = 0
            while True:
                n += 1
                after_take_over = taken.is_set()
                try:
                    await old_store.save(state(n=n), fence=old)
                except LeaseLost:
                    return
                if after_take_over:
                    late.append(n)

        task = asyncio.create_task(old_leader())
        await asyncio.sleep(0.2)
        assert await new_store.acquire("0", "host", "new", 10.0, now=T0 + 11) == 2
        taken.set()
        await asyncio.wait_for(task, 10)
        assert late == []  # a save begun after the take-over returned was refused, every time
        before = await new_store.load("0", "host")
        assert before is not None
        await new_store.save(state(n=10_000), fence=2)
        assert await old_store.load("0", "host") == state(n=10_000)


async def test_open_is_idempotent_and_stores_can_share_a_url(db_url: str) -> None:
    stores = [open_store(db_url) for _ in range(4)]
    try:
        # Racing openers on an empty database, and one store opened twice at once.
        await asyncio.gather(*(s.open() for s in stores), stores[0].open())
        await stores[0].open()
        await stores[1].save(state(n=5))
        assert await stores[3].load("0", "host") == state(n=5)
        gap = await stores[2].add_gap("0", "host", 1.0, 2.0, "bootstrap")
        assert await stores[0].gaps() == [gap]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_saved_positions_survive_close_and_reopen(db_url: str) -> None:
    async with open_store(db_url) as first:
        await first.save(state(n=7))
        gap = await first.add_gap("0", "host", 1.0, 2.0, "bootstrap")
    async with open_store(db_url) as second:
        assert await second.load("0", "host") == state(n=7)
        assert await second.gaps() == [gap]


async def test_concurrent_saves_of_many_resources(store: CursorStore) -> None:
    resources = [f"res{i}" for i in range(30)]
    await asyncio.gather(*(store.save(state("0", r, n)) for n, r in enumerate(resources)))
    assert await store.states() == sorted((state("0", r, n) for n, r in enumerate(resources)),
                                          key=lambda s: s.resource)


async def test_ping(store: CursorStore) -> None:
    await store.ping()


async def test_a_closed_store_raises_store_error(db_url: str) -> None:
    store = open_store(db_url)
    with pytest.raises(StoreError):
        await store.load("0", "host")  # never opened
    await store.open()
    await store.close()
    await store.close()  # closing twice is fine
    calls = [
        store.load("0", "host"),
        store.save(state()),
        store.delete("0", "host"),
        store.states(),
        store.add_gap("0", "host", 1.0, 2.0, "bootstrap"),
        store.gaps(),
        store.fill_gap(1, 1.0),
        store.ping(),
    ]
    for call in calls:
        with pytest.raises(StoreError) as caught:
            await call
        assert isinstance(caught.value, TransientError)
    with pytest.raises(StoreError) as caught:
        await store.save(state("t9", "biz"))
    assert caught.value.fields()["operation"] == "save"
    assert caught.value.fields()["tenant"] == "t9"
    assert caught.value.fields()["resource"] == "biz"


# --- crash safety: kill -9 at a random moment never loses an acknowledged save ---------------------------

SAVER = textwrap.dedent("""
    import asyncio, sys
    from rwatch.store.base import open_store
    from rwatch.store.records import CursorState

    async def main(url: str) -> None:
        store = open_store(url)
        await store.open()
        n = 0
        while True:
            n += 1
            await store.save(CursorState("0", "host", f"c{n}", (n, 0), float(n), float(n)))
            # printed only after save() returned: everything printed must survive the kill
            sys.stdout.write(f"saved {n}\\n")
            sys.stdout.flush()

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_kill_9_never_loses_an_acknowledged_save(db_url: str, seed: int) -> None:
    rng = random.Random(seed)
    target = rng.randint(1, 300)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SAVER, db_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    printed = 0
    try:
        while printed < target:
            line = await proc.stdout.readline()
            if not line:
                stderr = await proc.stderr.read() if proc.stderr else b""
                pytest.fail(f"the saver died early: {stderr.decode()[-2000:]}")
            if line.startswith(b"saved "):
                printed = int(line.split()[1])
        # The saver keeps going while the signal travels, so it dies at an arbitrary point of a save.
        proc.send_signal(signal.SIGKILL)
        rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    printed = max([printed, *(int(x.split()[1]) for x in rest.splitlines() if x.startswith(b"saved "))])

    async with open_store(db_url) as store:
        saved = await store.load("0", "host")
    assert saved is not None
    assert saved.version is not None
    # Never older than the last acknowledged save; at most the one that returned but was not yet printed.
    assert printed <= saved.version[0] <= printed + 1
    assert saved.cursor == f"c{saved.version[0]}"


# --- opening by URL --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("sqlite:///rwatch-state.db", SqliteCursorStore, "sqlite+aiosqlite:///rwatch-state.db"),
        ("sqlite:////var/lib/rwatch/state.db", SqliteCursorStore, "sqlite+aiosqlite:////var/lib/rwatch/state.db"),
        ("sqlite+aiosqlite:///a.db", SqliteCursorStore, "sqlite+aiosqlite:///a.db"),
        ("postgresql://rw:pw@db:5433/rwatch", PostgresCursorStore, "postgresql+asyncpg://rw:pw@db:5433/rwatch"),
        ("postgres://rw@db/rwatch", PostgresCursorStore, "postgresql+asyncpg://rw@db/rwatch"),
        ("postgresql+asyncpg://rw@db/rwatch", PostgresCursorStore, "postgresql+asyncpg://rw@db/rwatch"),
    ],
)
def test_open_store_picks_the_backend_by_scheme(url: str, kind: type[SqlCursorStore], target: str) -> None:
    chosen = open_store(url)
    assert type(chosen) is kind
    assert chosen.url.render_as_string(hide_password=False) == target


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "sqlite+pysqlite:///a.db", "", "not a url"]
)
def test_open_store_rejects_other_schemes(url: str) -> None:
    with pytest.raises(StoreUrlError) as caught:
        open_store(url)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, ConfigError)
    assert caught.value.key == "store.url"


def test_the_password_never_shows() -> None:
    chosen = open_store("postgresql://rw:hunter2@db/rwatch")
    assert "hunter2" not in repr(chosen)


async def test_an_unreachable_postgres_raises_store_error() -> None:
    store = open_store(unreachable_pg_url(), timeout=5)
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert caught.value.fields()["operation"] == "open"
    with pytest.raises(StoreError):
        await store.ping()


# --- SQLite only -----------------------------------------------------------------------------------------


async def test_sqlite_relative_path_is_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_store("sqlite:///deep/er/state.db") as store:
        await store.save(state())
    assert (tmp_path / "deep" / "er" / "state.db").is_file()


@pytest.mark.parametrize(
    "path", ["a-file/sub/state.db", "a-file", "a-dir"], ids=["no-directory", "not-a-database", "a-directory"]
)
async def test_sqlite_file_that_cannot_be_opened_raises_store_error(tmp_path: Path, path: str) -> None:
    (tmp_path / "a-file").write_text("this is a text file, not SQLite " * 10)
    (tmp_path / "a-dir").mkdir()
    store = open_store(f"sqlite:///{tmp_path}/{path}")
    before = set(threading.enumerate())
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert caught.value.fields()["operation"] == "open"
    # aiosqlite stops its worker thread after a failed connect without awaiting it; let the thread finish
    # while this loop still runs, or it reports "Event loop is closed" into a later test.
    for thread in set(threading.enumerate()) - before:
        await asyncio.to_thread(thread.join, 10)
    with pytest.raises(StoreError, match="not open"):
        await store.save(state())


async def test_sqlite_runs_wal_and_full_sync_on_every_connection(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/s.db", timeout=3) as store:
        assert store._engine is not None
        await assert_sqlite_pragmas(store._engine, 3000)


async def test_sqlite_in_memory_works_for_demos() -> None:
    async with open_store("sqlite://") as store:
        await asyncio.gather(*(store.save(state("0", f"r{i}")) for i in range(10)))
        assert len(await store.states()) == 10


async def test_sqlite_another_process_holding_the_write_lock(tmp_path: Path) -> None:
    """E.g. ``rwatch cursors reset`` mid-write while the daemon runs: readers go on, a writer waits."""
    path = tmp_path / "s.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.save(state(n=1))
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE rwatch_cursors SET cursor = 'uncommitted'")
            assert await store.states() == [state(n=1)]  # WAL: reading is not blocked
            saving = asyncio.ensure_future(store.save(state(n=2)))
            done, _ = await asyncio.wait({saving}, timeout=0.2)
            assert not done  # waiting on busy_timeout rather than failing
            other.execute("COMMIT")
            await saving
        finally:
            other.close()
        assert await store.load("0", "host") == state(n=2)


async def test_sqlite_lock_held_past_the_timeout_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_store(f"sqlite:///{path}", timeout=0.1) as store:
        await store.save(state(n=1))
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked") as caught:
                await store.save(state(n=2))
            assert caught.value.fields()["operation"] == "save"
        finally:
            other.execute("ROLLBACK")
            other.close()
        await store.save(state(n=3))  # transient: the retry succeeds
        assert await store.load("0", "host") == state(n=3)


# --- CursorState.from_cursor -----------------------------------------------------------------------------


def test_cursor_state_from_a_cursor_decodes_version_and_event_time() -> None:
    cursor = Cursor(2, "5ea6d3f394c1f5d986e9bd86", "update", 1_732_000_123, 4).encode()
    got = CursorState.from_cursor("0", "host", cursor, saved_at=5.0)
    assert got == CursorState("0", "host", cursor, (1_732_000_123, 4), 1_732_000_123.0, 5.0)


@pytest.mark.parametrize("cursor", ["garbage", NO_EVENT_CURSOR])
def test_cursor_state_from_an_opaque_cursor_has_no_version(cursor: str) -> None:
    got = CursorState.from_cursor("0", "host", cursor)
    assert (got.version, got.event_time) == (None, None)
    assert got.saved_at > 1_700_000_000


async def test_verify_results_keep_the_last_per_sink_and_resource(store: CursorStore) -> None:
    from rwatch.store.records import VerifyResult

    assert await store.verify_results() == []
    await store.record_verify([VerifyResult("0", "mirror", "host", 1, 2, 3, 100.0),
                               VerifyResult("0", "mirror", "biz", 0, 0, 0, 100.0),
                               VerifyResult("7", "mirror", "host", 0, 0, 1, 100.0)])
    await store.record_verify([VerifyResult("0", "mirror", "host", 0, 0, 0, 200.0)])  # the next run
    await store.record_verify([])
    got = await store.verify_results("0")
    assert [(r.resource, r.drift, r.checked_at) for r in got] == [("biz", 0, 100.0), ("host", 0, 200.0)]
    assert [(r.tenant, r.changed) for r in await store.verify_results("7")] == [("7", 1)]


async def test_a_call_whose_caller_is_cancelled_runs_to_its_end_and_leaves_no_lock(tmp_path: Path) -> None:
    """A lease keeper's timeout or a term's end cancels store calls mid-statement. The caller gets its
    CancelledError at once; the statement still finishes (here a fenced save, held behind another writer's
    lock), its connection returns clean, ``close`` waits for it, and the next writer is not blocked."""
    path = tmp_path / "state.db"
    store = open_store(f"sqlite:///{path}", timeout=5.0)
    await store.open()
    fence = await store.acquire("0", "host", "me", 300)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the save waits in busy_timeout
    call = asyncio.ensure_future(store.save(state(n=2), fence=fence))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 1.0)  # the caller is not held by the statement
    blocker.execute("COMMIT")
    blocker.close()
    await store.close()  # waits for the save still running
    async with open_store(f"sqlite:///{path}", timeout=0.5) as other:
        assert await other.load("0", "host") == state(n=2)  # the cancelled call's statement did finish
        await other.acquire("0", "plat", "other", 30)  # and left no lock behind


async def test_business_sightings_keep_the_newest_per_business(store: CursorStore) -> None:
    """The record a resync compares its business listing with: version-fenced, per tenant."""
    await store.note_businesses("0", [BizSighting(7, True, (100, 1), False), BizSighting(8, True, (100, 2), True)])
    await store.note_businesses("0", [BizSighting(7, False, (105, 1), False)])  # deleted later
    await store.note_businesses("0", [BizSighting(7, True, (101, 0), False)])  # an older listing: no effect
    await store.note_businesses("t2", [BizSighting(7, True, (90, 0), False)])
    # Two sightings of one business in one call: the newest is kept, whatever their order.
    await store.note_businesses("0", [BizSighting(9, False, (120, 0), False), BizSighting(9, True, (110, 0), False)])
    assert await store.businesses("0") == [BizSighting(7, False, (105, 1), False),
                                           BizSighting(8, True, (100, 2), True),
                                           BizSighting(9, False, (120, 0), False)]
    assert await store.businesses("t2") == [BizSighting(7, True, (90, 0), False)]
