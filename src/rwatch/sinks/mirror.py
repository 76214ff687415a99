"""The mirror sink: every object CMDB reports, one row each, in SQLite or PostgreSQL (one Core code path).

A batch is one transaction of version-fenced upserts (DESIGN.md invariant 2): a row changes only when the
event's ``(version_s, version_i)`` is strictly newer than the stored one, so redeliveries, replays and
batches split differently all end in the same table. A delete leaves a tombstone (``deleted``, the data as
it was), so an older create or update arriving later cannot bring the object back. The ``rwatch_topology``
view (see ``mirror_schema``) joins the live rows for people and for the prom_sd projection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from sqlalchemy import and_, event, literal, or_, select, tuple_, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from rwatch.config import MirrorSinkConfig
from rwatch.errors import PermanentError, SinkRejected, SinkUnavailable
from rwatch.events import Event, ResyncMark, resync_event_id
from rwatch.logs import get_logger
from rwatch.sinks.base import TopologyRow
from rwatch.sinks.mirror_schema import TOPOLOGY_VIEW, create_schema, objects_table, topology_view
from rwatch.store import sql

log = get_logger("rwatch.sinks.mirror")

DEFAULT_TIMEOUT = 10.0
_SCHEMA_LOCK = b"rwmirror"  # PostgreSQL advisory lock for the schema transaction
# SQLSTATE classes that mean "this data will never be stored": data exception, integrity constraint
# violation, program limit exceeded (e.g. a row too large). Everything else (connection, locks, admin
# shutdown, missing table, permissions) is an operational problem a retry can outlive.
_REJECTED_SQLSTATE = ("22", "23", "54")
_SQLITE_MIN = (3, 24, 0)  # ON CONFLICT ... DO UPDATE (row values, for the fence, came in 3.15)
_O = objects_table.c
_SWEEP_CHUNK = 500  # keys per UPDATE: well under SQLite's and asyncpg's bound-parameter limits
@dataclass(frozen=True, slots=True)
class MirroredObject:
    """One row of ``rwatch_objects``."""

    key: str
    version: tuple[int, int]
    deleted: bool
    data: dict[str, Any]
    event_id: str
    updated_at: float


def _json_dumps(value: Any) -> str:
    # orjson: fast, and it refuses what is not JSON (NaN becomes null, huge ints raise) instead of
    # writing text that PostgreSQL's JSONB or SQLite's JSON functions would later choke on.
    return orjson.dumps(value).decode()


def _sqlstate(exc: DBAPIError) -> str | None:
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def _rejected(exc: BaseException) -> bool:
    """True when the database (or the driver) refuses the data itself, so retrying the batch cannot help."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    if isinstance(exc, DBAPIError):
        state = _sqlstate(exc)
        return state is not None and state[:2] in _REJECTED_SQLSTATE
    # A value that would not serialise or bind (StatementError wraps the bind processor's error; some drivers
    # raise OverflowError & co. unwrapped): nothing reached the database.
    return isinstance(exc, StatementError | TypeError | ValueError | OverflowError)


