"""Gap recording and reconciliation alone, on a fake store and resyncer: a recorded gap is resynced at once and
filled, a failed resync is tried again after the GAPS pause, an unsupported resource keeps its gaps open."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog

from rwatch.errors import ResyncUnsupported
from rwatch.retry import Policy
from rwatch.store.records import Gap
from rwatch.watch.gaps import Gaps


class Store:
    def __init__(self) -> None:
        self.open: dict[int, Gap] = {}
        self.filled: list[int] = []

    async def add_gap(self, tenant: str, resource: str, start: float, end: float, reason: str) -> Gap:
        gap = Gap(len(self.open) + len(self.filled) + 1, tenant, resource, start, end, reason, time.time(), None)
        self.open[gap.id] = gap
        return gap

    async def gaps(self, tenant: str, resource: str) -> list[Gap]:
        return list(self.open.values())

    async def fill_gap(self, gap_id: int, now: float) -> None:
        self.open.pop(gap_id)
        self.filled.append(gap_id)


@dataclass
class Result:
    resource: str
    complete: bool = True
    resync_id: str = "r1"
    listed: int = 3


class Resyncer:
    def __init__(self, *outcomes: bool) -> None:
        self.outcomes = list(outcomes)  # True: complete, False: the resync fails
        self.runs: list[str] = []

    def check(self, resource: str) -> None:
        if resource == "plat_x":
            raise ResyncUnsupported("no listing for it", resource=resource)

    async def run(self, resource: str, *, trigger: str) -> Result:
        self.runs.append(trigger)
        if not self.outcomes.pop(0):
            raise RuntimeError("listing failed")
        return Result(resource)


def gaps(store: Store, resyncer: Resyncer, resource: str = "host") -> Gaps:
    fake: Any = store
    keeper = Gaps(fake, tenant="0", resource=resource, resyncer=resyncer, every=0.0,  # type: ignore[arg-type]
                  log=structlog.get_logger("test"))
    keeper.pause = Policy("test", 0.05, 0.1).wait()
    return keeper


async def until(check: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_recorded_gap_is_resynced_at_once_and_filled() -> None:
    store, resyncer = Store(), Resyncer(True)
    keeper, term_over = gaps(store, resyncer), asyncio.Event()
    task = asyncio.create_task(keeper.reconcile(term_over))
    await asyncio.sleep(0.05)
    assert resyncer.runs == []  # nothing open: it waits
    await keeper.record(10.0, 20.0, "cursor_expired", stop=term_over)
    await until(lambda: store.filled == [1])
    assert resyncer.runs == ["gap"]
    term_over.set()
    await asyncio.wait_for(task, 2)


async def test_a_failed_resync_is_tried_again_after_the_pause() -> None:
    store, resyncer = Store(), Resyncer(False, True)
    await store.add_gap("0", "host", 0.0, 5.0, "bootstrap")
    keeper, term_over = gaps(store, resyncer), asyncio.Event()
    task = asyncio.create_task(keeper.reconcile(term_over))
    await until(lambda: store.filled == [1])
    assert resyncer.runs == ["bootstrap", "bootstrap"] and keeper.pause.streak == 0
    term_over.set()
    await asyncio.wait_for(task, 2)


async def test_an_unsupported_resource_keeps_its_gaps_open_until_the_term_ends() -> None:
    store, resyncer = Store(), Resyncer()
    await store.add_gap("0", "plat_x", 0.0, 5.0, "cursor_expired")
    keeper, term_over = gaps(store, resyncer, "plat_x"), asyncio.Event()
    task = asyncio.create_task(keeper.reconcile(term_over))
    await asyncio.sleep(0.2)
    assert resyncer.runs == [] and list(store.open) == [1] and not task.done()
    term_over.set()
    await asyncio.wait_for(task, 2)
