"""The mirror's schema (DESIGN.md "Mirror (SQL sink) schema", a contract): the ``rwatch_objects`` table and
the ``rwatch_topology`` view, the same SQLAlchemy Core objects on SQLite and PostgreSQL, and the DDL that
creates them.

The view's SELECT is a SQLAlchemy expression compiled per dialect (JSON element access is
``JSON_EXTRACT`` on SQLite and ``->>`` on PostgreSQL), then emitted as ``CREATE VIEW`` with literal binds.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Double,
    MetaData,
    Select,
    Table,
    Text,
    and_,
    cast,
    column,
    inspect,
    select,
    table,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.selectable import NamedFromClause

metadata = MetaData()

# Text, not VARCHAR(n): PostgreSQL would enforce a length SQLite ignores, and both backends must agree.
objects_table = Table(
    "rwatch_objects",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("resource", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("version_s", BigInteger, nullable=False),
    Column("version_i", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    # JSONB on PostgreSQL: indexable, and ->> reads it without re-parsing text.
    Column("data", JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
    Column("event_id", Text, nullable=False),
    Column("updated_at", Double, nullable=False),  # Unix seconds, like the cursor store's saved_at
)

TOPOLOGY_VIEW = "rwatch_topology"
_PROBE_VIEW = f"{TOPOLOGY_VIEW}_probe"

# The view's columns, in TopologyRow's order; (name, is_integer).
TOPOLOGY_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("tenant", False),
    ("bk_biz_id", True),
    ("bk_biz_name", False),
    ("bk_set_id", True),
    ("bk_set_name", False),
    ("bk_module_id", True),
    ("bk_module_name", False),
    ("bk_host_id", True),
    ("bk_host_innerip", False),
    ("bk_cloud_id", True),
    ("bk_host_name", False),
)

# For reading the view with SQLAlchemy expressions (it is not part of ``metadata``: no CREATE TABLE for it).
topology_view = table(TOPOLOGY_VIEW, *(column(name) for name, _ in TOPOLOGY_COLUMNS))


def _text(alias: NamedFromClause, field: str) -> ColumnElement[Any]:
    value: ColumnElement[Any] = alias.c.data[field].as_string()
    return value


def _int(alias: NamedFromClause, field: str) -> ColumnElement[Any]:
    # Through text to BIGINT: ``as_integer()`` casts to INTEGER, which is 32 bits on PostgreSQL.
    return cast(alias.c.data[field].as_string(), BigInteger)


def topology_select() -> Select[Any]:
    """One row per live host_relation row, LEFT JOINed to the live host, module, set and biz it names.

    Ids come from the relation row (the only place a host's biz is recorded, cmdb-watch-api.md §4); names
    from the objects, None while an object is not (yet) mirrored or is deleted: CMDB gives no order across
    resources, so a relation may arrive before its host or module and must still show.
    """
    rel, host, module, set_, biz = (objects_table.alias(name) for name in ("r", "h", "m", "s", "b"))

    def live(obj: NamedFromClause, resource: str, id_field: str) -> ColumnElement[bool]:
        # Equality on the whole primary key, so each join is an index lookup on both backends.
        return and_(
            obj.c.tenant == rel.c.tenant,
            obj.c.resource == resource,
            obj.c.key == _text(rel, id_field),
            ~obj.c.deleted,
        )

    joined = (
        rel.outerjoin(host, live(host, "host", "bk_host_id"))
        .outerjoin(module, live(module, "module", "bk_module_id"))
        .outerjoin(set_, live(set_, "set", "bk_set_id"))
        .outerjoin(biz, live(biz, "biz", "bk_biz_id"))
    )
    return (
        select(
            rel.c.tenant.label("tenant"),
            _int(rel, "bk_biz_id").label("bk_biz_id"),
            _text(biz, "bk_biz_name").label("bk_biz_name"),
            _int(rel, "bk_set_id").label("bk_set_id"),
            _text(set_, "bk_set_name").label("bk_set_name"),
            _int(rel, "bk_module_id").label("bk_module_id"),
            _text(module, "bk_module_name").label("bk_module_name"),
            _int(rel, "bk_host_id").label("bk_host_id"),
            _text(host, "bk_host_innerip").label("bk_host_innerip"),
            _int(host, "bk_cloud_id").label("bk_cloud_id"),
            _text(host, "bk_host_name").label("bk_host_name"),
        )
        .select_from(joined)
        .where(rel.c.resource == "host_relation", ~rel.c.deleted)
    )


def create_view_sql(dialect: Dialect, name: str = TOPOLOGY_VIEW) -> str:
    """``CREATE VIEW <name> AS <the topology SELECT>`` for one dialect, binds rendered as literals."""
    compiled = topology_select().compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return f"CREATE VIEW {name} AS {compiled}"


def _view_body(definition: str | None) -> str | None:
    # SQLite keeps the whole CREATE VIEW text (name included), PostgreSQL the normalised SELECT only.
    if definition is None:
        return None
    head, sep, body = definition.partition(" AS ")
    return body.strip() if sep and head.lstrip().upper().startswith("CREATE") else definition.strip()


def _view_definition(conn: Connection, name: str) -> str | None:
    try:
        return inspect(conn).get_view_definition(name)
    except NoSuchTableError:
        return None


async def create_schema(conn: AsyncConnection) -> bool | None:
    """Create the table if missing and (re)create the view if missing or different, inside the caller's
    transaction. Returns None when the view was already right, else whether an older one was replaced."""
    await conn.execute(CreateTable(objects_table, if_not_exists=True))
    # The definitions are compared as the database keeps them (PostgreSQL normalises the SQL), so the wanted
    # one is created under a probe name first, read back, and dropped.
    dialect = conn.dialect
    await conn.exec_driver_sql(f"DROP VIEW IF EXISTS {_PROBE_VIEW}")
    await conn.exec_driver_sql(create_view_sql(dialect, _PROBE_VIEW))
    wanted = _view_body(await conn.run_sync(_view_definition, _PROBE_VIEW))
    current = _view_body(await conn.run_sync(_view_definition, TOPOLOGY_VIEW))
    await conn.exec_driver_sql(f"DROP VIEW {_PROBE_VIEW}")
    if current == wanted:
        return None
    await conn.exec_driver_sql(f"DROP VIEW IF EXISTS {TOPOLOGY_VIEW}")
    await conn.exec_driver_sql(create_view_sql(dialect))
    return current is not None
