"""Cursor and start-time losses, request by request: where rwatch resumes, which gap it records, and that it never
loops (DESIGN.md invariant 4; issue 12, points 6 and 8). A fake CMDB answers like the real one: 1103007 for an
unknown cursor, 1199006 for a start time outside ``0 <= now - start <= held``, a placeholder otherwise."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rwatch.cmdb import protocol as p
from rwatch.config import load_config
from rwatch.errors import CursorExpired, StartOutOfWindow
from rwatch.watch.batch import Position
from rwatch.watch.resume import RESUME_MARGIN, WINDOW_TRIES
from rwatch.watch.watcher import Watcher

NOW = 1_700_000_000.0
HOUR = 3600.0


class FakeCmdb:
    """A CMDB whose clock reads ``now`` and that keeps ``held`` seconds of history."""

    def __init__(self, held: float, now: float = NOW) -> None:
        self.held = held
        self.now = now
        self.requests: list[tuple[str, Any]] = []

    def server_now(self) -> float:
        return self.now

    async def watch(self, resource: str, *, cursor: str | None = None, start_from: int | None = None,
                    **_: Any) -> p.WatchReply:
        self.now += 0.5  # the server's error delay: its clock moves between two requests
        if cursor:
            self.requests.append(("cursor", cursor))
            raise CursorExpired("Event chain node not exist", code=p.CODE_CURSOR_EXPIRED, resource=resource)
        if start_from is not None:
            self.requests.append(("start_from", start_from))
            if not 0 <= self.now - start_from <= self.held:
                raise StartOutOfWindow("'bk_start_from' invalid", code=p.CODE_START_FROM_INVALID, resource=resource)
        else:
            self.requests.append(("now", None))
        return p.WatchReply(False, [p.WatchEvent(p.NO_EVENT_CURSOR, resource, "", {})])


class Gaps:
    def __init__(self) -> None:
        self.gaps: list[tuple[float, float, str]] = []

    async def add_gap(self, tenant: str, resource: str, start: float, end: float, reason: str) -> Any:
        assert end >= start, f"a gap ends before it starts ({start} > {end})"
        self.gaps.append((start, end, reason))

        class Gap:
            id = len(self.gaps)

        return Gap()


def make(cmdb: FakeCmdb, store: Gaps, *, retention: str = "3h", lookback: str = "5m") -> Watcher:
    cfg = load_config(None, environ={"RWATCH_WATCH__RETENTION": retention, "RWATCH_WATCH__LOOKBACK": lookback})
    nothing: Any = None
    return Watcher("host", settings=cfg.watch.resources["host"], watch=cfg.watch, tenant="0", client=cmdb,
                   bus=nothing, store=store, stop=asyncio.Event())  # type: ignore[arg-type]


def cursor_at(sec: float) -> str:
    return p.Cursor(2, "a" * 24, "update", int(sec), 1).encode()


async def test_a_server_that_keeps_less_resumes_inside_its_window_with_the_gap_exactly_to_the_start() -> None:
    cmdb, store = FakeCmdb(held=1 * HOUR), Gaps()
    w = make(cmdb, store)
    last = NOW - 2 * HOUR
    w.position = Position(cursor=cursor_at(last), event_time=last)
    reply = await w.poll_once()
    assert reply is not None
    span = 3 * HOUR - RESUME_MARGIN
    starts = [start for mode, start in cmdb.requests if mode == "start_from"]
    # last − lookback (refused), the configured edge skipped (earlier than what was refused), half (refused), a
    # quarter (accepted): a few requests, never "from now".
    assert [mode for mode, _ in cmdb.requests] == ["cursor", "start_from", "start_from", "start_from"]
    assert starts[0] == int(last - 300)
    assert abs(starts[1] - (NOW - span / 2)) < 5 and abs(starts[2] - (NOW - span / 4)) < 5
    assert store.gaps == [(last, float(starts[2]), "start_out_of_window")]
    w.normalize(reply)
    assert w.position.mode == "cursor"  # the accepted reply's cursor is the next position


async def test_a_reset_start_time_that_fell_out_of_the_window_resumes_at_its_edge() -> None:
    """A start time refused while the server keeps what rwatch expects: its window's edge is accepted at once."""
    cmdb, store = FakeCmdb(held=6 * HOUR), Gaps()
    w = make(cmdb, store, retention="6h")
    refused = int(NOW - 7 * HOUR)
    w.position = Position(start_from=refused, event_time=float(refused))
    assert await w.poll_once() is not None
    edge = [start for mode, start in cmdb.requests if mode == "start_from"][1]
    assert abs(edge - (NOW - 6 * HOUR + RESUME_MARGIN)) < 5
    assert store.gaps == [(float(refused), float(edge), "start_out_of_window")]


