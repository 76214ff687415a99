"""The lease a watcher holds on its resource in the store: acquired, kept, released, with its deadline and fence.

Only the holder follows the resource (a *term*). It renews every ``ttl``/3; once the lease is taken over, or cannot
be renewed before its expiry minus that margin, it is lost. ``deadline`` is the instant after which the holder must
not start a poll or a publish (the expiry minus the margin, as the last renewal established it), and every save
carries the term's ``fence``, so a save the store sees after a take-over is refused (``LeaseLost``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tenacity import RetryCallState
from tenacity.wait import wait_base

from rwatch import metrics as m
from rwatch.errors import StoreError
from rwatch.retry import STORE, retrying
from rwatch.store.base import CursorStore
from rwatch.watch.storing import stored


class Lease:
    def __init__(self, store: CursorStore, *, tenant: str, resource: str, owner: str, ttl: float, log: Any) -> None:
        self.store = store
        self.tenant = tenant
        self.resource = resource
        self.owner = owner
        self.ttl = ttl
        self.margin = ttl / 3
        self.log = log
        self.fence: int | None = None  # the fence of the current term; None outside a term
        # Monotonic time after which the pipeline must not start a poll or a publish. Infinite outside a term.
        self.deadline = float("inf")
        self._sent = 0.0  # monotonic time the last acquire or renewal was sent
        self._valid_until = 0.0  # monotonic expiry as the last successful renewal established it

    def expired(self) -> bool:
        """True once the lease may have run out: after a pause of the whole process, the pipeline can wake before
        the keeper, and must not poll or publish on a dead lease."""
        return time.monotonic() >= self.deadline

    async def acquire(self, stopping: asyncio.Event, waiting: Callable[[], None]) -> int:
        """The lease's fence, once held; asks every ttl/3 while another owner holds it (calling ``waiting`` the
        first time). Raises Stopping."""
        pause = self.margin
        queued = False

        async def attempt() -> int | None:
            self._sent = time.monotonic()
            return await stored(lambda: self.store.acquire(self.tenant, self.resource, self.owner, self.ttl),
                                stop=stopping, log=self.log)

        def held_elsewhere(_: RetryCallState) -> None:
            nonlocal queued
            if not queued:
                queued = True
                waiting()
                self.log.info("lease_waiting", owner=self.owner, retry_every=round(pause, 2))

        fence: int | None = await retrying(STORE, stop=stopping, on=(), until=lambda got: got is not None,
                                           fixed=pause, before_sleep=held_elsewhere)(attempt)
        assert fence is not None  # ``until`` returns only a held lease's fence
        self.log.info("lease_acquired", owner=self.owner, fence=fence, ttl=self.ttl)
        m.LEASE_HELD.labels(self.resource).set(1)
        self.fence = fence
        self._valid_until = self._sent + self.ttl
        self.deadline = self._valid_until - self.margin
        return fence

    async def keep(self) -> None:
        """Renew every ttl/3; return once the lease is lost: taken over, or not renewed in time (by its expiry minus
        ttl/3, counted from when the last successful renewal was *sent*)."""
        # Ends when the lease is lost; the term cancels it otherwise.
        while True:
            await asyncio.sleep(max(0.0, self._valid_until - self.ttl + self.margin - time.monotonic()))
            try:
                got: int | None = await retrying(_UntilDeadline(self), stop=None, on=(StoreError, TimeoutError),
                                                 before_sleep=self._renew_failed)(self._renew)
            except _NotRenewed:
                self.lost("not_renewed", valid_for=round(self._valid_until - time.monotonic(), 2))
                return
            if got != self.fence:
                self.lost("taken_over", new_fence=got)
                return
            self._valid_until = self._sent + self.ttl
            self.deadline = self._valid_until - self.margin

    async def _renew(self) -> int | None:
        left = self._valid_until - self.margin - time.monotonic()
        if left <= 0:
            raise _NotRenewed()
        self._sent = time.monotonic()
        async with asyncio.timeout(left):
            return await self.store.acquire(self.tenant, self.resource, self.owner, self.ttl)

    def _renew_failed(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        fields = exc.fields() if isinstance(exc, StoreError) else {"error": "timeout"}
        left = self._valid_until - self.margin - self._sent
        self.log.warning("lease_renew_failed", **{**fields, "left": round(left, 2)})

    def lost(self, reason: str, **fields: object) -> None:
        m.LEASE_HELD.labels(self.resource).set(0)
        m.LEASE_LOSSES.labels(self.resource, reason).inc()
        self.log.error("lease_lost", **{**fields, "reason": reason, "owner": self.owner, "fence": self.fence})

    def end(self) -> None:
        """The term is over: no fence, no deadline."""
        self.fence = None
        self.deadline = float("inf")

    async def release(self) -> None:
        m.LEASE_HELD.labels(self.resource).set(0)
        try:
            async with asyncio.timeout(self.margin):
                await self.store.release(self.tenant, self.resource, self.owner)
        except (StoreError, TimeoutError) as exc:
            # It expires on its own within lease_ttl: a standby only waits a little longer.
            self.log.warning("lease_release_failed", error=repr(exc))
            return
        self.log.info("lease_released", owner=self.owner)


class _NotRenewed(Exception):
    """Internal: the renewal's time ran out (the lease's expiry minus the margin passed)."""


class _UntilDeadline(wait_base):
    """A failed renewal is tried again a quarter of the margin later, never past the time left to renew."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease

    def __call__(self, retry_state: RetryCallState) -> float:
        lease = self.lease
        return min(lease.margin / 4, max(0.0, lease._valid_until - lease.margin - time.monotonic()))
