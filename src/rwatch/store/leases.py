"""Leases for high availability: which of several ``rwatch run`` processes follows a resource, and its fence.

Several processes share one store; a resource is followed by the owner of its row in ``rwatch_leases``.
``acquire`` takes or renews it (one atomic upsert), every take-over bumps the row's ``fence``, and a fenced
``save`` writes only while the lease row still carries the writer's fence, so a paused old leader cannot move a
cursor after losing its lease. Expiry is wall-clock time (``time.time()``) of the callers, not the database's:
the holder writes ``expires_at = its now + ttl`` and another replica takes over once ``its now >= expires_at``.
The holder itself stops ttl/3 before expiry by its own monotonic clock, so the replicas' clocks must agree to
well within ttl/3 (3.3 s with the default 10 s). Skew beyond that can let a standby start polling while the old
holder still does (two long-polls, duplicates); the fence still keeps cursor saves single-writer whatever the
clocks say.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from sqlalchemy import and_, bindparam, case, or_, select

from rwatch.store.core import SqlStoreCore
from rwatch.store.records import Lease
from rwatch.store.schema import leases_table
from rwatch.store.sql import upsert_insert, whole

_L = leases_table.c


# Built once per backend: each renewal (every lease_ttl/3 per resource) only binds values.
@functools.cache
def _acquire(backend: str) -> Any:
    lease = upsert_insert(backend, leases_table).values(
        tenant=bindparam("tenant"), resource=bindparam("resource"), owner=bindparam("owner"), fence=1,
        expires_at=bindparam("expires_at"))
    mine = _L.owner == lease.excluded.owner
    live = _L.expires_at > bindparam("now")
    # One upsert: concurrent acquirers serialise on the row (PostgreSQL re-checks WHERE on the newest
    # version; SQLite has one writer), so exactly one of them gets a fence.
    return lease.on_conflict_do_update(
        index_elements=[_L.tenant, _L.resource],
        set_={
            "owner": lease.excluded.owner,
            "expires_at": lease.excluded.expires_at,
            "fence": case((and_(mine, live), _L.fence), else_=_L.fence + 1),
        },
        where=or_(mine, ~live),
    ).returning(_L.fence)


class LeaseRows(SqlStoreCore):
    """The store's calls on ``rwatch_leases``: take or renew, release, list."""

    @whole
    async def acquire(self, tenant: str, resource: str, owner: str, ttl: float, *,
                      now: float | None = None) -> int | None:
        if ttl <= 0:
            raise ValueError(f"a lease needs a positive ttl, not {ttl}")
        engine = self._live("acquire", tenant, resource)
        now = time.time() if now is None else now
        values = {"tenant": tenant, "resource": resource, "owner": owner, "expires_at": now + ttl, "now": now}
        with self._errors("acquire", tenant, resource):
            async with engine.connect() as conn:
                row = (await conn.execute(_acquire(self.backend), values)).first()
        return None if row is None else int(row[0])

    @whole
    async def release(self, tenant: str, resource: str, owner: str) -> None:
        engine = self._live("release", tenant, resource)
        with self._errors("release", tenant, resource):
            async with engine.connect() as conn:
                # Expired, not deleted: the fence must keep growing, or an old leader's fence could match again.
                await conn.execute(
                    leases_table.update()
                    .where(_L.tenant == tenant, _L.resource == resource, _L.owner == owner)
                    .values(expires_at=0.0)
                )

    @whole
    async def leases(self, tenant: str | None = None) -> list[Lease]:
        engine = self._live("leases", tenant)
        query = select(leases_table).order_by(_L.tenant, _L.resource)
        if tenant is not None:
            query = query.where(_L.tenant == tenant)
        with self._errors("leases", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [Lease(r.tenant, r.resource, r.owner, int(r.fence), float(r.expires_at)) for r in rows]
