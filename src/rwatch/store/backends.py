"""The cursor store's two backends, SQLite (the embedded default) and PostgreSQL, on one SQLAlchemy code path."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from rwatch.store import sql
from rwatch.store.businesses import BusinessRows
from rwatch.store.core import log
from rwatch.store.cursors import CursorRows
from rwatch.store.gaps import GapRows
from rwatch.store.leases import LeaseRows
from rwatch.store.resyncs import ResyncRows
from rwatch.store.verify_results import VerifyRows

_SCHEMA_LOCK = b"rwatch"  # PostgreSQL advisory lock for creating the tables


class SqlCursorStore(CursorRows, LeaseRows, GapRows, VerifyRows, BusinessRows, ResyncRows):
    """The CursorStore on SQLAlchemy Core: every table's calls; subclasses set up the engine."""


class SqliteCursorStore(SqlCursorStore):
    """Embedded default. WAL + synchronous=FULL on every connection: a returned save survives power loss."""

    backend = "sqlite"

    @property
    def path(self) -> str | None:
        return sql.sqlite_path(self.url)

    def _create_engine(self) -> AsyncEngine:
        return sql.sqlite_engine(self.url, timeout=self.timeout, isolation_level="AUTOCOMMIT",
                                 on_not_wal=self._not_wal)

    def _not_wal(self, mode: str) -> None:
        log.warning("store_not_wal", journal_mode=mode, path=self.path)


class PostgresCursorStore(SqlCursorStore):
    """Shared by replicas (high availability); the tables are created under an advisory lock."""

    backend = "postgresql"

    def _create_engine(self) -> AsyncEngine:
        return sql.postgres_engine(self.url, timeout=self.timeout, application_name="rwatch",
                                   isolation_level="AUTOCOMMIT")

    async def _create_schema(self, conn: AsyncConnection) -> None:
        # Racing CREATE TABLE IF NOT EXISTS can still collide in pg_type ("duplicate key"), so openers take a
        # transaction-scoped advisory lock and create everything in one transaction.
        await conn.execution_options(isolation_level="READ COMMITTED")
        async with conn.begin():
            await sql.schema_lock(conn, _SCHEMA_LOCK)
            await super()._create_schema(conn)
