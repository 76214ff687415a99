"""Business sightings: whether the biz stream or a listing last showed each business alive or deleted."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import and_, or_, select

from rwatch.store.core import SqlStoreCore
from rwatch.store.records import BizSighting
from rwatch.store.schema import businesses_table
from rwatch.store.sql import upsert_insert, whole

_B = businesses_table.c


class BusinessRows(SqlStoreCore):
    """The store's calls on ``rwatch_businesses``: note sightings (the newest wins), list them."""

    @whole
    async def note_businesses(self, tenant: str, sightings: Sequence[BizSighting]) -> None:
        if not sightings:
            return
        engine = self._live("note_businesses", tenant)
        insert = upsert_insert(self.backend, businesses_table)
        new = insert.excluded
        upsert = insert.on_conflict_do_update(
            index_elements=[_B.tenant, _B.bk_biz_id],
            set_={name: new[name] for name in ("live", "pool", "version_s", "version_i", "noted_at")},
            # The version fence: a replayed or listed sighting older than the kept one changes nothing.
            where=or_(_B.version_s < new.version_s, and_(_B.version_s == new.version_s, _B.version_i < new.version_i)),
        )
        now = time.time()
        rows = {s.biz_id: {"tenant": tenant, "bk_biz_id": s.biz_id, "live": s.live, "pool": s.pool,
                           "version_s": s.version[0], "version_i": s.version[1], "noted_at": now}
                for s in sorted(sightings, key=lambda s: s.version)}  # one row per id: the newest sighting
        with self._errors("note_businesses", tenant):
            async with engine.connect() as conn:
                await conn.execute(upsert, list(rows.values()))

    @whole
    async def businesses(self, tenant: str) -> list[BizSighting]:
        engine = self._live("businesses", tenant)
        query = select(businesses_table).where(_B.tenant == tenant).order_by(_B.bk_biz_id)
        with self._errors("businesses", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [BizSighting(int(r.bk_biz_id), bool(r.live), (int(r.version_s), int(r.version_i)), bool(r.pool))
                for r in rows]
