"""Request counters of the simulator, readable from Python and at ``GET /admin/stats``."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any


class Stats:
    """Watch requests by (resource, mode, outcome), list-API calls by API, in-flight watches per resource,
    and requests refused before CMDB served them, by (API, reason).

    Outcomes: ``events``, ``placeholder``, ``error:<code>`` (a ``result: false`` reply),
    ``fault:<kind>`` (an injected fault answered the request). Refusal reasons: ``auth`` (gateway 401),
    ``grant`` (gateway 403 1640301), ``tenant`` (gateway 403 1640302 or CMDB's 1100005); a refused request
    is not a watch request or a list call.
    """

    def __init__(self) -> None:
        self.watch: Counter[tuple[str, str, str]] = Counter()
        self.lists: Counter[str] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()
        self.inflight: Counter[str] = Counter()
        self.inflight_max: Counter[str] = Counter()
        self._waiters: list[tuple[Callable[[Stats], bool], asyncio.Future[None]]] = []

    def begin(self, resource: str) -> None:
        self.inflight[resource] += 1
        self.inflight_max[resource] = max(self.inflight_max[resource], self.inflight[resource])
        self._notify()

    def end(self, resource: str) -> None:
        self.inflight[resource] -= 1
        self._notify()

    def record_watch(self, resource: str, mode: str, outcome: str) -> None:
        self.watch[(resource, mode, outcome)] += 1
        self._notify()

    def record_refused(self, api: str, reason: str) -> None:
        self.refused[(api, reason)] += 1
        self._notify()

    async def wait_for(self, check: Callable[[Stats], bool], timeout: float | None = None) -> None:
        """Wait until ``check(stats)`` holds, e.g. ``lambda s: s.inflight["host"] == 1`` (a parked poll)."""
        if check(self):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (check, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _notify(self) -> None:
        for check, future in list(self._waiters):
            if not future.done() and check(self):
                future.set_result(None)

    def watch_count(
        self, resource: str | None = None, mode: str | None = None, outcome: str | None = None
    ) -> int:
        """Watch requests matching every given part (None = any)."""
        return sum(
            n
            for (r, m, o), n in self.watch.items()
            if resource in (None, r) and mode in (None, m) and outcome in (None, o)
        )

    def refused_count(self, api: str | None = None, reason: str | None = None) -> int:
        """Refused requests matching every given part (None = any); ``api`` is ``resource_watch`` or a list API."""
        return sum(n for (a, r), n in self.refused.items() if api in (None, a) and reason in (None, r))

    def watch_requests(self, resource: str | None = None, mode: str | None = None) -> int:
        """Watch requests for ``resource`` (and ``mode``), whatever their outcome."""
        return self.watch_count(resource, mode)

    def in_flight(self, resource: str) -> int:
        """Watch requests for ``resource`` being handled right now (a parked long-poll counts)."""
        return self.inflight[resource]

    def reset(self) -> None:
        self.watch.clear()
        self.lists.clear()
        self.refused.clear()
        self.inflight_max = Counter({r: n for r, n in self.inflight.items() if n})

    def snapshot(self) -> dict[str, Any]:
        watch: dict[str, dict[str, dict[str, int]]] = {}
        for (resource, mode, outcome), n in sorted(self.watch.items()):
            watch.setdefault(resource, {}).setdefault(mode, {})[outcome] = n
        refused: dict[str, dict[str, int]] = {}
        for (api, reason), n in sorted(self.refused.items()):
            refused.setdefault(api, {})[reason] = n
        resources = sorted(set(self.inflight) | set(self.inflight_max))
        return {
            "watch": watch,
            "watch_total": sum(self.watch.values()),
            "lists": dict(sorted(self.lists.items())),
            "refused": refused,
            "inflight": {r: {"current": self.inflight[r], "max": self.inflight_max[r]} for r in resources},
        }
