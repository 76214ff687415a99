"""The SQL plumbing's first open: the SQLite race of openers on a new file is retried, nothing else is."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rwatch.store import sql


def refusals(*messages: str) -> tuple[list[int], Callable[[AsyncEngine], Awaitable[None]]]:
    """A set-up failing with each message in turn (then succeeding), and the list counting its calls."""
    calls: list[int] = []

    async def setup(engine: AsyncEngine) -> None:
        calls.append(1)
        if len(calls) <= len(messages):
            raise OperationalError("PRAGMA journal_mode = WAL", {}, sqlite3.OperationalError(messages[len(calls) - 1]))

    return calls, setup


def sqlite_at(tmp_path: Path) -> AsyncEngine:
    return sql.sqlite_engine(sql.async_url(f"sqlite:///{tmp_path}/s.db", key="store.url"), timeout=1.0)


async def test_a_locked_sqlite_file_is_tried_again_until_the_setup_passes(tmp_path: Path) -> None:
    calls, setup = refusals("database is locked", "database is locked")
    engine = sqlite_at(tmp_path)
    assert await sql.first_connect(engine, setup, timeout=5.0) is engine
    assert len(calls) == 3
    await engine.dispose()


async def test_a_sqlite_lock_that_outlasts_the_timeout_is_raised(tmp_path: Path) -> None:
    calls, setup = refusals(*["database is locked"] * 1000)
    started = time.monotonic()
    with pytest.raises(OperationalError, match="locked"):
        await sql.first_connect(sqlite_at(tmp_path), setup, timeout=0.2)
    assert 1 < len(calls) < 1000
    assert time.monotonic() - started < 0.2 + 0.5 + 0.5  # the timeout, one pause at most, slack for a busy host


async def test_other_errors_are_raised_at_once(tmp_path: Path) -> None:
    calls, setup = refusals("disk I/O error")
    with pytest.raises(OperationalError, match="disk I/O error"):
        await sql.first_connect(sqlite_at(tmp_path), setup, timeout=5.0)
    assert len(calls) == 1


async def test_postgresql_is_never_retried_here() -> None:
    calls, setup = refusals("database is locked")
    engine = create_async_engine("postgresql+asyncpg://u@127.0.0.1:1/db")  # never connects: setup is fake
    with pytest.raises(OperationalError):
        await sql.first_connect(engine, setup, timeout=5.0)
    assert len(calls) == 1
