"""The reply-to-batch function, directly: (reply, position) in, (batch, new position) out, nothing counted."""

from __future__ import annotations

from rwatch.cmdb import protocol as p
from rwatch.store.records import CursorState
from rwatch.watch.batch import Position, sightings, to_batch

OBSERVED = 1_700_000_123.5


def cursor(sec: int, inc: int, op: str = "update") -> str:
    return p.Cursor(2, "a" * 24, op, sec, inc).encode()


def batch_of(reply: p.WatchReply, position: Position, saved: str | None = None):  # type: ignore[no-untyped-def]
    return to_batch(reply, position, resource="host", tenant="7", observed=OBSERVED, saved=saved)


def test_the_new_position_is_returned_and_the_old_one_left_as_it_was() -> None:
    before = Position(start_from=1_699_999_000, event_time=1_699_999_000.0)
    c = cursor(1_700_000_001, 1)
    batch, after = batch_of(p.WatchReply(True, [p.WatchEvent(c, "host", "update", {"bk_host_id": 5})]), before)
    assert before == Position(start_from=1_699_999_000, event_time=1_699_999_000.0)
    assert after.cursor == c and after.mode == "cursor" and after.event_time == 1_700_000_001.0
    assert [e.key for e in batch.events] == ["5"] and batch.counts == {"update": 1}
    assert batch.state == CursorState("7", "host", c, (1_700_000_001, 1), 1_700_000_001.0, OBSERVED)


def test_no_event_cursor_moves_the_next_poll_but_saves_nothing() -> None:
    start = Position(event_time=5.0)
    batch, after = batch_of(p.WatchReply(False, [p.WatchEvent(p.NO_EVENT_CURSOR, "host", "", {})]), start)
    assert batch.state is None and batch.events == []
    assert after == Position(cursor=p.NO_EVENT_CURSOR, event_time=5.0)


def test_a_reply_without_elements_keeps_the_position() -> None:
    start = Position(cursor=cursor(1_700_000_050, 2), event_time=1_700_000_050.0)
    batch, after = batch_of(p.WatchReply(True, []), start)
    assert after == start and batch.state is None


def test_the_saved_cursor_is_not_saved_again() -> None:
    c = cursor(1_700_000_050, 2)
    batch, _ = batch_of(p.WatchReply(False, [p.WatchEvent(c, "host", "", {})]), Position(), saved=c)
    assert batch.state is None


def test_bad_events_are_listed_with_their_reason_and_skipped() -> None:
    good, nokey, badtype = cursor(1_700_000_060, 1), cursor(1_700_000_060, 2), cursor(1_700_000_060, 3)
    batch, after = batch_of(p.WatchReply(True, [
        p.WatchEvent(good, "host", "create", {"bk_host_id": 1}),
        p.WatchEvent(nokey, "host", "update", {}),
        p.WatchEvent(badtype, "host", "archive", {"bk_host_id": 1}),
    ]), Position())
    assert [e.cursor for e in batch.events] == [good]
    assert [(raw.cursor, reason) for raw, reason in batch.invalid] == [(nokey, "no_key"), (badtype, "bad_event_type")]
    assert after.cursor == badtype  # the position moves past them


def test_undecodable_cursors_stay_in_order_across_replies_of_one_second() -> None:
    one = p.WatchReply(True, [p.WatchEvent("opaque-1", "host", "update", {"bk_host_id": 1})])
    two = p.WatchReply(True, [p.WatchEvent("opaque-2", "host", "update", {"bk_host_id": 1})])
    first, position = batch_of(one, Position())
    second, position = batch_of(two, position)
    assert first.undecodable == second.undecodable == 1
    assert first.events[0].version < second.events[0].version
    assert first.events[0].version[0] == int(OBSERVED)
    # A position the watcher picks after a cursor loss carries the order on.
    third, _ = batch_of(two, position.moved(start_from=1))
    assert second.events[0].version < third.events[0].version


def test_business_sightings_report_only_changes() -> None:
    c = cursor(1_700_000_070, 1)
    batch, _ = batch_of(p.WatchReply(True, [p.WatchEvent(c, "host", "update", {"bk_host_id": 3, "default": 1})]),
                        Position())
    known: dict[str, tuple[bool, bool]] = {}
    [seen] = sightings(batch.events, known)
    assert (seen.live, seen.pool) == (True, True) and known == {"3": (True, True)}
    assert sightings(batch.events, known) == []
