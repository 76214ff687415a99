"""The database plumbing the cursor store and the SQL mirror share: URLs, engines, opening, upserts, errors.

Both speak SQLAlchemy Core on async drivers only (``sqlite+aiosqlite``, ``postgresql+asyncpg``). What is
theirs stays with them: schemas, queries, transaction style (the store autocommits single statements, the
mirror runs explicit transactions) and how a database error is classified.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from sqlalchemy import Table, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from tenacity import retry_if_exception

from rwatch.config import mask_url
from rwatch.errors import ConfigError
from rwatch.retry import SQLITE_OPEN, retrying

_USE = "use sqlite:///path or postgresql://..."

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Inflight:
    """Database calls whose callers were cancelled, running to their end (see ``whole``)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    async def run(self, call: Coroutine[Any, Any, _R]) -> _R:
        task = asyncio.ensure_future(call)
        self._tasks.add(task)
        task.add_done_callback(self._settled)
        return await asyncio.shield(task)

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the calls still running (before the engine is disposed of)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def _settled(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure whose caller was gone is not "never retrieved" noise


class _HasInflight(Protocol):
    _inflight: Inflight


def whole(method: Callable[_P, Coroutine[Any, Any, _R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Run a database call to its end even when its caller is cancelled (a lease keeper's timeout, a term
    ending, a stop, a lost broker connection that cancels the consumer mid-apply): the caller gets its
    ``CancelledError`` at once, the transaction commits or rolls back and its connection goes back to the pool
    clean. Cancelled mid-statement, the aiosqlite connection is torn down with its transaction still open, and
    SQLite keeps that write lock until the process ends: every later write answers "database is locked" (the
    chaos suite's seed 76 in the store, seed 22 in the mirror). The owner (``self``) holds an ``Inflight`` as
    ``_inflight`` and settles it before disposing of its engine. A lock the call needs is taken inside it, so
    a cancelled caller does not release it under a transaction still running."""

    @functools.wraps(method)
    async def run_whole(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        owner: _HasInflight = args[0]  # type: ignore[assignment]
        return await owner._inflight.run(method(*args, **kwargs))

    return run_whole


class DatabaseUrlError(ConfigError, ValueError):
    """A database URL names no backend rwatch has (``sqlite:///path`` or ``postgresql://...``)."""


def async_url(url: str, *, key: str, what: str = "database",
              error: type[DatabaseUrlError] = DatabaseUrlError) -> URL:
    """``url`` with its async driver: ``sqlite[+aiosqlite]`` or ``postgres[ql][+asyncpg]``, else ``error`` (a
    ConfigError for ``key``; ``what`` names the URL in the message, which never shows a password)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise error(f"{mask_url(url)!r} is not a URL ({_USE})", key=key) from None
    scheme, _, driver = parsed.drivername.partition("+")
    if scheme == "sqlite" and driver in ("", "aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite")
    if scheme in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise error(f"unsupported {what} URL scheme {parsed.drivername!r} ({_USE})", key=key)


# Both dialects' insert() has on_conflict_do_update (and .excluded).
_DIALECT_INSERTS: dict[str, Callable[[Table], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


def upsert_insert(backend: str, table: Table) -> Any:
    """An INSERT into ``table`` in ``backend``'s dialect, the one that has ``on_conflict_do_update``."""
    return _DIALECT_INSERTS[backend](table)


def sqlite_path(url: URL) -> str | None:
    """The file a SQLite URL names; None for an in-memory database."""
    database = url.database
    return None if not database or database == ":memory:" else database


def sqlite_engine(url: URL, *, timeout: float, on_not_wal: Callable[[str], None] | None = None,
                  **kwargs: Any) -> AsyncEngine:
    """A SQLite engine whose every connection waits ``timeout`` for locks and runs WAL + synchronous=FULL
    (a returned commit survives kill -9 and power loss). The file's directory is created. ``on_not_wal``
    gets the journal mode a file database ended up in when it is not WAL; ``kwargs`` go to the engine."""
    path = sqlite_path(url)
    if path is not None and not path.startswith("file:"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": timeout}, **kwargs)
    busy_ms = int(timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            # busy_timeout first, so the switch to WAL waits for another process instead of failing.
            cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cur.execute("PRAGMA journal_mode = WAL")
            mode = cur.fetchone()[0]
            cur.execute("PRAGMA synchronous = FULL")
        finally:
            cur.close()
        if mode != "wal" and path is not None and on_not_wal is not None:
            on_not_wal(mode)

    return engine


def postgres_engine(url: URL, *, timeout: float, application_name: str, **kwargs: Any) -> AsyncEngine:
    """A PostgreSQL engine: ``timeout`` bounds connecting and every statement. No pool_pre_ping (a round trip
    per use): a dead pooled connection fails one call, which the caller retries, and the pool drops it."""
    return create_async_engine(
        url,
        connect_args={"timeout": timeout, "command_timeout": timeout,
                      "server_settings": {"application_name": application_name}},
        **kwargs,
    )


async def first_connect(engine: AsyncEngine, setup: Callable[[AsyncEngine], Awaitable[None]], *,
                        timeout: float) -> AsyncEngine:
    """Run ``setup(engine)`` (create the schema), disposing of the engine if it fails for good.

    SQLite openers racing on a brand-new file can get SQLITE_BUSY from the switch to WAL without the busy
    handler being consulted (seen ~1 in 12 with four openers): that race is retried with a doubling pause
    (``SQLITE_OPEN``), for ``timeout`` at most."""
    try:
        async for attempt in retrying(SQLITE_OPEN, stop=None, within=timeout,
                                      retry_if=retry_if_exception(functools.partial(_open_race, engine))):
            with attempt:
                try:
                    await setup(engine)
                except OperationalError:
                    await engine.dispose()  # pooled connections may carry the failed set-up
                    raise
    except BaseException:
        await engine.dispose()
        raise
    return engine


def _open_race(engine: AsyncEngine, exc: BaseException) -> bool:
    return engine.dialect.name == "sqlite" and isinstance(exc, OperationalError) and "locked" in str(exc)


async def schema_lock(conn: AsyncConnection, name: bytes) -> None:
    """On PostgreSQL, take the transaction-scoped advisory lock ``name`` (at most 8 bytes) in the caller's
    transaction: racing CREATE ... IF NOT EXISTS can still collide in pg_type. Nothing on SQLite."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int.from_bytes(name, "big")})


def describe(exc: BaseException) -> str:
    """A database error in one line: the driver's exception, not SQLAlchemy's wrapper, and its first line."""
    inner: BaseException = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    if inner.__cause__ is not None and type(inner).__name__ == "Error":  # SQLAlchemy's asyncpg adapter
        inner = inner.__cause__
    first = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {first[0]}" if first else type(inner).__name__
