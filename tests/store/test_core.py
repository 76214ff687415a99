"""The store's life, on both backends: opening (racing, twice), reopening, closing, errors as StoreError, and
calls that run to their end when their caller is cancelled."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from rwatch.errors import StoreError, TransientError
from rwatch.store.base import CursorStore, open_store
from tests.store.helpers import state


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
