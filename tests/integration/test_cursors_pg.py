"""The cursor store on a real PostgreSQL, beyond the shared contract.

The contract itself (tests/watch/test_cursors.py) already runs on PostgreSQL through its ``store``
fixture's ``postgres`` parameter; these are the failure modes only a server has: racing openers on an
empty database, a connection killed under the store, a statement stuck behind a lock.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from rwatch.errors import StoreError
from rwatch.store.base import open_store
from rwatch.store.records import CursorState

pytestmark = pytest.mark.postgres


def state(n: int) -> CursorState:
    return CursorState("0", "host", f"cursor-{n}", (1_732_000_000 + n, 0), 1_732_000_000.0 + n, 1.5e9)


async def test_many_racing_openers_on_an_empty_database(pg_url: str) -> None:
    stores = [open_store(pg_url) for _ in range(12)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await stores[5].save(state(1))
        assert await stores[11].load("0", "host") == state(1)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_schema_types(pg_url: str) -> None:
    async with open_store(pg_url):
        pass
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name LIKE 'rwatch_%' ORDER BY table_name, ordinal_position"
        )
    finally:
        await conn.close()
    got = {(r["table_name"], r["column_name"]): (r["data_type"], r["is_nullable"]) for r in rows}
    assert got[("rwatch_cursors", "tenant")] == ("text", "NO")
    assert got[("rwatch_cursors", "version_s")] == ("bigint", "YES")
    assert got[("rwatch_cursors", "event_time")] == ("double precision", "YES")
    assert got[("rwatch_cursors", "saved_at")] == ("double precision", "NO")
    assert got[("rwatch_cursors", "fence")] == ("bigint", "YES")
    assert got[("rwatch_gaps", "id")] == ("bigint", "NO")
    assert got[("rwatch_gaps", "filled_at")] == ("double precision", "YES")


async def test_a_killed_connection_fails_one_call_then_recovers(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        await store.save(state(1))
        admin = await asyncpg.connect(pg_url)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'rwatch' AND datname = current_database()"
            )
        finally:
            await admin.close()
        assert killed >= 1
        with pytest.raises(StoreError) as caught:
            await store.save(state(2))
        assert caught.value.fields()["operation"] == "save"
        # The dead pool is discarded on the first failure, so the caller's retry succeeds.
        await store.save(state(3))
        assert await store.load("0", "host") == state(3)


async def test_a_save_stuck_behind_a_row_lock_times_out_as_store_error(pg_url: str) -> None:
    async with open_store(pg_url, timeout=0.5) as store:
        await store.save(state(1))
        other = await asyncpg.connect(pg_url)
        try:
            lock = other.transaction()
            await lock.start()
            await other.execute("SELECT * FROM rwatch_cursors FOR UPDATE")
            with pytest.raises(StoreError) as caught:
                await store.save(state(2))
            assert caught.value.fields()["resource"] == "host"
            await lock.rollback()
        finally:
            await other.close()
        await store.save(state(3))
        assert await store.load("0", "host") == state(3)
