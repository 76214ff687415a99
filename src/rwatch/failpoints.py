"""Named fail points for crash tests: ``RWATCH_FAILPOINTS="watch.after_publish=kill@3"``.

``kill`` sends SIGKILL to this process the Nth time the point is reached (default the first), which is
how the tests crash rwatch between a broker confirm and the cursor save. With the variable unset,
``failpoint()`` is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_points: dict[str, list[int]] = {}


def _parse(spec: str) -> dict[str, list[int]]:
    points: dict[str, list[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        verb, _, nth = action.partition("@")
        if verb != "kill":
            raise ValueError(f"RWATCH_FAILPOINTS: unknown action {verb!r} for {name!r} (known: kill)")
        points[name] = [int(nth or "1"), 0]
    return points


def configure(spec: str | None = None) -> None:
    global _points
    _points = _parse(spec if spec is not None else os.environ.get("RWATCH_FAILPOINTS", ""))


def failpoint(name: str) -> None:
    point = _points.get(name)
    if point is None:
        return
    point[1] += 1
    if point[1] == point[0]:
        os.kill(os.getpid(), signal.SIGKILL)


configure()
