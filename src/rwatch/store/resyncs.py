"""Resync records: the last resync of each resource, its outcome and why, and its listing's size."""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
from sqlalchemy import select

from rwatch.store.core import SqlStoreCore
from rwatch.store.records import ResyncRecord
from rwatch.store.schema import resyncs_table
from rwatch.store.sql import upsert_insert, whole

_RS = resyncs_table.c


class ResyncRows(SqlStoreCore):
    """The store's calls on ``rwatch_resyncs``: keep the last outcome (and baseline), list them."""

    @whole
    async def record_resync(self, tenant: str, resource: str, outcome: str, reasons: Sequence[str], *,
                            listed: int | None = None) -> None:
        engine = self._live("record_resync", tenant, resource)
        insert = upsert_insert(self.backend, resyncs_table)
        now = time.time()
        row = {"tenant": tenant, "resource": resource, "outcome": outcome, "at": now, "listed": listed,
               "reasons": orjson.dumps(list(reasons)).decode(), "listed_at": now if listed is not None else None}
        update = {name: insert.excluded[name] for name in ("outcome", "reasons", "at")}
        if listed is not None:  # the baseline moves only with a complete listing
            update.update(listed=insert.excluded.listed, listed_at=insert.excluded.listed_at)
        upsert = insert.on_conflict_do_update(index_elements=[_RS.tenant, _RS.resource], set_=update)
        with self._errors("record_resync", tenant, resource):
            async with engine.connect() as conn:
                await conn.execute(upsert, [row])

    @whole
    async def resyncs(self, tenant: str | None = None) -> list[ResyncRecord]:
        engine = self._live("resyncs", tenant)
        query = select(resyncs_table).order_by(_RS.tenant, _RS.resource)
        if tenant is not None:
            query = query.where(_RS.tenant == tenant)
        with self._errors("resyncs", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [ResyncRecord(r.tenant, r.resource, r.outcome, tuple(orjson.loads(r.reasons)), float(r.at),
                             None if r.listed is None else int(r.listed),
                             None if r.listed_at is None else float(r.listed_at)) for r in rows]
