"""The lease object alone, on a fake store: it waits for a held lease, renews, notices a take-over, gives up before
its expiry when it cannot renew, and wakes from its wait when the process stops."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY

from rwatch.errors import Stopping, StoreError
from rwatch.watch.lease import Lease


class Leases:
    """One resource's lease as the store keeps it: a holder, and a fence that grows with every new holder."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.fence = 0
        self.reachable = asyncio.Event()
        self.reachable.set()
        self.failures = 0  # the next calls that fail at once
        self.calls = 0

    async def acquire(self, tenant: str, resource: str, owner: str, ttl: float) -> int | None:
        self.calls += 1
        await self.reachable.wait()
        if self.failures:
            self.failures -= 1
            raise StoreError("down")
        if self.holder not in (None, owner):
            return None
        if self.holder != owner:
            self.holder, self.fence = owner, self.fence + 1
        return self.fence

    async def release(self, tenant: str, resource: str, owner: str) -> None:
        if self.holder == owner:
            self.holder = None

    def take(self, owner: str) -> None:
        self.holder, self.fence = owner, self.fence + 1


def lease(store: Leases, ttl: float = 0.6) -> Lease:
    fake: Any = store
    return Lease(fake, tenant="0", resource="set", owner="me", ttl=ttl, log=structlog.get_logger("test"))


def losses(reason: str) -> float:
    return REGISTRY.get_sample_value("rwatch_lease_losses_total", {"resource": "set", "reason": reason}) or 0.0


async def test_acquire_waits_while_another_holds_it_and_says_so_once() -> None:
    store = Leases()
    store.take("other")
    waited: list[float] = []
    held = lease(store)
    task = asyncio.create_task(held.acquire(asyncio.Event(), lambda: waited.append(time.monotonic())))
    await asyncio.sleep(0.5)  # asked every ttl/3: a few times
    assert not task.done() and store.calls >= 2 and len(waited) == 1
    await store.release("0", "set", "other")
    assert await asyncio.wait_for(task, 2) == 2
    assert held.fence == 2 and not held.expired() and held.deadline < float("inf")


async def test_acquire_retries_a_failing_store_and_stops_with_the_process() -> None:
    store = Leases()
    store.failures = 2
    assert await lease(store).acquire(asyncio.Event(), lambda: None) == 1
    store.take("other")
    stopping = asyncio.Event()
    task = asyncio.create_task(lease(store).acquire(stopping, lambda: None))
    await asyncio.sleep(0.05)
    stopping.set()
    with pytest.raises(Stopping):
        await asyncio.wait_for(task, 2)


async def test_keep_renews_until_the_lease_is_taken_over() -> None:
    store = Leases()
    held = lease(store)
    await held.acquire(asyncio.Event(), lambda: None)
    before = losses("taken_over")
    keeper = asyncio.create_task(held.keep())
    await asyncio.sleep(0.5)  # renewed twice: still ours
    assert not keeper.done() and not held.expired()
    store.take("thief")
    await asyncio.wait_for(keeper, 1.0)  # the next renewal, ttl/3 later
    assert losses("taken_over") == before + 1


async def test_keep_gives_up_before_the_expiry_when_it_cannot_renew() -> None:
    store = Leases()
    held = lease(store, ttl=0.9)
    await held.acquire(asyncio.Event(), lambda: None)
    before = losses("not_renewed")
    store.reachable.clear()  # every renewal hangs
    cut = time.monotonic()
    await asyncio.wait_for(held.keep(), 2.0)
    # By the expiry minus ttl/3 (0.6 s after the acquire), never past it by much.
    assert time.monotonic() - cut <= 0.6 + 0.15
    assert held.expired() and losses("not_renewed") == before + 1
    held.end()
    assert held.fence is None and not held.expired()
