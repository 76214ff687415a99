"""Test helpers for the SQL-backed parts (the cursor store and the mirror sink)."""

from __future__ import annotations

import socket

from sqlalchemy.ext.asyncio import AsyncEngine


async def assert_sqlite_pragmas(engine: AsyncEngine, busy_ms: int) -> None:
    """Every pooled connection runs WAL, synchronous=FULL and the busy timeout."""
    async with engine.connect() as one, engine.connect() as two:  # two pooled connections
        for conn in (one, two):
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2  # FULL
            assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == busy_ms


def unreachable_pg_url() -> str:
    """A PostgreSQL URL on a local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/test"
