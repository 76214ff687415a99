"""Per-resource event chains and the simulated clock (pure data, no I/O).

A chain is what the server keeps in ``<coll>WatchChain``: every event of one resource in commit order, each
with its cursor and cluster time. Lookups are what the watch path needs and all stay O(log n) or O(1):
cursor → position (dict), cluster time → position (bisect), position → node (list index).
"""

from __future__ import annotations

import random
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Expired nodes are trimmed only once this many have piled up: small runs keep their whole history (tests
# compare against it), long load runs stay bounded at "retention window + this many".
DEFAULT_KEEP_EXPIRED = 10_000


class SimClock:
    """Wall time plus an offset that ``jump`` moves; every time the simulator reports comes from here."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def jump(self, seconds: float) -> float:
        """Move the clock by ``seconds`` (negative goes back) and return the new time."""
        self.offset += seconds
        return self.now()


@dataclass(slots=True)
class ChainNode:
    """One event: what the server stores in the chain plus the detail it serves for it."""

    seq: int  # position in this resource's chain, from 0, never reused
    cursor: str
    event_type: str  # create / update / delete
    key: str  # DESIGN.md key of the object
    oid: str  # the object's stable 24-hex id (Mongo _id)
    sec: int
    inc: int
    detail: dict[str, Any]  # the document at event time (delete: as it was when deleted)
    sub_resource: str = ""  # bk_obj_id for object_instance / mainline_instance

    @property
    def cluster_time(self) -> tuple[int, int]:
        return (self.sec, self.inc)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "cursor": self.cursor,
            "event_type": self.event_type,
            "key": self.key,
            "oid": self.oid,
            "cluster_time": [self.sec, self.inc],
            "detail": self.detail,
        }


class Chain:
    """The events of one resource, oldest first, trimmed lazily at the front."""

    def __init__(self, resource: str, keep_expired: int = DEFAULT_KEEP_EXPIRED) -> None:
        self.resource = resource
        self.keep_expired = keep_expired
        self._nodes: list[ChainNode] = []
        self._secs: list[int] = []  # parallel to _nodes, non-decreasing: cluster time is monotonic
        self._base = 0  # seq of _nodes[0]
        self._index: dict[str, int] = {}  # cursor -> seq
        self.trimmed = 0

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def end(self) -> int:
        """The seq the next node will get (= number of nodes ever appended)."""
        return self._base + len(self._nodes)

    @property
    def first_seq(self) -> int:
        return self._base

    @property
    def newest(self) -> ChainNode | None:
        return self._nodes[-1] if self._nodes else None

    def append(self, node: ChainNode) -> ChainNode:
        """Add a node; a node whose cursor is already in the chain replaces that one (the unique index)."""
        seq = self._index.get(node.cursor)
        if seq is not None:
            old = self._nodes[seq - self._base]
            old.detail = node.detail
            old.event_type = node.event_type
            return old
        node.seq = self.end
        self._nodes.append(node)
        self._secs.append(node.sec)
        self._index[node.cursor] = node.seq
        return node

    def get(self, seq: int) -> ChainNode | None:
        i = seq - self._base
        return self._nodes[i] if 0 <= i < len(self._nodes) else None

    def find(self, cursor: str) -> ChainNode | None:
        seq = self._index.get(cursor)
        return None if seq is None else self._nodes[seq - self._base]

    def first_at_or_after(self, sec: int) -> int:
        """Seq of the first node with cluster_time sec >= ``sec`` (``end`` when none)."""
        return self._base + bisect_left(self._secs, sec)

    def first_after(self, sec: int) -> int:
        """Seq of the first node with cluster_time sec > ``sec`` (``end`` when none)."""
        return self._base + bisect_right(self._secs, sec)

    def iter_from(self, seq: int) -> Iterator[ChainNode]:
        start = max(seq - self._base, 0)
        for i in range(start, len(self._nodes)):
            yield self._nodes[i]

    def nodes(self) -> list[ChainNode]:
        return list(self._nodes)

    def trim(self, min_sec: int) -> int:
        """Drop nodes older than ``min_sec`` once more than ``keep_expired`` piled up; keep the newest."""
        expired = min(bisect_left(self._secs, min_sec), len(self._nodes) - 1)
        if expired <= self.keep_expired:
            return 0
        for node in self._nodes[:expired]:
            del self._index[node.cursor]
        del self._nodes[:expired]
        del self._secs[:expired]
        self._base += expired
        self.trimmed += expired
        return expired


@dataclass
class EventFaults:
    """Faults in event production (§5.2): events silently lost, or collapsed onto an earlier cursor."""

    rng: random.Random = field(default_factory=random.Random)
    drop_next: int = 0  # the next N changes produce no event
    drop_probability: float = 0.0  # each change is lost with this probability
    drop_resource: str | None = None  # None = any resource
    collapse_next: int = 0  # the next N repeats of (object, op) reuse the previous event's cluster time
    collapse_resource: str | None = None

    def take_drop(self, resource: str) -> bool:
        if self.drop_resource not in (None, resource):
            return False
        if self.drop_next > 0:
            self.drop_next -= 1
            return True
        return self.drop_probability > 0 and self.rng.random() < self.drop_probability

    def clear(self) -> None:
        self.drop_next = self.collapse_next = 0
        self.drop_probability = 0.0
        self.drop_resource = self.collapse_resource = None
