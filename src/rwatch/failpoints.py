"""Named fail points for crash tests: ``RWATCH_FAILPOINTS="watch.after_publish=kill@3"``.

``kill`` sends SIGKILL to this process the Nth time the point is reached (default the first), which is
how the tests crash rwatch between a broker confirm and the cursor save. ``term`` sends SIGTERM instead:
a clean stop asked for at exactly that instant (the stop must still finish the work in hand and exit 0).
Several points: ``a=kill@3,b=term``. With the variable unset, ``failpoint()`` is one dict lookup.

The points (tests/chaos/README.md says which fault each one serves):

- ``bus.after_confirm``: one publish of a batch was confirmed, the others of its window may still be in
  flight (after publish, before confirm); src/rwatch/bus/amqp.py.
- ``watch.after_publish``: the whole batch is confirmed, its cursor not yet saved; ``watch.after_save``
  just after the save; src/rwatch/watch/deliver.py.
- ``consume.after_apply``: a sink applied a batch, not yet acknowledged; src/rwatch/bus/consumer.py.
- ``resync.after_page``: a resync published a page of its snapshot, more to come; src/rwatch/watch/snapshot.py.
"""

from __future__ import annotations

import os
import signal

_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
_points: dict[str, tuple[signal.Signals, list[int]]] = {}


def _parse(spec: str) -> dict[str, tuple[signal.Signals, list[int]]]:
    points: dict[str, tuple[signal.Signals, list[int]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        verb, _, nth = action.partition("@")
        if verb not in _SIGNALS:
            raise ValueError(f"RWATCH_FAILPOINTS: unknown action {verb!r} for {name!r} (known: kill, term)")
        points[name] = (_SIGNALS[verb], [int(nth or "1"), 0])
    return points


def configure(spec: str | None = None) -> None:
    global _points
    _points = _parse(spec if spec is not None else os.environ.get("RWATCH_FAILPOINTS", ""))


def failpoint(name: str) -> None:
    point = _points.get(name)
    if point is None:
        return
    sig, hits = point
    hits[1] += 1
    if hits[1] == hits[0]:
        os.kill(os.getpid(), sig)


configure()
