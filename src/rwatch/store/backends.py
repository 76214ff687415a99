"""The cursor store: one saved position per (tenant, resource), and the gaps of history that were lost.

SQLite (the embedded default) and PostgreSQL share one SQLAlchemy Core code path; only the engine set-up,
the upsert's dialect and the schema lock differ. Every call is a single statement in autocommit mode, so
``save`` costs one statement and one commit (one round trip on PostgreSQL) and is durable once it returns.
Every database failure surfaces as ``StoreError`` (transient: the caller backs off and retries).

Leases (high availability): several ``rwatch run`` processes share one store; a resource is followed by
the owner of its row in ``rwatch_leases``. ``acquire`` takes or renews it (one atomic upsert), every
take-over bumps the row's ``fence``, and a fenced ``save`` writes only while the lease row still carries the
writer's fence, so a paused old leader cannot move a cursor after losing its lease. Expiry is wall-clock
time (``time.time()``) of the callers, not the database's: the holder writes ``expires_at = its now + ttl``
and another replica takes over once ``its now >= expires_at``. The holder itself stops ttl/3 before
expiry by its own monotonic clock, so the replicas' clocks must agree to well within ttl/3 (3.3 s with
the default 10 s). Skew beyond that can let a standby start polling while the old holder still does
(two long-polls, duplicates); the fence still keeps cursor saves single-writer whatever the clocks say.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, Protocol, TypeVar

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    and_,
    bindparam,
    case,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateIndex, CreateTable

from rwatch import sql
from rwatch.cmdb.protocol import NO_EVENT_CURSOR, decode_cursor
from rwatch.errors import LeaseLost, PermanentError, StoreError
from rwatch.logs import get_logger

log = get_logger("rwatch.cursors")

DEFAULT_TIMEOUT = 10.0
# The cursor of a saved start time (``CursorState.starting_at``): not base64, so never a CMDB cursor.
START_FROM_PREFIX = "rwatch:start_from:"
_SCHEMA_LOCK = b"rwatch"  # PostgreSQL advisory lock for creating the tables


@dataclass(frozen=True, slots=True)
class CursorState:
    tenant: str
    resource: str
    cursor: str  # the CMDB bk_cursor to resume from
    version: tuple[int, int] | None  # [seconds, increment] decoded from the cursor; None if it did not decode
    event_time: float | None  # Unix seconds of the last event the cursor stands for (resume by time)
    saved_at: float  # when it was saved (Unix seconds)

    @classmethod
    def from_cursor(
        cls, tenant: str, resource: str, cursor: str, saved_at: float | None = None
    ) -> CursorState:
        """The state for a cursor CMDB handed out, its version and event time decoded from it."""
        decoded = decode_cursor(cursor)
        saved_at = time.time() if saved_at is None else saved_at
        # NoEventCursor decodes to cluster time 1.1, which is no event at all: resuming by time from 1970
        # would only draw 1199006, so it carries no version.
        if decoded is None or cursor == NO_EVENT_CURSOR:
            return cls(tenant, resource, cursor, None, None, saved_at)
        return cls(tenant, resource, cursor, (decoded.sec, decoded.inc), float(decoded.sec), saved_at)

    # Positions set by ``rwatch cursors reset`` rather than handed out by CMDB. Both are plain rows (no schema
    # change), spelled so that a watcher reading them without knowing them still does something sound: the
    # empty cursor asks CMDB for "from now" (``watch_body`` sends no ``bk_cursor``), and the start marker,
    # never a chain node, draws 1103007, whose recovery resumes by time from ``event_time`` (− lookback).

    @classmethod
    def from_now(cls, tenant: str, resource: str, saved_at: float | None = None) -> CursorState:
        """Resume "from now" (CMDB's newest event on), without the bootstrap gap a missing row means."""
        return cls(tenant, resource, "", None, None, time.time() if saved_at is None else saved_at)

    @classmethod
    def starting_at(cls, tenant: str, resource: str, start_from: int,
                    saved_at: float | None = None) -> CursorState:
        """Resume with ``bk_start_from = start_from``: the events whose cluster time is after that second."""
        return cls(tenant, resource, f"{START_FROM_PREFIX}{int(start_from)}", None, float(start_from),
                   time.time() if saved_at is None else saved_at)

    @property
    def start_from(self) -> int | None:
        """The ``bk_start_from`` of a start marker; None for any other position."""
        if not self.cursor.startswith(START_FROM_PREFIX):
            return None
        try:
            return int(self.cursor[len(START_FROM_PREFIX):])
        except ValueError:
            return None

    @property
    def mode(self) -> str:
        """How the next poll starts: ``cursor``, ``start_from`` (a start marker) or ``now`` (empty cursor)."""
        if not self.cursor:
            return "now"
        return "start_from" if self.start_from is not None else "cursor"


@dataclass(frozen=True, slots=True)
class Lease:
    tenant: str
    resource: str
    owner: str
    fence: int
    expires_at: float  # Unix seconds (the acquirer's clock)


@dataclass(frozen=True, slots=True)
class Gap:
    id: int
    tenant: str
    resource: str
    start: float  # the interval of history truly lost (Unix seconds)
    end: float
    reason: str  # "cursor_expired", "bootstrap", ...
    recorded_at: float
    filled_at: float | None  # set by reconciliation


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What the last ``rwatch verify`` found for one resource of one sink (kept in the store, so the daemon's
    ``/metrics`` shows it: the command itself lives for seconds)."""

    tenant: str
    sink: str
    resource: str
    missing: int
    extra: int
    changed: int
    checked_at: float  # Unix seconds

    @property
    def drift(self) -> int:
        return self.missing + self.extra + self.changed


@dataclass(frozen=True, slots=True)
class BizSighting:
    """What the biz stream (or a listing) last showed of one business: alive or deleted, as of ``version``.
    A resync compares these with what ``search_business`` lists: a live business it does not list is hidden
    from the configured user (or was deleted while history was lost), never proof that it is gone."""

    biz_id: int
    live: bool
    version: tuple[int, int]
    pool: bool  # the resource pool (default != 0): search_business never lists it


@dataclass(frozen=True, slots=True)
class ResyncRecord:
    """The last resync of one resource: its outcome and why, and the size of its last complete listing (the
    baseline of the mass-delete guard where no mirror takes the resource)."""

    tenant: str
    resource: str
    outcome: str  # ok, incomplete, held, failed
    reasons: tuple[str, ...]
    at: float
    listed: int | None  # objects in the last complete listing
    listed_at: float | None


class CursorStore(Protocol):
    async def open(self) -> None:
        """Connect and create the tables if missing (idempotent, safe with concurrent openers)."""

    async def close(self, *, timeout: float = 2.0) -> None: ...

    async def load(self, tenant: str, resource: str) -> CursorState | None: ...

    async def save(self, state: CursorState, *, fence: int | None = None) -> None:
        """Durable once it returns (SQLite: WAL + synchronous=FULL survives kill -9 and power loss).

        With ``fence``, the cursor is written only while the lease of (tenant, resource) holds that fence,
        atomically with the check; otherwise nothing is written and ``LeaseLost`` is raised."""

    async def acquire(self, tenant: str, resource: str, owner: str, ttl: float, *,
                      now: float | None = None) -> int | None:
        """Take the lease if it is free, expired or already ``owner``'s, until ``now + ttl``; the fence held,
        or None while another owner's lease lives. Renewing a live lease keeps its fence; any other take
        (another owner, or after expiry) increments it (the first is 1)."""

    async def release(self, tenant: str, resource: str, owner: str) -> None:
        """Expire ``owner``'s lease now, so a standby takes over at once (nothing if it is not ours)."""

    async def leases(self, tenant: str | None = None) -> list[Lease]: ...

    async def delete(self, tenant: str, resource: str) -> None:
        """Forget the position (cursor reset); the resource's gaps stay."""

    async def states(self, tenant: str | None = None) -> list[CursorState]: ...

    async def add_gap(self, tenant: str, resource: str, start: float, end: float, reason: str) -> Gap: ...

    async def gaps(
        self, tenant: str | None = None, resource: str | None = None, *, open_only: bool = True
    ) -> list[Gap]: ...

    async def fill_gap(self, gap_id: int, filled_at: float) -> None: ...

    async def record_verify(self, results: Sequence[VerifyResult]) -> None:
        """Keep the last ``rwatch verify`` result per (tenant, sink, resource), for the daemon's metrics."""

    async def verify_results(self, tenant: str | None = None) -> list[VerifyResult]: ...

    async def note_businesses(self, tenant: str, sightings: Sequence[BizSighting]) -> None:
        """Record businesses the stream or a listing showed; a sighting older than the one kept changes nothing."""

    async def businesses(self, tenant: str) -> list[BizSighting]: ...

    async def record_resync(self, tenant: str, resource: str, outcome: str, reasons: Sequence[str], *,
                            listed: int | None = None) -> None:
        """Keep the last resync's outcome (``rwatch cursors list`` shows why a gap stays open); ``listed`` is
        given for a complete listing and becomes the resource's baseline."""

    async def resyncs(self, tenant: str | None = None) -> list[ResyncRecord]: ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached (readiness)."""


# --- schema ----------------------------------------------------------------------------------------------

metadata = MetaData()

# Text, not VARCHAR(n): PostgreSQL would enforce a length SQLite ignores, and both backends must agree.
cursors_table = Table(
    "rwatch_cursors",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("resource", Text, primary_key=True),
    Column("cursor", Text, nullable=False),
    Column("version_s", BigInteger),
    Column("version_i", BigInteger),
    Column("event_time", Double),
    Column("saved_at", Double, nullable=False),
    # The lease fence the cursor was saved under (HA); NULL for an unfenced save.
    Column("fence", BigInteger),
)

leases_table = Table(
    "rwatch_leases",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("resource", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("expires_at", Double, nullable=False),
)

gaps_table = Table(
    "rwatch_gaps",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant", Text, nullable=False),
    Column("resource", Text, nullable=False),
    Column("start_ts", Double, nullable=False),
    Column("end_ts", Double, nullable=False),
    Column("reason", Text, nullable=False),
    Column("recorded_at", Double, nullable=False),
    Column("filled_at", Double),
    Index("rwatch_gaps_tenant_resource", "tenant", "resource"),
    sqlite_autoincrement=True,  # never reuse an id, so a stale fill_gap cannot fill someone else's gap
)

verify_table = Table(
    "rwatch_verify",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("sink", Text, primary_key=True),
    Column("resource", Text, primary_key=True),
    Column("missing", BigInteger, nullable=False),
    Column("extra", BigInteger, nullable=False),
    Column("changed", BigInteger, nullable=False),
    Column("checked_at", Double, nullable=False),
)

businesses_table = Table(
    "rwatch_businesses",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("bk_biz_id", BigInteger, primary_key=True),
    Column("live", Boolean, nullable=False),
    Column("pool", Boolean, nullable=False),
    Column("version_s", BigInteger, nullable=False),
    Column("version_i", BigInteger, nullable=False),
    Column("noted_at", Double, nullable=False),
)

resyncs_table = Table(
    "rwatch_resyncs",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("resource", Text, primary_key=True),
    Column("outcome", Text, nullable=False),
    Column("reasons", Text, nullable=False),  # a JSON list
    Column("at", Double, nullable=False),
    Column("listed", BigInteger),
    Column("listed_at", Double),
)

# Both dialects' insert() has on_conflict_do_update (and .excluded).
_DIALECT_INSERTS: dict[str, Callable[[Table], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}
_C = cursors_table.c
_G = gaps_table.c
_L = leases_table.c
_V = verify_table.c
_B = businesses_table.c
_RS = resyncs_table.c

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


def _row_state(row: Any) -> CursorState:
    version = None
    if row.version_s is not None and row.version_i is not None:
        version = (int(row.version_s), int(row.version_i))
    return CursorState(row.tenant, row.resource, row.cursor, version, row.event_time, row.saved_at)


def _row_gap(row: Any) -> Gap:
    return Gap(row.id, row.tenant, row.resource, row.start_ts, row.end_ts, row.reason, row.recorded_at,
               row.filled_at)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _whole(method: Callable[_P, Coroutine[Any, Any, _R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Run a store call to its end even when its caller is cancelled (a lease keeper's timeout, a term ending,
    a stop): the caller gets its ``CancelledError`` at once, the statement finishes and its connection goes
    back to the pool clean. Cancelled mid-statement, the driver connection is torn down with the statement
    still active, and SQLite keeps that write lock until the garbage collector finalizes it (the chaos
    suite's seed 76: every write blocked for 20-30 s after a SIGSTOP). ``close`` waits for what is left."""

    @functools.wraps(method)
    async def whole(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        store = args[0]
        assert isinstance(store, SqlCursorStore)
        task = asyncio.ensure_future(method(*args, **kwargs))
        store._inflight.add(task)
        task.add_done_callback(store._settled)
        return await asyncio.shield(task)

    return whole


# --- the store -------------------------------------------------------------------------------------------


class SqlCursorStore:
    """The CursorStore on SQLAlchemy Core; subclasses set up the engine (and PostgreSQL locks the DDL)."""

    backend: ClassVar[str] = "sql"

    def __init__(self, url: URL, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self._engine: AsyncEngine | None = None
        self._opening = asyncio.Lock()
        self._inflight: set[asyncio.Future[Any]] = set()  # calls whose caller was cancelled run on (see _whole)
        insert = _DIALECT_INSERTS[self.backend](cursors_table)
        # Built once; every save only binds values.
        self._upsert = insert.on_conflict_do_update(
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
        self._fenced_save = text(_FENCED_SAVE.format(lock=" FOR SHARE" if self.backend == "postgresql" else ""))
        # The lease upsert, built once too: each renewal (every lease_ttl/3 per resource) only binds values.
        lease = _DIALECT_INSERTS[self.backend](leases_table).values(
            tenant=bindparam("tenant"), resource=bindparam("resource"), owner=bindparam("owner"), fence=1,
            expires_at=bindparam("expires_at"))
        mine = _L.owner == lease.excluded.owner
        live = _L.expires_at > bindparam("now")
        # One upsert: concurrent acquirers serialise on the row (PostgreSQL re-checks WHERE on the newest
        # version; SQLite has one writer), so exactly one of them gets a fence.
        self._acquire = lease.on_conflict_do_update(
            index_elements=[_L.tenant, _L.resource],
            set_={
                "owner": lease.excluded.owner,
                "expires_at": lease.excluded.expires_at,
                "fence": case((and_(mine, live), _L.fence), else_=_L.fence + 1),
            },
            where=or_(mine, ~live),
        ).returning(_L.fence)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url.render_as_string(hide_password=True)}>"

    async def __aenter__(self) -> SqlCursorStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # subclass hooks

    def _create_engine(self) -> AsyncEngine:
        raise NotImplementedError

    async def _setup(self, engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await self._create_schema(conn)

    async def _create_schema(self, conn: AsyncConnection) -> None:
        # Autocommit: each CREATE ... IF NOT EXISTS is atomic on its own, so racing openers are harmless.
        for table in metadata.sorted_tables:
            await conn.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                await conn.execute(CreateIndex(index, if_not_exists=True))

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
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()
            log.info("store_closed", backend=self.backend)

    def _settled(self, task: asyncio.Future[Any]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure whose caller was gone is not "never retrieved" noise

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

    # cursors

    @_whole
    async def load(self, tenant: str, resource: str) -> CursorState | None:
        engine = self._live("load", tenant, resource)
        with self._errors("load", tenant, resource):
            async with engine.connect() as conn:
                result = await conn.execute(
                    select(cursors_table).where(_C.tenant == tenant, _C.resource == resource)
                )
                row = result.first()
        return None if row is None else _row_state(row)

    @_whole
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
                    await conn.execute(self._upsert, values)
                    return
                written = (await conn.execute(self._fenced_save, values)).first()
        if written is None:
            raise LeaseLost("the lease was taken over: cursor not saved", tenant=state.tenant,
                            resource=state.resource, fence=fence)

    # leases

    @_whole
    async def acquire(self, tenant: str, resource: str, owner: str, ttl: float, *,
                      now: float | None = None) -> int | None:
        if ttl <= 0:
            raise ValueError(f"a lease needs a positive ttl, not {ttl}")
        engine = self._live("acquire", tenant, resource)
        now = time.time() if now is None else now
        values = {"tenant": tenant, "resource": resource, "owner": owner, "expires_at": now + ttl, "now": now}
        with self._errors("acquire", tenant, resource):
            async with engine.connect() as conn:
                row = (await conn.execute(self._acquire, values)).first()
        return None if row is None else int(row[0])

    @_whole
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

    @_whole
    async def leases(self, tenant: str | None = None) -> list[Lease]:
        engine = self._live("leases", tenant)
        query = select(leases_table).order_by(_L.tenant, _L.resource)
        if tenant is not None:
            query = query.where(_L.tenant == tenant)
        with self._errors("leases", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [Lease(r.tenant, r.resource, r.owner, int(r.fence), float(r.expires_at)) for r in rows]

    @_whole
    async def delete(self, tenant: str, resource: str) -> None:
        engine = self._live("delete", tenant, resource)
        with self._errors("delete", tenant, resource):
            async with engine.connect() as conn:
                await conn.execute(cursors_table.delete().where(_C.tenant == tenant, _C.resource == resource))

    @_whole
    async def states(self, tenant: str | None = None) -> list[CursorState]:
        engine = self._live("states", tenant)
        query = select(cursors_table).order_by(_C.tenant, _C.resource)
        if tenant is not None:
            query = query.where(_C.tenant == tenant)
        with self._errors("states", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [_row_state(row) for row in rows]

    # gaps

    @_whole
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

    @_whole
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

    @_whole
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

    @_whole
    async def record_verify(self, results: Sequence[VerifyResult]) -> None:
        if not results:
            return
        engine = self._live("record_verify")
        insert = _DIALECT_INSERTS[self.backend](verify_table)
        upsert = insert.on_conflict_do_update(
            index_elements=[_V.tenant, _V.sink, _V.resource],
            set_={name: insert.excluded[name] for name in ("missing", "extra", "changed", "checked_at")},
        )
        rows = [{"tenant": r.tenant, "sink": r.sink, "resource": r.resource, "missing": r.missing,
                 "extra": r.extra, "changed": r.changed, "checked_at": r.checked_at} for r in results]
        with self._errors("record_verify"):
            async with engine.connect() as conn:
                await conn.execute(upsert, rows)

    @_whole
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

    @_whole
    async def note_businesses(self, tenant: str, sightings: Sequence[BizSighting]) -> None:
        if not sightings:
            return
        engine = self._live("note_businesses", tenant)
        insert = _DIALECT_INSERTS[self.backend](businesses_table)
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

    @_whole
    async def businesses(self, tenant: str) -> list[BizSighting]:
        engine = self._live("businesses", tenant)
        query = select(businesses_table).where(_B.tenant == tenant).order_by(_B.bk_biz_id)
        with self._errors("businesses", tenant):
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [BizSighting(int(r.bk_biz_id), bool(r.live), (int(r.version_s), int(r.version_i)), bool(r.pool))
                for r in rows]

    @_whole
    async def record_resync(self, tenant: str, resource: str, outcome: str, reasons: Sequence[str], *,
                            listed: int | None = None) -> None:
        engine = self._live("record_resync", tenant, resource)
        insert = _DIALECT_INSERTS[self.backend](resyncs_table)
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

    @_whole
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

    @_whole
    async def ping(self) -> None:
        engine = self._live("ping")
        with self._errors("ping"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))


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


# --- opening by URL ---------------------------------------------------------------------------------------


class StoreUrlError(sql.DatabaseUrlError):
    """The store URL names no backend rwatch has (``sqlite:///path`` or ``postgresql://...``)."""


def open_store(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> SqlCursorStore:
    """The store for a URL, not yet opened: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
    ``postgresql://user@host/db`` (or ``postgres://``). ``timeout`` bounds connecting, lock waits
    (SQLite busy_timeout) and statements (PostgreSQL)."""
    parsed = sql.async_url(url, key="store.url", what="store", error=StoreUrlError)
    kind = SqliteCursorStore if parsed.get_backend_name() == "sqlite" else PostgresCursorStore
    return kind(parsed, timeout=timeout)
