"""The resource_watch rules (cmdb-watch-api.md §2–5) over a SimState, without HTTP and without waiting.

``parse_watch`` validates a body the way OPTS does; ``answer_now`` / ``answer_start_from`` answer the two
modes that never block; ``locate`` + ``scan`` are the steps the server's cursor-mode loop repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from rwatch.cmdb.protocol import (
    CODE_BAD_OPTIONS,
    CODE_CURSOR_EXPIRED,
    CODE_START_FROM_INVALID,
    EVENT_TYPES,
    FIELDS_IGNORED,
    FIELDS_REQUIRED,
    NO_EVENT_CURSOR,
    RESOURCE_TYPES,
    SUB_RESOURCE_ALLOWED,
)
from rwatch.sim.chain import ChainNode
from rwatch.sim.state import SimState

EVENT_STEP: Final = 200  # eventStep in WATCH: at most 200 events a reply
Mode = Literal["cursor", "start_from", "now"]


class WatchError(Exception):
    """A ``result: false`` reply: code and the server's message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class WatchRequest:
    resource: str
    fields: list[str]
    event_types: frozenset[str]  # empty = all
    sub_resource: str
    cursor: str
    start_from: int

    @property
    def mode(self) -> Mode:
        # The server's order (SVC watchEvent): a cursor wins, then a non-zero start time, else from now.
        if self.cursor:
            return "cursor"
        return "start_from" if self.start_from else "now"


@dataclass(slots=True)
class WatchAnswer:
    watched: bool
    events: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"bk_watched": self.watched, "bk_events": self.events}


def body_mode(body: dict[str, Any]) -> Mode:
    """The mode a body asks for, before validation (faults are chosen by mode)."""
    if body.get("bk_cursor"):
        return "cursor"
    return "start_from" if body.get("bk_start_from") else "now"


def parse_watch(resource: str, body: dict[str, Any]) -> WatchRequest:
    """Validate a watch body; WatchError(1199998) with the server's English text when it is refused."""
    if resource not in RESOURCE_TYPES:
        raise WatchError(CODE_BAD_OPTIONS, f"unsupported resource type: {resource}")
    types = body.get("bk_event_types") or []
    fields = body.get("bk_fields") or []
    if not isinstance(types, list) or not isinstance(fields, list):
        raise WatchError(CODE_BAD_OPTIONS, "bk_event_types and bk_fields must be arrays")
    for event_type in types:
        if event_type not in EVENT_TYPES:
            raise WatchError(CODE_BAD_OPTIONS, f"unsupported event type: {event_type}")
    if resource in FIELDS_REQUIRED and not fields:
        raise WatchError(CODE_BAD_OPTIONS, f"{resource} event must have fields")
    cursor = body.get("bk_cursor") or ""
    start_from = body.get("bk_start_from") or 0
    if not isinstance(cursor, str) or not isinstance(start_from, int) or isinstance(start_from, bool):
        raise WatchError(CODE_BAD_OPTIONS, "bk_cursor must be a string and bk_start_from an integer")
    if start_from and cursor:
        raise WatchError(CODE_BAD_OPTIONS, "bk_start_from and bk_cursor can not use at the same time")
    flt = body.get("bk_filter") or {}
    sub = flt.get("bk_sub_resource") if isinstance(flt, dict) else None
    if sub and resource not in SUB_RESOURCE_ALLOWED:
        raise WatchError(CODE_BAD_OPTIONS, f"{resource} event cannot have sub resource")
    return WatchRequest(
        resource, [str(f) for f in fields], frozenset(types), str(sub or ""), cursor, start_from
    )


def matches(node: ChainNode, req: WatchRequest) -> bool:
    if req.event_types and node.event_type not in req.event_types:
        return False
    return not req.sub_resource or node.sub_resource == req.sub_resource


def render(state: SimState, node: ChainNode, req: WatchRequest) -> dict[str, Any]:
    detail = state.detail_for(req.resource, node)
    if req.fields and req.resource not in FIELDS_IGNORED:
        # gjson on each requested top-level key: an absent one comes back as null, deletes included.
        detail = {f: detail.get(f) for f in req.fields}
    return {
        "bk_cursor": node.cursor,
        "bk_resource": req.resource,
        "bk_event_type": node.event_type,
        "bk_detail": detail,
    }


def placeholder(cursor: str, resource: str) -> WatchAnswer:
    event = {"bk_cursor": cursor, "bk_resource": resource, "bk_event_type": "", "bk_detail": {}}
    return WatchAnswer(False, [event])


def _window_start(state: SimState) -> int:
    return int(state.clock.now() - state.retention)


def _newest_retained(state: SimState, resource: str) -> ChainNode | None:
    newest = state.chain_of(resource).newest
    if newest is None or newest.sec < _window_start(state):
        return None
    return newest


def answer_now(state: SimState, req: WatchRequest) -> WatchAnswer:
    """From now: the newest event of the window if it matches, else the NoEventCursor placeholder."""
    newest = _newest_retained(state, req.resource)
    if newest is not None and matches(newest, req):
        return WatchAnswer(True, [render(state, newest, req)])
    return placeholder(NO_EVENT_CURSOR, req.resource)


def answer_start_from(state: SimState, req: WatchRequest) -> WatchAnswer:
    """Replay from a time: events with cluster time sec > start, strictly, up to 200."""
    age = state.clock.now() - req.start_from
    if not 0 <= age <= state.retention:
        raise WatchError(CODE_START_FROM_INVALID, "'bk_start_from' data parameter verification does not pass")
    newest = _newest_retained(state, req.resource)
    if newest is None:
        return placeholder(NO_EVENT_CURSOR, req.resource)
    if req.start_from >= newest.sec:
        if matches(newest, req):
            return WatchAnswer(True, [render(state, newest, req)])
        return placeholder(NO_EVENT_CURSOR, req.resource)
    chain = state.chain_of(req.resource)
    first = max(chain.first_after(req.start_from), chain.first_at_or_after(_window_start(state)))
    events, _ = scan(state, req, first)
    if events:
        return WatchAnswer(True, events)
    return placeholder(newest.cursor, req.resource)


def locate(state: SimState, req: WatchRequest) -> int:
    """The seq to read from for a cursor-mode request; WatchError(1103007) when the cursor is gone."""
    chain = state.chain_of(req.resource)
    if req.cursor == NO_EVENT_CURSOR:
        # The earliest retained event, inclusive; with none retained, after the last recorded node.
        return chain.first_at_or_after(_window_start(state))
    node = chain.find(req.cursor)
    # Nodes outside the window are gone, except the newest: the watch token keeps it (PRs #4801, #5661).
    if node is None or (node.sec < _window_start(state) and node is not chain.newest):
        raise WatchError(CODE_CURSOR_EXPIRED, "Event chain node not exist")
    return node.seq + 1


def scan(state: SimState, req: WatchRequest, start: int) -> tuple[list[dict[str, Any]], int]:
    """Up to 200 matching events from seq ``start`` on, and the seq after the last node looked at."""
    chain = state.chain_of(req.resource)
    events: list[dict[str, Any]] = []
    end = max(start, chain.first_seq)
    for node in chain.iter_from(start):
        end = node.seq + 1
        if matches(node, req):
            events.append(render(state, node, req))
            if len(events) >= EVENT_STEP:
                break
    return events, end
