"""The store's tables: one per record kind, the same columns on SQLite and PostgreSQL.

Text, not VARCHAR(n): PostgreSQL would enforce a length SQLite ignores, and both backends must agree.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Double, Index, Integer, MetaData, Table, Text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateIndex, CreateTable

metadata = MetaData()

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

async def create_tables(conn: AsyncConnection) -> None:
    """Create every table and index that is missing; each CREATE ... IF NOT EXISTS is atomic on its own."""
    for table in metadata.sorted_tables:
        await conn.execute(CreateTable(table, if_not_exists=True))
        for index in table.indexes:
            await conn.execute(CreateIndex(index, if_not_exists=True))
