"""Gaps: the intervals of a resource's history that were lost, recorded until a resync fills them."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from rwatch.errors import PermanentError
from rwatch.store.core import SqlStoreCore
from rwatch.store.records import Gap
from rwatch.store.schema import gaps_table
from rwatch.store.sql import whole

_G = gaps_table.c


def _row_gap(row: Any) -> Gap:
    return Gap(row.id, row.tenant, row.resource, row.start_ts, row.end_ts, row.reason, row.recorded_at,
               row.filled_at)


class GapRows(SqlStoreCore):
    """The store's calls on ``rwatch_gaps``: record, list, fill."""

    @whole
    async def add_gap(self, tenant: str, resource: str, start: float, end: float, reason: str) -> Gap:
        if end < start:
            raise ValueError(f"a gap ends before it starts ({start} > {end})")
        engine = self._live("add_gap", tenant, resource)
        recorded_at = time.time()
        with self._errors("add_gap", tenant, resource):
            async with engine.connect() as conn:
                result = await conn.execute(
                    gaps_table.insert()
                    .values(tenant=tenant, resource=resource, start_ts=start, end_ts=end, reason=reason,
                            recorded_at=recorded_at)
                    .returning(_G.id)
                )
                (gap_id,) = result.one()
        return Gap(int(gap_id), tenant, resource, start, end, reason, recorded_at, None)

    @whole
    async def gaps(
        self, tenant: str | None = None, resource: str | None = None, *, open_only: bool = True
    ) -> list[Gap]:
        engine = self._live("gaps", tenant, resource)
        query = select(gaps_table).order_by(_G.id)
        if tenant is not None:
            query = query.where(_G.tenant == tenant)
        if resource is not None:
            query = query.where(_G.resource == resource)
        if open_only:
            query = query.where(_G.filled_at.is_(None))
        with self._errors("gaps", tenant, resource):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [_row_gap(row) for row in rows]

    @whole
    async def fill_gap(self, gap_id: int, filled_at: float) -> None:
        """Mark a gap reconciled. Filling it again keeps the first time, so a retry is harmless."""
        engine = self._live("fill_gap")
        with self._errors("fill_gap"):
            async with engine.connect() as conn:
                result = await conn.execute(
                    gaps_table.update()
                    .where(_G.id == gap_id, _G.filled_at.is_(None))
                    .values(filled_at=filled_at)
                )
                if result.rowcount:
                    return
                found = await conn.scalar(select(_G.id).where(_G.id == gap_id))
        if found is None:
            raise PermanentError(f"no gap with id {gap_id}", operation="fill_gap", gap_id=gap_id)
