"""The cursor store as ``rwatch cursors`` shows it: one row per resource with position, gaps, lease and last resync."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rwatch.cli.cursors.common import iso

if TYPE_CHECKING:
    from rwatch.config import Config
    from rwatch.store.backends import SqlCursorStore
    from rwatch.store.records import CursorState, Gap, Lease, ResyncRecord


@dataclass(slots=True)
class Snapshot:
    states: dict[str, CursorState] = field(default_factory=dict)
    gaps: dict[str, list[Gap]] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    resyncs: dict[str, ResyncRecord] = field(default_factory=dict)


async def read_snapshot(store: SqlCursorStore | None, tenant: str) -> Snapshot:
    snap = Snapshot()
    if store is None:
        return snap
    snap.states = {s.resource: s for s in await store.states(tenant)}
    for gap in await store.gaps(tenant, open_only=True):
        snap.gaps.setdefault(gap.resource, []).append(gap)
    snap.leases = {lease.resource: lease for lease in await store.leases(tenant)}
    snap.resyncs = {r.resource: r for r in await store.resyncs(tenant)}
    return snap


def position_time(state: CursorState | None) -> float | None:
    """The cluster time a saved position stands for: the event a cursor follows, or a start time's second."""
    if state is None:
        return None
    start = state.start_from
    return float(start) if start is not None else state.event_time


def lease_view(lease: Lease | None, now: float) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {"owner": lease.owner, "fence": lease.fence, "expires_at": lease.expires_at,
            "expires_at_iso": iso(lease.expires_at) if lease.expires_at > 0 else None,
            "live": lease.expires_at > now, "expires_in": round(lease.expires_at - now, 3)}


def state_view(state: CursorState | None, now: float) -> dict[str, Any]:
    from rwatch.cmdb.protocol import NO_EVENT_CURSOR

    at = position_time(state)
    return {
        "mode": state.mode if state is not None else "none",
        "cursor": state.cursor if state is not None else None,
        "oldest_retained": state is not None and state.cursor == NO_EVENT_CURSOR,
        "start_from": state.start_from if state is not None else None,
        "event_time": at,
        "event_time_iso": iso(at),
        "cursor_age": round(now - at, 3) if at is not None else None,
        "saved_at": state.saved_at if state is not None else None,
        "saved_at_iso": iso(state.saved_at) if state is not None else None,
        "saved_ago": round(now - state.saved_at, 3) if state is not None else None,
    }


def table_rows(cfg: Config, snap: Snapshot, now: float) -> list[dict[str, Any]]:
    enabled = cfg.watch.enabled
    extra = sorted((set(snap.states) | set(snap.gaps) | set(snap.leases)) - set(enabled))
    rows = []
    for resource in [*enabled, *extra]:
        gaps = snap.gaps.get(resource, [])
        rows.append({
            "resource": resource,
            "enabled": resource in enabled,
            **state_view(snap.states.get(resource), now),
            "gaps_open": len(gaps),
            "gap_seconds": round(sum(g.end - g.start for g in gaps), 3),
            "gaps": [{"id": g.id, "start": g.start, "end": g.end, "start_iso": iso(g.start), "end_iso": iso(g.end),
                      "seconds": round(g.end - g.start, 3), "reason": g.reason, "recorded_at": g.recorded_at}
                     for g in gaps],
            "lease": lease_view(snap.leases.get(resource), now),
            "last_resync": _resync_view(snap.resyncs.get(resource)),
        })
    return rows


def _resync_view(record: ResyncRecord | None) -> dict[str, Any] | None:
    """The last resync: why a gap is still open when it is (an unproved listing, a sweep held by the guard)."""
    if record is None:
        return None
    return {"outcome": record.outcome, "reasons": list(record.reasons), "at": record.at, "at_iso": iso(record.at),
            "listed": record.listed}
