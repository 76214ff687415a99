"""The store's records: a saved cursor position, a lease, a gap of lost history, and what verify and resync found.

Plain frozen dataclasses, free of SQL, so the watcher, the resync and the CLI can speak of them without the
backends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rwatch.cmdb.protocol import NO_EVENT_CURSOR, decode_cursor

# The cursor of a saved start time (``CursorState.starting_at``): not base64, so never a CMDB cursor.
START_FROM_PREFIX = "rwatch:start_from:"


@dataclass(frozen=True, slots=True)
class CursorState:
    """Where a resource's watch resumes: the CMDB cursor, what it decodes to, and when it was saved."""

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
    """Who follows a resource (high availability), under which fence, until when."""

    tenant: str
    resource: str
    owner: str
    fence: int
    expires_at: float  # Unix seconds (the acquirer's clock)


@dataclass(frozen=True, slots=True)
class Gap:
    """An interval of a resource's history that was lost, open until a resync fills it."""

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
