"""Where to resume after CMDB refused our position (1103007, 1199006), and which history is truly lost (invariant 4).

Cursor refused (1103007) -> resume by time: the last event − lookback if inside the window (and always at least the
second before the last event's: CMDB answers only events *after* the second it is given, so the last event's own
second is replayed), else from the oldest retained second, the rest lost. Start time refused (1199006: the server
keeps less than ``retention``, or the clocks disagree) -> a bounded search inside the window (``next_start``); what
is lost, known once a start is accepted, is exactly [first refused start (or the last event seen, when later),
accepted start). When no try is left, from now, the rest lost. Never a loop: at most six requests per loss (the
cursor, the start it led to, ``WINDOW_TRIES`` starts, from now). Nothing here awaits: it names the gap (``Lost``)
and the watcher records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rwatch import metrics as m
from rwatch.errors import CursorExpired, StartOutOfWindow
from rwatch.events import iso_utc
from rwatch.watch.batch import Position

# How far inside the retention window a forced resume starts, so the request is not refused on arrival.
RESUME_MARGIN = 60.0
# After a start time is refused (1199006), at most this many other start times are tried before "from now".
WINDOW_TRIES = 3


@dataclass(frozen=True, slots=True)
class Lost:
    """History the watcher will never see from the stream: a gap to record."""

    start: float
    end: float
    reason: str


@dataclass(slots=True)
class WindowSearch:
    """After a start time was refused (1199006): where unseen history begins, and the tries made so far."""

    lost_from: float
    tries: int = 0
    depth: int = 0  # the next fraction of the window to try (retention, 1/2, 1/4)


class Recovery:
    def __init__(self, resource: str, *, retention: float, lookback: float, log: Any) -> None:
        self.resource = resource
        self.retention = retention
        self.lookback = lookback
        self.log = log
        self.window: WindowSearch | None = None  # after a 1199006: the search for a start the server accepts

    def refused(self, exc: CursorExpired | StartOutOfWindow, pos: Position, now: float) -> tuple[Position, Lost | None]:
        """The next position after the server (whose clock reads ``now``) refused ``pos``, and what is lost."""
        last = pos.event_time
        if isinstance(exc, StartOutOfWindow) and pos.start_from is not None:
            return self._start_refused(exc, pos, now)
        m.CURSOR_EXPIRED.labels(self.resource).inc()
        oldest = now - self.retention + RESUME_MARGIN
        wanted = (last if last is not None else now) - self.lookback
        if last is not None:
            # CMDB answers the events *after* the second it is given: the second before the last event's, at the
            # latest, or the events that shared that second and came after it would be skipped (lookback = 0).
            wanted = min(wanted, math.floor(last) - 1)
        start = max(wanted, oldest)
        self.log.warning("cursor_expired", code=exc.code, cursor=pos.cursor, last_event_time=last,
                         resume_from=int(start))
        lost = None
        if last is None or last < oldest:  # the lookback before ``last`` is a margin, not lost history
            lost = Lost(last if last is not None else 0.0, start, "cursor_expired")
        return pos.moved(start_from=int(start), event_time=last), lost

    def _start_refused(self, exc: StartOutOfWindow, pos: Position, now: float) -> tuple[Position, Lost | None]:
        refused, last = pos.start_from, pos.event_time
        assert refused is not None
        search = self.window
        if search is None:
            m.CURSOR_EXPIRED.labels(self.resource).inc()
            # What we have not seen starts at the refused start, or at the last event seen when that is later (a
            # start of last − lookback: the lookback is a margin, not history).
            search = self.window = WindowSearch(float(max(refused, last) if last is not None else refused))
        start = next_start(search, refused, now, self.retention)
        self.log.warning("start_from_refused", code=exc.code, start_from=refused, attempt=search.tries,
                         resume_from=start if start is not None else "now", server_now=int(now))
        if start is not None:
            return pos.moved(start_from=start, event_time=last), None
        # No try left: only "from now" remains, and everything since what we last saw is lost.
        self.window = None
        lost = Lost(search.lost_from, now, "start_out_of_window") if now > search.lost_from else None
        return pos.moved(event_time=last), lost

    def accepted(self, start: int) -> Lost | None:
        """A start time was accepted after a refusal: what lay before it, back to what we last saw, is lost."""
        search, self.window = self.window, None
        assert search is not None
        self.log.info("start_from_accepted", start_from=start, lost_from=iso_utc(search.lost_from),
                      attempts=search.tries)
        return Lost(search.lost_from, float(start), "start_out_of_window") if start > search.lost_from else None


def next_start(search: WindowSearch, refused: int, now: float, retention: float) -> int | None:
    """The next start time to try after ``refused`` was refused, or None when none is left.

    Refused from inside the window as we reckon the server's clock (its ``Date`` header, corrected for when more
    than a few seconds off): the server took it for the future, its clock being behind the one we read. A minute
    before its now (then two, four) loses nothing, nothing newer than its now existing. Refused as too old: the
    server keeps less than ``retention``. Try the window's edge as configured, then half of it, then a quarter,
    each at least a minute later than the start just refused.
    """
    if search.tries >= WINDOW_TRIES:
        return None
    search.tries += 1
    if refused >= now - RESUME_MARGIN:
        return int(now - RESUME_MARGIN * 2 ** (search.tries - 1))
    span = retention - RESUME_MARGIN
    for depth in range(search.depth, WINDOW_TRIES):
        candidate = int(now - span / 2**depth)
        if candidate >= refused + RESUME_MARGIN:
            search.depth = depth + 1
            return candidate
    return None
