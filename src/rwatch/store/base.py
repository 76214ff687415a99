"""The cursor store's protocol, what every backend answers, and ``open_store``, which picks one by URL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rwatch.store import sql
from rwatch.store.backends import PostgresCursorStore, SqlCursorStore, SqliteCursorStore
from rwatch.store.core import DEFAULT_TIMEOUT
from rwatch.store.records import BizSighting, CursorState, Gap, Lease, ResyncRecord, VerifyResult


class CursorStore(Protocol):
    """One saved position per (tenant, resource), the leases of high availability, the gaps of history that
    were lost, and what verify and resync found."""

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


class StoreUrlError(sql.DatabaseUrlError):
    """The store URL names no backend rwatch has (``sqlite:///path`` or ``postgresql://...``)."""


def open_store(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> SqlCursorStore:
    """The store for a URL, not yet opened: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
    ``postgresql://user@host/db`` (or ``postgres://``). ``timeout`` bounds connecting, lock waits
    (SQLite busy_timeout) and statements (PostgreSQL)."""
    parsed = sql.async_url(url, key="store.url", what="store", error=StoreUrlError)
    kind = SqliteCursorStore if parsed.get_backend_name() == "sqlite" else PostgresCursorStore
    return kind(parsed, timeout=timeout)