def _maybe(lock: asyncio.Lock | None) -> AbstractAsyncContextManager[Any]:
    return lock if lock is not None else nullcontext()


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What ``host_facts`` says of one host."""

    deleted: bool
    os_type: str | None


class MirrorSink:
    """The SQL mirror. ``MirrorSink(name, settings)`` picks SQLite or PostgreSQL from ``settings.url``."""

    kind: ClassVar[str] = "mirror"

    def __init__(self, name: str, settings: MirrorSinkConfig, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.settings = settings
        self.timeout = timeout  # connecting, lock waits (SQLite busy_timeout), statements (PostgreSQL)
        self.url = sql.async_url(settings.url.get_secret_value(), key=f"sinks.{name}.url", what="mirror",
                                 error=MirrorUrlError)
        self.backend = self.url.get_backend_name()
        self._engine: AsyncEngine | None = None
        self._opening = asyncio.Lock()
        # SQLite has one writer at a time: consumers of several resources queue here rather than poll the
        # file lock through busy_timeout's sleeps. An in-memory database is one shared connection, so there
        # every use queues (two transactions cannot interleave on one connection).
        self._write_lock = asyncio.Lock() if self.backend == "sqlite" else None
        self._read_lock = self._write_lock if self.url.database in (None, "", ":memory:") else None
        self._listeners: list[Callable[[], None]] = []
        self._inflight = sql.Inflight()  # calls whose caller was cancelled run on (see sql.whole)
        insert = sql.upsert_insert(self.backend, objects_table)
        stored = tuple_(_O.version_s, _O.version_i)
        given = tuple_(insert.excluded.version_s, insert.excluded.version_i)
        columns = {name: insert.excluded[name] for name in
                   ("version_s", "version_i", "deleted", "data", "event_id", "updated_at")}
        # Built once; every apply only binds values. The WHERE is the version fence (row-value comparison:
        # SQLite >= 3.15 and PostgreSQL): a watch event must be newer than the row; an equal or older one leaves
        # it as it is. A resync's snapshot row also wins a tie: it was read *after* its head, so it shows the
        # object at or after that version, and no event can be both newer than the row and older than it. The
        # tie is how a repair fixes a row whose data differs at the same version (a lost event, a manual edit),
        # and how a later resync at the same head brings back what an earlier, wrong, sweep tombstoned.
        self._upsert = insert.on_conflict_do_update(index_elements=[_O.tenant, _O.resource, _O.key],
                                                    set_=columns, where=stored < given)
        # (The same row redelivered, same id, is left alone: a tie is for another writer's row.)
        self._upsert_snapshot = insert.on_conflict_do_update(
            index_elements=[_O.tenant, _O.resource, _O.key], set_=columns,
            where=or_(stored < given, and_(stored == given, _O.event_id != insert.excluded.event_id)))

    def __repr__(self) -> str:
        return f"<MirrorSink {self.name} {self.url.render_as_string(hide_password=True)}>"

    async def __aenter__(self) -> MirrorSink:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs after every committed apply (prom_sd re-renders, debounced on its side)."""
        self._listeners.append(callback)

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:
            if self._engine is not None:
                return
            with self._errors("open"):
                self._engine = await sql.first_connect(self._create_engine(), self._create_schema, timeout=self.timeout)
        log.info("sink_opened", sink=self.name, backend=self.backend,
                 url=self.url.render_as_string(hide_password=True))

    async def close(self) -> None:
        await self._inflight.settle(self.timeout)
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()
            log.info("sink_closed", sink=self.name, backend=self.backend)

    def _create_engine(self) -> AsyncEngine:
        json = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
        if self.backend == "postgresql":
            return sql.postgres_engine(self.url, timeout=self.timeout, application_name=f"rwatch-{self.name}", **json)
        if sqlite3.sqlite_version_info < _SQLITE_MIN:
            raise PermanentError(f"the mirror needs SQLite >= 3.24 (upsert), this Python has {sqlite3.sqlite_version}",
                                 sink=self.name, backend=self.backend)
        # FULL sync, not NORMAL: acks go to the broker right after apply returns, so a commit lost to power
        # failure would be events lost for good; the mirror cannot be rebuilt from the queue.
        engine = sql.sqlite_engine(self.url, timeout=self.timeout, **json)

        @event.listens_for(engine.sync_engine, "connect")
        def _explicit_transactions(dbapi_conn: Any, _record: Any) -> None:
            # sqlite3's legacy mode would BEGIN only before DML: DDL would autocommit and reads would not be
            # in the transaction. Turn it off and emit BEGIN ourselves (below).
            dbapi_conn.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Connection) -> None:
            # Writers take the lock up front (busy_timeout applies); a deferred transaction that read first
            # could fail to upgrade with SQLITE_BUSY without waiting at all.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rwatch_write")
                                 else "BEGIN")

        return engine

    async def _create_schema(self, engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            conn = await conn.execution_options(rwatch_write=True)
            async with conn.begin():
                await sql.schema_lock(conn, _SCHEMA_LOCK)  # PostgreSQL: serialise racing openers
                replaced = await create_schema(conn)
        if replaced is not None:
            log.info("mirror_view_created", sink=self.name, view=TOPOLOGY_VIEW, replaced=replaced)

    # --- applying ----------------------------------------------------------------------------------------

    async def apply(self, events: Sequence[Event]) -> None:
        if not events:
            return
        engine = self._live("apply", events)
        now = time.time()
        newest: dict[tuple[str, str, str], Event] = {}
        for ev in events:
            ident = (ev.tenant, ev.resource, ev.key)
            held = newest.get(ident)
            # Only the newest version of a key can change the row (the fence makes the others no-ops), and
            # one statement must not touch a row twice (PostgreSQL refuses that in a multi-row upsert). Of
            # events sharing a version, the later in the stream wins (the batch is in stream order), except
            # that a snapshot row beats a watch event, as it does across batches (the tie rule): a resync's
            # row and the head's own event often travel in one batch.
            if held is None or tuple(ev.version) > tuple(held.version) or (
                    tuple(ev.version) == tuple(held.version) and (ev.origin == "resync" or held.origin != "resync")):
                newest[ident] = ev
        # Sorted by primary key: concurrent batches lock rows in one order, so they cannot deadlock.
        watched: list[dict[str, Any]] = []
        listed: list[dict[str, Any]] = []
        for _, ev in sorted(newest.items(), key=lambda item: item[0]):
            (listed if ev.origin == "resync" else watched).append(
                {"tenant": ev.tenant, "resource": ev.resource, "key": ev.key, "version_s": ev.version[0],
                 "version_i": ev.version[1], "deleted": ev.action == "delete", "data": ev.data, "event_id": ev.id,
                 "updated_at": now})
        with self._errors("apply", events):
            await self._write(engine, [(self._upsert, watched), (self._upsert_snapshot, listed)])
        self._notify()

    def _notify(self) -> None:
        for callback in self._listeners:
            try:
                callback()
            except Exception as exc:  # a broken listener must not make a committed batch look failed
                log.error("sink_listener_failed", sink=self.name, error=repr(exc))

    @sql.whole
    async def _write(self, engine: AsyncEngine, statements: list[tuple[Any, list[dict[str, Any]]]]) -> None:
        async with _maybe(self._write_lock), engine.connect() as conn:
            conn = await conn.execution_options(rwatch_write=True)
            async with conn.begin():  # the whole batch or nothing
                for statement, rows in statements:
                    if rows:
                        await conn.execute(statement, rows)

    async def sweep(self, mark: ResyncMark) -> int:
        """Tombstone every live row of the mark's resource inside its scope that is older than its version, or of
        that very version but not written by the mark's own snapshot (README "Resync": version ties)."""
        engine = self._live("sweep")
        with self._errors("sweep"):
            swept, keys = await self._sweep(engine, mark)
        if swept:
            log.info("mirror_swept", sink=self.name, resource=mark.resource, swept=swept,
                     resync_id=mark.resync_id, sample=keys[:10])
            self._notify()
        return swept

    @sql.whole
    async def _sweep(self, engine: AsyncEngine, mark: ResyncMark) -> tuple[int, list[str]]:
        """(rows tombstoned, keys chosen) in one write transaction."""
        version = tuple_(_O.version_s, _O.version_i)
        where = (_O.tenant == mark.tenant, _O.resource == mark.resource, ~_O.deleted,
                 version <= tuple_(literal(mark.version[0]), literal(mark.version[1])))
        head = (mark.version[0], mark.version[1])
        now = time.time()
        async with _maybe(self._write_lock), engine.connect() as conn:
            conn = await conn.execution_options(rwatch_write=True)
            async with conn.begin():
                rows = (await conn.execute(select(_O.key, _O.data, _O.version_s, _O.version_i, _O.event_id)
                                           .where(*where))).all()
                # The snapshot's own rows are in before its mark (one queue, in order): a row at the head's
                # version that another snapshot or event wrote was not listed this time.
                keys = sorted(row.key for row in rows if mark.in_scope(row.data or {}) and (
                    (row.version_s, row.version_i) < head
                    or row.event_id != resync_event_id(mark.resource, row.key, head, resync_id=mark.resync_id)))
                swept = 0
                for start in range(0, len(keys), _SWEEP_CHUNK):
                    chunk = keys[start:start + _SWEEP_CHUNK]
                    result = await conn.execute(
                        update(objects_table).where(*where, _O.key.in_(chunk)).values(
                            deleted=True, version_s=mark.version[0], version_i=mark.version[1],
                            event_id=mark.id, updated_at=now))
                    # What the UPDATE changed, fence re-checked: a concurrent apply may have moved a row on.
                    swept += max(0, result.rowcount)
        return swept, keys

    # --- reading -----------------------------------------------------------------------------------------

    async def topology(self, tenant: str | None = None) -> list[TopologyRow]:
        """The ``rwatch_topology`` view: one row per live (host, module) relation."""
        engine = self._live("topology")
        v = topology_view.c
        query = select(topology_view).order_by(v.tenant, v.bk_module_id, v.bk_host_id)
        if tenant is not None:
            query = query.where(v.tenant == tenant)
        with self._errors("topology"):
            rows = await self._read(engine, query)
        return [TopologyRow(*row) for row in rows]

    async def objects(
        self, resource: str, tenant: str = "0", *, include_deleted: bool = False
    ) -> dict[str, MirroredObject]:
        """key -> row for one resource of one tenant; tombstones only with ``include_deleted``."""
        engine = self._live("objects")
        query = select(objects_table).where(_O.tenant == tenant, _O.resource == resource)
        if not include_deleted:
            query = query.where(~_O.deleted)
        with self._errors("objects"):
            rows = await self._read(engine, query)
        return {
            row.key: MirroredObject(row.key, (int(row.version_s), int(row.version_i)), bool(row.deleted),
                                    row.data, row.event_id, float(row.updated_at))
            for row in rows
        }

    @sql.whole
    async def _read(self, engine: AsyncEngine, query: Any) -> list[Any]:
        async with _maybe(self._read_lock), engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def host_facts(self, tenant: str | None = None) -> dict[int, HostFacts]:
        """Every host the mirror knows, live or deleted, with the few fields projections need beyond the topology
        view: whether CMDB deleted it (the proof a projection may remove it downstream) and its ``bk_os_type``.

        A host row's tombstone is CMDB's delete. A host the mirror knows only through its relations (its row never
        arrived: created and deleted inside a lost interval, say) counts as deleted once every one of those
        relations is tombstoned: it entered the topology, and the projections, on their evidence alone, and CMDB
        has withdrawn all of it. Keys that are not host ids are skipped."""
        engine = self._live("host_facts")
        hosts = select(_O.key, _O.deleted, _O.data["bk_os_type"].as_string()).where(_O.resource == "host")
        relations = select(_O.key, _O.deleted).where(_O.resource == "host_relation")
        if tenant is not None:
            hosts, relations = hosts.where(_O.tenant == tenant), relations.where(_O.tenant == tenant)
        with self._errors("host_facts"):
            host_rows = await self._read(engine, hosts)
            relation_rows = await self._read(engine, relations)
        facts = {int(key): HostFacts(bool(deleted), os_type) for key, deleted, os_type in host_rows if key.isdigit()}
        placed: dict[int, bool] = {}  # host id -> has a live relation
        for key, deleted in relation_rows:
            host = key.partition(":")[0]
            if host.isdigit():
                placed[int(host)] = placed.get(int(host), False) or not deleted
        for host_id, live in placed.items():
            facts.setdefault(host_id, HostFacts(deleted=not live, os_type=None))
        return facts

    # --- errors ------------------------------------------------------------------------------------------

    def _live(self, operation: str, events: Sequence[Event] = ()) -> AsyncEngine:
        if self._engine is None:
            raise SinkUnavailable(f"mirror sink {self.name!r} is not open", sink=self.name,
                                  operation=operation, backend=self.backend, events=len(events))
        return self._engine

    @contextmanager
    def _errors(self, operation: str, batch: Sequence[Event] = ()) -> Iterator[None]:
        """Every failure leaves as SinkUnavailable (retry the batch) or SinkRejected (the data is refused)."""
        try:
            yield
        except (SQLAlchemyError, OSError, TimeoutError, TypeError, ValueError, OverflowError) as exc:
            fields = {"sink": self.name, "operation": operation, "backend": self.backend, "events": len(batch)}
            if operation == "apply" and _rejected(exc):
                ids = (batch[0].id,) if len(batch) == 1 else ()
                raise SinkRejected(f"mirror refused the batch: {sql.describe(exc)}", event_ids=ids, **fields) from exc
            if not isinstance(exc, SQLAlchemyError | OSError | TimeoutError):
                raise  # a programming error outside apply's data: not the database's doing
            raise SinkUnavailable(f"mirror {operation} failed: {sql.describe(exc)}", **fields) from exc


class MirrorUrlError(sql.DatabaseUrlError):
    """The mirror URL names no backend rwatch has (``sqlite:///path`` or ``postgresql://...``)."""
