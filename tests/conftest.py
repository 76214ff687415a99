"""Shared fixtures: real RabbitMQ and PostgreSQL, each test in its own namespace.

Locally a missing service skips the tests that need it; with CI=true it fails them: CI must never go
green by skipping the suites that talk to real servers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

AMQP_URL = os.environ.get("RWATCH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("RWATCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _require(url: str, port: int, what: str) -> None:
    if _reachable(url, port):
        return
    if IN_CI:
        pytest.fail(f"{what} is not reachable at {url} and CI=true: the real-server suite must run")
    pytest.skip(f"{what} is not reachable at {url}")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    _require(AMQP_URL, 5672, "RabbitMQ")
    return AMQP_URL


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    _require(PG_URL, 5432, "PostgreSQL")
    return PG_URL


@pytest.fixture
def unique() -> str:
    """A short random name part, so tests never share exchanges, queues, schemas or files."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def pg_url(pg_server_url: str, unique: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import asyncpg

    name = f"rwatch_t_{unique}"
    base = pg_server_url

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    parts = urlsplit(base)
    try:
        yield parts._replace(path=f"/{name}").geturl()
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database on each SQL backend rwatch has: a SQLite file in a directory that does not exist yet (opening
    must create it), then a fresh PostgreSQL database."""
    # A sync fixture: pg_url runs its own event loop to create the database.
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/rwatch.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def amqp_connection(amqp_url: str) -> AsyncIterator[object]:
    import aio_pika

    conn = await aio_pika.connect(amqp_url)
    try:
        yield conn
    finally:
        await conn.close()
