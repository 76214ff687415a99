"""Verify results: what the last ``rwatch verify`` found per (tenant, sink, resource), for the daemon's metrics."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from rwatch.store.core import SqlStoreCore
from rwatch.store.records import VerifyResult
from rwatch.store.schema import verify_table
from rwatch.store.sql import upsert_insert, whole

_V = verify_table.c


class VerifyRows(SqlStoreCore):
    """The store's calls on ``rwatch_verify``: keep the last result, list them."""

    @whole
    async def record_verify(self, results: Sequence[VerifyResult]) -> None:
        if not results:
            return
        engine = self._live("record_verify")
        insert = upsert_insert(self.backend, verify_table)
        upsert = insert.on_conflict_do_update(
            index_elements=[_V.tenant, _V.sink, _V.resource],
            set_={name: insert.excluded[name] for name in ("missing", "extra", "changed", "checked_at")},
        )
        rows = [{"tenant": r.tenant, "sink": r.sink, "resource": r.resource, "missing": r.missing,
                 "extra": r.extra, "changed": r.changed, "checked_at": r.checked_at} for r in results]
        with self._errors("record_verify"):
            async with engine.connect() as conn:
                await conn.execute(upsert, rows)

    @whole
    async def verify_results(self, tenant: str | None = None) -> list[VerifyResult]:
        engine = self._live("verify_results", tenant)
        query = select(verify_table).order_by(_V.tenant, _V.sink, _V.resource)
        if tenant is not None:
            query = query.where(_V.tenant == tenant)
        with self._errors("verify_results", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [VerifyResult(r.tenant, r.sink, r.resource, int(r.missing), int(r.extra), int(r.changed),
                             float(r.checked_at)) for r in rows]
