"""Saved cursor positions: load, save (fenced by the lease when high availability is on), forget, list."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import TextClause, select, text

from rwatch.errors import LeaseLost
from rwatch.store.core import SqlStoreCore
from rwatch.store.records import CursorState
from rwatch.store.schema import cursors_table
from rwatch.store.sql import upsert_insert, whole

_C = cursors_table.c

# The fenced save, one statement on both backends: the row to write comes out of the lease check, so a stale
# fence inserts and updates nothing (RETURNING then yields no row). PostgreSQL locks the lease row FOR SHARE
# until the statement commits: a concurrent take-over waits for it, or this save sees the new fence. SQLite
# takes its write lock before the statement reads anything, so check and write are one step there too.
# ``WHERE true``: SQLite needs it to parse ON CONFLICT after INSERT ... SELECT.
_FENCED_SAVE = """
WITH lease AS (
    SELECT fence FROM rwatch_leases
    WHERE tenant = :tenant AND resource = :resource AND fence = CAST(:fence AS BIGINT){lock}
)
INSERT INTO rwatch_cursors (tenant, resource, cursor, version_s, version_i, event_time, saved_at, fence)
SELECT CAST(:tenant AS TEXT), CAST(:resource AS TEXT), CAST(:cursor AS TEXT), CAST(:version_s AS BIGINT),
       CAST(:version_i AS BIGINT), CAST(:event_time AS DOUBLE PRECISION), CAST(:saved_at AS DOUBLE PRECISION),
       lease.fence
FROM lease WHERE true
ON CONFLICT (tenant, resource) DO UPDATE SET
    cursor = excluded.cursor, version_s = excluded.version_s, version_i = excluded.version_i,
    event_time = excluded.event_time, saved_at = excluded.saved_at, fence = excluded.fence
RETURNING 1
"""


# Built once per backend; every save only binds values.
@functools.cache
def _upsert(backend: str) -> Any:
    insert = upsert_insert(backend, cursors_table)
    return insert.on_conflict_do_update(
        index_elements=[_C.tenant, _C.resource],
        set_={
            "cursor": insert.excluded.cursor,
            "version_s": insert.excluded.version_s,
            "version_i": insert.excluded.version_i,
            "event_time": insert.excluded.event_time,
            "saved_at": insert.excluded.saved_at,
            "fence": insert.excluded.fence,
        },
    )


@functools.cache
def _fenced_save(backend: str) -> TextClause:
    return text(_FENCED_SAVE.format(lock=" FOR SHARE" if backend == "postgresql" else ""))


def _row_state(row: Any) -> CursorState:
    version = None
    if row.version_s is not None and row.version_i is not None:
        version = (int(row.version_s), int(row.version_i))
    return CursorState(row.tenant, row.resource, row.cursor, version, row.event_time, row.saved_at)


class CursorRows(SqlStoreCore):
    """The store's calls on ``rwatch_cursors``: one position per (tenant, resource)."""

    @whole
    async def load(self, tenant: str, resource: str) -> CursorState | None:
        engine = self._live("load", tenant, resource)
        with self._errors("load", tenant, resource):
            async with engine.connect() as conn:
                result = await conn.execute(
                    select(cursors_table).where(_C.tenant == tenant, _C.resource == resource)
                )
                row = result.first()
        return None if row is None else _row_state(row)

    @whole
    async def save(self, state: CursorState, *, fence: int | None = None) -> None:
        engine = self._live("save", state.tenant, state.resource)
        version_s, version_i = state.version if state.version is not None else (None, None)
        values = {
            "tenant": state.tenant, "resource": state.resource, "cursor": state.cursor,
            "version_s": version_s, "version_i": version_i, "event_time": state.event_time,
            "saved_at": state.saved_at, "fence": fence,
        }
        with self._errors("save", state.tenant, state.resource):
            # One statement in autocommit: the commit is the statement, nothing else crosses the wire.
            async with engine.connect() as conn:
                if fence is None:
                    await conn.execute(_upsert(self.backend), values)
                    return
                written = (await conn.execute(_fenced_save(self.backend), values)).first()
        if written is None:
            raise LeaseLost("the lease was taken over: cursor not saved", tenant=state.tenant,
                            resource=state.resource, fence=fence)

    @whole
    async def delete(self, tenant: str, resource: str) -> None:
        engine = self._live("delete", tenant, resource)
        with self._errors("delete", tenant, resource):
            async with engine.connect() as conn:
                await conn.execute(cursors_table.delete().where(_C.tenant == tenant, _C.resource == resource))

    @whole
    async def states(self, tenant: str | None = None) -> list[CursorState]:
        engine = self._live("states", tenant)
        query = select(cursors_table).order_by(_C.tenant, _C.resource)
        if tenant is not None:
            query = query.where(_C.tenant == tenant)
        with self._errors("states", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [_row_state(row) for row in rows]
