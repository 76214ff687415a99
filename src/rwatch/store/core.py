"""The SQL store's core: the engine's life, database errors as StoreError, calls that outlive their caller.

SQLite and PostgreSQL share one SQLAlchemy Core code path; only the engine set-up, the upsert's dialect and the
schema lock differ. Every call is a single statement in autocommit mode, so ``save`` costs one statement and
one commit (one round trip on PostgreSQL) and is durable once it returns. Every database failure surfaces as
``StoreError`` (transient: the caller backs off and retries). The calls themselves live in one module per
record kind (cursors, leases, gaps, findings), each a mixin on ``SqlStoreCore``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Self

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from rwatch.errors import StoreError
from rwatch.logs import get_logger
from rwatch.store import sql
from rwatch.store.schema import create_tables
from rwatch.store.sql import whole

log = get_logger("rwatch.cursors")

DEFAULT_TIMEOUT = 10.0

class SqlStoreCore:
    """What every store call stands on: the engine, opened once and closed after the calls still running;
    backends set up the engine (and PostgreSQL locks the DDL)."""

    backend: ClassVar[str] = "sql"

    def __init__(self, url: URL, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self._engine: AsyncEngine | None = None
        self._opening = asyncio.Lock()
        self._inflight = sql.Inflight()  # calls whose caller was cancelled run on (see sql.whole)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url.render_as_string(hide_password=True)}>"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # backend hooks

    def _create_engine(self) -> AsyncEngine:
        raise NotImplementedError

    async def _setup(self, engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await self._create_schema(conn)

    async def _create_schema(self, conn: AsyncConnection) -> None:
        # Autocommit: each CREATE ... IF NOT EXISTS is atomic on its own, so racing openers are harmless.
        await create_tables(conn)

    # lifecycle

    async def open(self) -> None:
        async with self._opening:
            if self._engine is not None:
                return
            with self._errors("open"):
                self._engine = await sql.first_connect(self._create_engine(), self._setup, timeout=self.timeout)
        log.info("store_opened", backend=self.backend, url=self.url.render_as_string(hide_password=True))

    async def close(self, *, timeout: float = 2.0) -> None:
        """Close the pool; calls still running (their callers were cancelled) get ``timeout`` to finish."""
        await self._inflight.settle(timeout)
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()
            log.info("store_closed", backend=self.backend)

    @contextmanager
    def _errors(
        self, operation: str, tenant: str | None = None, resource: str | None = None
    ) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise StoreError(
                f"cursor store {operation} failed: {sql.describe(exc)}",
                operation=operation, backend=self.backend, tenant=tenant, resource=resource,
            ) from exc

    def _live(self, operation: str, tenant: str | None = None, resource: str | None = None) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("cursor store is not open", operation=operation, backend=self.backend,
                             tenant=tenant, resource=resource)
        return self._engine

    @whole
    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached (readiness)."""
        engine = self._live("ping")
        with self._errors("ping"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
