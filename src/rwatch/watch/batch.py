"""Turning one watch reply into a batch: a pure function of (reply, position) returning (batch, new position).

It builds the normalized events (the contract of README "Events"), the cursor state to save once they are durable,
and the position the next poll starts from; it counts and logs nothing, so the watcher does that from the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import cast

from rwatch.cmdb import protocol as p
from rwatch.events import Action, Event, iso_utc, watch_event_id
from rwatch.store.records import BizSighting, CursorState


@dataclass(frozen=True, slots=True)
class Position:
    """Where the next poll starts: a cursor, a start time, or "from now" (neither)."""

    cursor: str | None = None
    start_from: int | None = None
    event_time: float | None = None  # time of the newest event at or before this position, when known
    # Events whose cursor does not decode are versioned (receive second, seq): seq only grows, so they stay in order.
    seq: int = 0

    @property
    def mode(self) -> str:
        return "cursor" if self.cursor else "start_from" if self.start_from is not None else "now"

    def moved(self, *, cursor: str | None = None, start_from: int | None = None,
              event_time: float | None = None) -> Position:
        """A new place in the stream; the order of undecodable cursors carries over."""
        return Position(cursor, start_from, event_time, self.seq)


@dataclass(slots=True)
class Batch:
    events: list[Event]
    state: CursorState | None  # None: nothing new to save (same cursor, or the NoEventCursor)
    counts: dict[str, int] = field(default_factory=dict)  # events by action
    invalid: list[tuple[p.WatchEvent, str]] = field(default_factory=list)  # skipped events and why
    undecodable: int = 0  # events whose cursor did not decode (versioned by the receive time)


def to_batch(reply: p.WatchReply, position: Position, *, resource: str, tenant: str, observed: float,
             saved: str | None) -> tuple[Batch, Position]:
    """The events of ``reply`` received at ``observed``, the cursor state to save after them (none when it is
    ``saved`` already and nothing came), and where the next poll starts."""
    observed_iso = iso_utc(observed)
    batch = Batch([], None)
    seq = position.seq
    occurred: tuple[int, str] = (-1, "")  # the last event second and its ISO form
    for raw in reply.events if reply.watched else ():
        action = raw.event_type
        if action not in p.EVENT_TYPES:
            batch.invalid.append((raw, "bad_event_type"))
            continue
        key = p.object_key(resource, raw.detail)
        if key is None:
            batch.invalid.append((raw, "no_key"))
            continue
        decoded = p.decode_cursor(raw.cursor)
        if decoded is not None:
            version = (decoded.sec, decoded.inc)
        else:
            batch.undecodable += 1
            seq += 1
            version = (int(observed), seq)
        if occurred[0] != version[0]:
            # The events of a burst share their second: format it once, not once per event.
            occurred = (version[0], iso_utc(version[0]))
        # model_construct: every field is built here from checked parts; validation would only cost time.
        batch.events.append(Event.model_construct(
            id=watch_event_id(resource, raw.cursor), resource=resource, action=cast(Action, action), key=key,
            tenant=tenant, version=version, occurred_at=occurred[1], observed_at=observed_iso, origin="watch",
            cursor=raw.cursor, data=raw.detail,
        ))
        batch.counts[action] = batch.counts.get(action, 0) + 1
    position = replace(position, seq=seq)
    last = reply.last_cursor
    if last is None:
        # No element says where the stream stands (the client refuses such replies as malformed): the position
        # stays. Reading it as "from now" would skip everything since (issue 12, point 5).
        return batch, position
    if last == p.NO_EVENT_CURSOR:
        # The NoEventCursor is a position only for the next poll: persisting it would replay the whole retention
        # window after a restart.
        return batch, position.moved(cursor=last, event_time=position.event_time)
    decoded = p.decode_cursor(last)
    event_time = float(decoded.sec) if decoded else position.event_time
    position = position.moved(cursor=last, event_time=event_time)
    if saved == last and not batch.events:
        return batch, position
    batch.state = CursorState(tenant, resource, last, (decoded.sec, decoded.inc) if decoded else None, event_time,
                              observed)
    return batch, position


def sightings(events: list[Event], known: dict[str, tuple[bool, bool]]) -> list[BizSighting]:
    """The businesses ``events`` show alive or deleted, where that changes what ``known`` holds (updated)."""
    seen = []
    for event in events:
        live = event.action != "delete"
        default = event.data.get("default")
        pool = isinstance(default, int) and not isinstance(default, bool) and default != 0
        if known.get(event.key) != (live, pool):
            known[event.key] = (live, pool)
            seen.append(BizSighting(int(event.key), live, event.version, pool))
    return seen
