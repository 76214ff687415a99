"""Where each followed resource stands: the plain state a watcher publishes while it holds the lease, and the
registry that ``/status``, ``/readyz`` and the metrics read it from.

It sits below the metrics, the status page and the watchers, so none of them holds another's objects: a watcher
publishes its ``WatchState`` for a term and updates it in place; readers only read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class WatchHealth:
    resource: str
    lag: float  # seconds since the watcher last knew it was at the head of the stream
    cursor_age: float | None  # seconds since the saved cursor's event
    retention_alarm: bool  # lag past two thirds of watch.retention: history will be lost if it goes on
    polled_ago: float | None = None  # seconds since the last successful watch request (None: none yet)
    # While CMDB refuses the watcher (credentials, grant, tenant, IAM): {"reason", "code", "api", "fix", "since"}
    refused: dict[str, Any] | None = None


@dataclass(eq=False, slots=True)
class WatchState:
    """What one watcher knows of its resource, updated in place by the watcher and read by everyone else."""

    resource: str
    owner: str  # the lease owner: /status lists only this process's watchers
    retention: float  # watch.retention: the lag alarm is at two thirds of it
    clock: Callable[[], float] = time.time
    mode: str = "now"  # how the next poll starts: cursor, start_from or now
    cursor: str | None = None  # the saved cursor
    event_time: float | None = None  # the saved cursor's event time, when known
    caught_up_at: float = field(default=0.0)  # wall time the watcher last knew it was at the head
    last_poll: float | None = None  # monotonic time of the last successful watch request
    refused: dict[str, Any] | None = None  # while CMDB refuses us: why, and the fix (readiness)

    def health(self) -> WatchHealth:
        """Lag (seconds since the watcher last knew it was at the head of the stream), cursor age, and whether the
        lag passed two thirds of ``retention``: history is lost when it reaches all of it."""
        now = self.clock()
        lag = max(0.0, now - self.caught_up_at)
        age = max(0.0, now - self.event_time) if self.event_time is not None else None
        polled = time.monotonic() - self.last_poll if self.last_poll is not None else None
        return WatchHealth(self.resource, lag, age, lag > self.retention * 2 / 3, polled,
                           dict(self.refused) if self.refused is not None else None)


_FOLLOWED: set[WatchState] = set()  # the states of the terms running now (a watcher holds the lease)


def publish(state: WatchState) -> None:
    """A term began: its resource is followed by this process, as ``state`` tells."""
    _FOLLOWED.add(state)


def withdraw(state: WatchState) -> None:
    _FOLLOWED.discard(state)


def states() -> list[WatchState]:
    return sorted(_FOLLOWED, key=lambda s: s.resource)


def healths() -> list[WatchHealth]:
    return [s.health() for s in states()]
