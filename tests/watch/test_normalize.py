"""Normalization: the contract fields, the placeholder and NoEventCursor rules, bad events from CMDB."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY

from rwatch.cmdb import protocol as p
from rwatch.config import load_config
from rwatch.events import Event, watch_event_id
from rwatch.store.records import CursorState
from rwatch.watch.watcher import Watcher


def make(resource: str = "host") -> Watcher:
    cfg = load_config(None, environ={})
    # normalize() touches none of the collaborators; they are never called here.
    nothing: Any = None
    return Watcher(resource, settings=cfg.watch.resources[resource], watch=cfg.watch, tenant="7",
                   client=nothing, bus=nothing, store=nothing, stop=asyncio.Event(), clock=lambda: 1_700_000_123.5)


def cursor(sec: int, inc: int, op: str = "update", oid: str = "a" * 24) -> str:
    return p.Cursor(2, oid, op, sec, inc).encode()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_events_follow_the_contract() -> None:
    w = make()
    c1, c2 = cursor(1_700_000_000, 3), cursor(1_700_000_001, 1, "delete")
    reply = p.WatchReply(True, [
        p.WatchEvent(c1, "host", "update", {"bk_host_id": 5, "bk_host_name": "a"}),
        p.WatchEvent(c2, "host", "delete", {"bk_host_id": 6}),
    ])
    batch = w.normalize(reply)
    first = batch.events[0]
    assert first.to_dict() == {
        "schema": 1, "id": watch_event_id("host", c1), "resource": "host", "action": "update", "key": "5",
        "tenant": "7", "version": [1_700_000_000, 3], "occurred_at": "2023-11-14T22:13:20Z",
        "observed_at": "2023-11-14T22:15:23.500000Z", "origin": "watch", "cursor": c1,
        "data": {"bk_host_id": 5, "bk_host_name": "a"},
    }
    # What goes on the wire validates against the model: the fast path builds nothing the contract refuses.
    assert Event.from_json(first.to_json()) == first
    assert batch.state == CursorState("7", "host", c2, (1_700_000_001, 1), 1_700_000_001.0, 1_700_000_123.5)
    assert w.position.cursor == c2 and w.position.event_time == 1_700_000_001.0


def test_no_event_cursor_is_polled_with_but_never_saved() -> None:
    w = make()
    batch = w.normalize(p.WatchReply(False, [p.WatchEvent(p.NO_EVENT_CURSOR, "host", "", {})]))
    assert batch.events == [] and batch.state is None
    assert w.position.cursor == p.NO_EVENT_CURSOR and w.position.mode == "cursor"


def test_a_reply_without_elements_never_moves_the_position() -> None:
    """The client refuses such replies as malformed; should one reach normalize, it is no "from now"."""
    w = make()
    c = cursor(1_700_000_050, 2)
    w.normalize(p.WatchReply(True, [p.WatchEvent(c, "host", "update", {"bk_host_id": 1})]))
    batch = w.normalize(p.WatchReply(True, []))
    assert batch.events == [] and batch.state is None
    assert w.position.cursor == c and w.position.mode == "cursor" and w.position.event_time == 1_700_000_050.0


def test_placeholder_cursor_is_saved_but_an_unchanged_one_is_not() -> None:
    w = make()
    c = cursor(1_700_000_050, 2)
    batch = w.normalize(p.WatchReply(False, [p.WatchEvent(c, "host", "", {})]))
    assert batch.events == [] and batch.state is not None and batch.state.cursor == c
    w.saved = batch.state
    again = w.normalize(p.WatchReply(False, [p.WatchEvent(c, "host", "", {})]))
    assert again.state is None


def test_bad_events_are_counted_and_skipped_but_the_cursor_moves_past_them() -> None:
    w = make("module")
    before_key = sample("rwatch_events_invalid_total", resource="module", reason="no_key")
    before_type = sample("rwatch_events_invalid_total", resource="module", reason="bad_event_type")
    good, nokey, badtype = cursor(1_700_000_060, 1), cursor(1_700_000_060, 2), cursor(1_700_000_060, 3)
    batch = w.normalize(p.WatchReply(True, [
        p.WatchEvent(good, "module", "create", {"bk_module_id": 1}),
        p.WatchEvent(nokey, "module", "update", {}),
        p.WatchEvent(badtype, "module", "archive", {"bk_module_id": 1}),
    ]))
    assert [e.cursor for e in batch.events] == [good]
    assert batch.state is not None and batch.state.cursor == badtype
    assert sample("rwatch_events_invalid_total", resource="module", reason="no_key") == before_key + 1
    assert sample("rwatch_events_invalid_total", resource="module", reason="bad_event_type") == before_type + 1


def test_undecodable_cursor_falls_back_to_receive_time_in_order() -> None:
    w = make("plat")
    before = sample("rwatch_cursor_decode_failures_total", resource="plat")
    batch = w.normalize(p.WatchReply(True, [
        p.WatchEvent("opaque-1", "plat", "create", {"bk_cloud_id": 1}),
        p.WatchEvent("opaque-2", "plat", "update", {"bk_cloud_id": 1}),
    ]))
    versions = [e.version for e in batch.events]
    assert versions[0][0] == 1_700_000_123 and versions[0] < versions[1]
    assert sample("rwatch_cursor_decode_failures_total", resource="plat") == before + 2
    # The position still advances; with no decodable time, the last known event time is kept.
    assert batch.state is not None and batch.state.cursor == "opaque-2" and batch.state.version is None


def test_lag_and_the_retention_alarm() -> None:
    now = [1_700_000_000.0]
    cfg = load_config(None, environ={"RWATCH_WATCH__RETENTION": "3h"})
    nothing: Any = None
    w = Watcher("host", settings=cfg.watch.resources["host"], watch=cfg.watch, tenant="0", client=nothing,
                bus=nothing, store=nothing, stop=asyncio.Event(), clock=lambda: now[0])
    c = cursor(1_700_000_000 - 600, 1)
    w.saved = CursorState("0", "host", c, (1_700_000_000 - 600, 1), 1_700_000_000 - 600.0, 1_700_000_000.0)
    w.state.caught_up_at = now[0]
    assert w.health().lag == 0.0 and w.health().cursor_age == 600.0 and not w.health().retention_alarm
    # The watcher cannot reach the head (CMDB down, or a backlog it cannot drain): lag grows...
    now[0] += 2 * 3600
    assert w.health().lag == 7200.0 and not w.health().retention_alarm
    # ...and past two thirds of retention the alarm is up, before history is lost.
    now[0] += 1
    assert w.health().retention_alarm
    # The collector exposes it (for the resources this process holds).
    from rwatch import progress

    progress.publish(w.state)
    try:
        assert sample("rwatch_retention_alarm", resource="host") == 1.0
        assert sample("rwatch_watch_lag_seconds", resource="host") == 7201.0
        assert sample("rwatch_cursor_age_seconds", resource="host") == 7801.0
    finally:
        progress.withdraw(w.state)
    assert REGISTRY.get_sample_value("rwatch_retention_alarm", {"resource": "host"}) is None


class _Clock:
    def server_now(self) -> float:
        return 1_700_000_000.0


class _Gaps:
    def __init__(self) -> None:
        self.gaps: list[tuple[float, float, str]] = []

    async def add_gap(self, tenant: str, resource: str, start: float, end: float, reason: str) -> Any:
        if end < start:
            raise ValueError(f"a gap ends before it starts ({start} > {end})")
        self.gaps.append((start, end, reason))

        class Gap:
            id = len(self.gaps)

        return Gap()


async def test_cursor_lost_near_the_window_edge_records_no_gap_and_never_an_inverted_one() -> None:
    """The last event is inside the window but last − lookback is not: the lookback is a margin, nothing was
    lost (an earlier version recorded (last, oldest), which ends before it starts, and crashed the watcher)."""
    from rwatch.errors import CursorExpired
    from rwatch.watch.batch import Position
    from rwatch.watch.resume import RESUME_MARGIN

    cfg = load_config(None, environ={"RWATCH_WATCH__RETENTION": "3h", "RWATCH_WATCH__LOOKBACK": "5m"})
    store, client = _Gaps(), _Clock()
    w = Watcher("host", settings=cfg.watch.resources["host"], watch=cfg.watch, tenant="0", client=client,  # type: ignore[arg-type]
                bus=None, store=store, stop=asyncio.Event())  # type: ignore[arg-type]
    now = client.server_now()
    oldest = now - 3 * 3600 + RESUME_MARGIN
    for last, lost in ((oldest + 60, False), (oldest - 600, True)):
        w.position = Position(cursor=cursor(int(last), 1), event_time=last)
        await w.recover(CursorExpired("gone", code=1103007))
        assert w.position.start_from == int(oldest) if lost else int(max(last - 300, oldest))
        assert store.gaps == ([(last, oldest, "cursor_expired")] if lost else []), store.gaps
        store.gaps.clear()
