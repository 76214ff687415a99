"""The SQLite backend only: paths, files that are not databases, pragmas, memory, and another writer's lock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from rwatch.errors import StoreError
from rwatch.store.base import open_store
from tests.sql_helpers import assert_sqlite_pragmas
from tests.store.helpers import state


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
