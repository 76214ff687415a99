"""The projection loop's pacing: one projection per debounce while changes keep coming, and never more than half
of the process's time working here (what it spends waiting on the downstream system does not count)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest
from prometheus_client import Counter

from rwatch.sinks.projection import IDLE_SHARE, Projection, pause_after

RENDERS = Counter("test_projection_renders", "renders", ["sink"])
ERRORS = Counter("test_projection_errors", "errors", ["sink"])


class Source:
    def __init__(self) -> None:
        self.listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)

    async def topology(self, tenant: str | None = None) -> list[object]:
        return []


class Busy(Projection):
    """Each projection works ``work`` seconds here (the CPU held, as a mirror read and a computation do) and then
    waits ``wait`` seconds on a downstream system, telling the loop which is which when ``tells``."""

    kind = "test"

    def __init__(self, work: float, wait: float, tells: bool) -> None:
        super().__init__("p", Source(), debounce=0.0, renders=RENDERS, errors=ERRORS)
        self.work, self.wait, self.tells = work, wait, tells
        self.spans: list[tuple[float, float]] = []

    async def project(self) -> None:
        started = time.monotonic()
        while time.monotonic() - started < self.work:
            pass  # the event loop and the GIL held, as a projection's own work holds them
        if self.tells:
            self.local_seconds = time.monotonic() - started
        await asyncio.sleep(self.wait)
        self.spans.append((started, time.monotonic()))


def test_the_pause_is_the_rest_of_the_debounce_or_the_local_work_whichever_is_longer() -> None:
    assert pause_after(0.02, None, 0.1) == pytest.approx(0.08)
    assert pause_after(0.3, None, 0.1) == pytest.approx(0.3 * IDLE_SHARE)
    assert pause_after(0.3, 0.05, 0.1) == pytest.approx(0.05 * IDLE_SHARE)  # 0.25 s waiting on Zabbix: no debt
    assert pause_after(0.3, 0.5, 0.1) == pytest.approx(0.3 * IDLE_SHARE)  # never more than it took


@pytest.mark.parametrize("tells", [False, True], ids=["work-unknown", "work-told"])
async def test_a_projection_under_a_stream_of_changes_leaves_the_process_idle_after_its_local_work(
        tells: bool) -> None:
    """Changes every 5 ms: each projection is followed by at least its own work in idle (the mirror applies then),
    whether or not it told the loop which part was waiting on the downstream system (the pure test above pins what
    telling saves)."""
    sink = Busy(work=0.05, wait=0.1, tells=tells)
    await sink.open()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            sink.mark_dirty()
            await asyncio.sleep(0.005)
    finally:
        await sink.close()
    spans = sink.spans[1:-1]  # the first came from open(), the last from close() (a last render, at once)
    assert len(spans) >= 3
    owed = (0.05 if tells else 0.15) * IDLE_SHARE
    gaps = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    assert min(gaps) >= owed * 0.95, gaps
