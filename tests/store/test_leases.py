"""Leases and fenced saves (high availability), on both backends: one holder, a fence that only grows, no save
with a stale fence."""

from __future__ import annotations

import asyncio

import pytest

from rwatch.errors import LeaseLost, PermanentError, TransientError
from rwatch.store.backends import SqlCursorStore
from rwatch.store.base import CursorStore, open_store
from tests.store.helpers import T0, state


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