async def test_every_start_refused_ends_from_now_in_a_bounded_number_of_requests() -> None:
    cmdb, store = FakeCmdb(held=-1.0), Gaps()  # refuses every start time
    w = make(cmdb, store)
    last = NOW - 2 * HOUR
    w.position = Position(cursor=cursor_at(last), event_time=last)
    assert await w.poll_once() is not None
    modes = [mode for mode, _ in cmdb.requests]
    assert modes[0] == "cursor" and modes[-1] == "now" and modes.count("now") == 1
    assert 1 + 1 <= modes.count("start_from") <= 1 + WINDOW_TRIES  # never a loop
    assert len(modes) <= 6
    [(start, end, reason)] = store.gaps
    assert (start, reason) == (last, "start_out_of_window") and end == pytest.approx(cmdb.now, abs=2)


async def test_a_start_the_server_takes_for_the_future_resumes_a_minute_back_and_loses_nothing() -> None:
    """The server's clock is behind the one rwatch reckons (within the few seconds its Date header is trusted
    to): a start time just before our now is in its future. A minute before its now loses nothing."""
    cmdb, store = FakeCmdb(held=3 * HOUR, now=NOW - 4), Gaps()
    w = make(cmdb, store)
    refused = int(NOW - 1)
    cmdb.server_now = lambda: NOW  # type: ignore[method-assign]  # our estimate of its clock: 4 s ahead of it
    w.position = Position(start_from=refused, event_time=float(refused))
    assert await w.poll_once() is not None
    starts = [start for mode, start in cmdb.requests if mode == "start_from"]
    assert starts == [refused, int(NOW - RESUME_MARGIN)]
    assert store.gaps == []


async def test_a_lookback_of_zero_still_replays_the_last_events_second() -> None:
    """CMDB answers the events strictly after the second it is given: resuming at the last event's own second
    would skip the events that shared it. lookback = 0 means "from the second before"."""
    cmdb, store = FakeCmdb(held=3 * HOUR), Gaps()
    w = make(cmdb, store, lookback="0s")
    last = NOW - 600
    w.position = Position(cursor=cursor_at(last), event_time=last)
    await w.recover(CursorExpired("gone", code=p.CODE_CURSOR_EXPIRED))
    assert w.position.start_from == int(last) - 1
    assert store.gaps == []


async def test_a_refusal_of_a_mode_the_request_did_not_use_backs_off_and_records_nothing() -> None:
    """1199006 to a request without a start time (a scripted fault, a confused proxy): no search, no gap."""
    cmdb, store = FakeCmdb(held=3 * HOUR), Gaps()
    w = make(cmdb, store)
    w.position = Position(cursor=cursor_at(NOW - 600), event_time=NOW - 600)
    refusal = StartOutOfWindow("'bk_start_from' invalid", code=p.CODE_START_FROM_INVALID, resource="host")

    async def refuse(resource: str, **_: Any) -> p.WatchReply:
        raise refusal

    cmdb.watch = refuse  # type: ignore[method-assign]
    with pytest.raises(StartOutOfWindow):
        await w._call()
    assert w.position.cursor == cursor_at(NOW - 600) and store.gaps == []
