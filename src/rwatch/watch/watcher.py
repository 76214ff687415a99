"""One long-poll loop per resource: CMDB -> normalize -> bus (durable) -> cursor store.

Two stages joined by a one-slot queue: ``fetch`` long-polls and normalizes, ``deliver`` publishes and
then saves the cursor. The next poll overlaps the previous publish, yet a cursor is saved only after its
batch *and every batch before it* is durable (invariant 1), because ``deliver`` takes batches in order.

High availability: the pipeline runs only while this watcher holds the resource's lease in the store (a
*term*). A keeper task renews it every ``lease_ttl``/3; when the lease is taken over, or cannot be renewed
before its expiry minus that margin, the term is cancelled at once (in-flight long-poll abandoned, queued
batches dropped, nothing saved) and the watcher queues for the lease again. Every save carries the term's
fence, so a save the store sees after a take-over is refused (``LeaseLost``), which also ends the term.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from rwatch import metrics as m
from rwatch.bus import Bus
from rwatch.cmdb import protocol as p
from rwatch.cmdb.client import CmdbClient
from rwatch.config import ResourceConfig, RunConfig, WatchConfig
from rwatch.errors import (
    TRANSIENT_ERRORS,
    CmdbRateLimited,
    CmdbRefused,
    CmdbTransientError,
    CursorExpired,
    LeaseLost,
    PermanentError,
    ResyncUnsupported,
    RwatchError,
    StartOutOfWindow,
    Stopping,
    StoreError,
)
from rwatch.events import Action, Event, iso_utc, watch_event_id
from rwatch.failpoints import failpoint
from rwatch.metrics import WATCHERS, WatchHealth
from rwatch.retry import HealthyResetWait, finish_or_abandon, sleep_or_stop
from rwatch.store.base import CursorStore
from rwatch.store.records import BizSighting, CursorState, Gap
from rwatch.watch.resync import Resyncer, fill_gaps

PAGE_SIZE = 200  # the server's eventStep: a full page means more is waiting
# How far inside the retention window a forced resume starts, so the request is not refused on arrival.
RESUME_MARGIN = 60.0
# After a start time is refused (1199006), at most this many other start times are tried before "from now".
WINDOW_TRIES = 3

T = TypeVar("T")


def default_owner() -> str:
    """A lease owner id unique to this process: ``host:pid:random`` (the random part survives pid reuse)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class _Repoll(Exception):
    """Internal: the position changed after a cursor loss; poll again at once."""


RETRYABLE = (*TRANSIENT_ERRORS, PermanentError, _Repoll)


@dataclass(slots=True)
class Position:
    """Where the next poll starts: a cursor, a start time, or "from now" (neither)."""

    cursor: str | None = None
    start_from: int | None = None
    event_time: float | None = None  # time of the newest event at or before this position, when known

    @property
    def mode(self) -> str:
        return "cursor" if self.cursor else "start_from" if self.start_from is not None else "now"


@dataclass(slots=True)
class _WindowSearch:
    """After a start time was refused (1199006): where unseen history begins, and the tries made so far."""

    lost_from: float
    tries: int = 0
    depth: int = 0  # the next fraction of the window to try (retention, 1/2, 1/4)


@dataclass(slots=True)
class Batch:
    events: list[Event]
    state: CursorState | None  # None: nothing new to save (same cursor, or the NoEventCursor)
    counts: dict[str, int] = field(default_factory=dict)


class Watcher:
    def __init__(
        self,
        resource: str,
        *,
        settings: ResourceConfig,
        watch: WatchConfig,
        tenant: str,
        client: CmdbClient,
        bus: Bus,
        store: CursorStore,
        stop: asyncio.Event,
        clock: Callable[[], float] = time.time,
        backoff: HealthyResetWait | None = None,
        owner: str | None = None,
        lease_ttl: float | None = None,
        resyncer: Resyncer | None = None,
        publish_grace: float = RunConfig().stop_grace,
    ) -> None:
        self.resource = resource
        self.settings = settings
        self.watch = watch
        self.tenant = tenant
        self.client = client
        self.bus = bus
        self.store = store
        self.stop = stop
        self.clock = clock
        self.backoff = backoff or HealthyResetWait()
        self.log = structlog.get_logger("rwatch.watch").bind(resource=resource)
        self.position = Position()
        self.saved: CursorState | None = None
        self.caught_up_at = self.clock()
        self._saved_changed = asyncio.Event()
        self._seq = 0  # orders events whose cursor does not decode
        self._occurred: tuple[int, str] = (-1, "")  # the last event second and its ISO form
        self._outcomes = m.WATCH_REQUESTS
        self.owner = owner or default_owner()
        self.lease_ttl = lease_ttl if lease_ttl is not None else watch.lease_ttl
        self.fence: int | None = None  # the lease fence of the current term; None outside a term
        # What ends waits inside the pipeline: ``stop`` itself outside a term, a per-term event set by
        # ``stop`` or by losing the lease during one.
        self._halt = stop
        self._acquired_at = 0.0  # monotonic time the last successful acquire was sent
        # Monotonic time after which the pipeline must not start a poll or a publish: the lease's expiry
        # minus the safety margin, as the keeper last established it. Infinite outside a term.
        self._lease_deadline = float("inf")
        self.resyncer = resyncer
        self.publish_grace = publish_grace  # after stop: how long in-flight publishes may still confirm
        self._gap_recorded = asyncio.Event()
        self.last_poll: float | None = None  # monotonic time of the last successful watch request
        self.refused: dict[str, object] | None = None  # while CMDB refuses us: why, and the fix (readiness)
        self._businesses: dict[str, tuple[bool, bool]] = {}  # biz: (live, pool) as last noted in the store
        self._window: _WindowSearch | None = None  # after a 1199006: the search for a start the server accepts
        # Monotonic time of the last sign that this watcher works: a batch through the whole pipeline (polled,
        # published, saved), or queueing as a standby for a lease another process holds. A restart after a crash
        # is "running again" (``/readyz``) only once this moves past the crash.
        self.progress_at: float | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the resource while holding its lease, until ``stop`` is set. Never raises for CMDB, broker
        or store trouble, nor for a lost lease (it queues for the lease again)."""
        try:
            while not self.stop.is_set():
                fence = await self._acquire_lease()
                lost = False
                try:
                    lost = await self._term(fence)
                finally:
                    self.fence = None
                    self._halt = self.stop
                    self._lease_deadline = float("inf")
                    if not lost:
                        await self._release_lease()
        except Stopping:
            return

    async def _acquire_lease(self) -> int:
        """The lease's fence, once held; waits while another owner holds it. Raises Stopping."""
        waiting = False
        pause = self.lease_ttl / 3

        async def attempt() -> int | None:
            self._acquired_at = time.monotonic()
            return await self.store.acquire(self.tenant, self.resource, self.owner, self.lease_ttl)

        while True:
            fence = await self._retry_store(attempt)
            if fence is not None:
                self.log.info("lease_acquired", owner=self.owner, fence=fence, ttl=self.lease_ttl)
                m.LEASE_HELD.labels(self.resource).set(1)
                return fence
            if not waiting:
                waiting = True
                self.progress_at = time.monotonic()
                self.log.info("lease_waiting", owner=self.owner, retry_every=round(pause, 2))
            if await sleep_or_stop(pause, self.stop):
                raise Stopping("stopping")

    async def _release_lease(self) -> None:
        m.LEASE_HELD.labels(self.resource).set(0)
        try:
            async with asyncio.timeout(self.lease_ttl / 3):
                await self.store.release(self.tenant, self.resource, self.owner)
        except (StoreError, TimeoutError) as exc:
            # It expires on its own within lease_ttl: a standby only waits a little longer.
            self.log.warning("lease_release_failed", error=repr(exc))
            return
        self.log.info("lease_released", owner=self.owner)

    async def _term(self, fence: int) -> bool:
        """Follow the resource under ``fence`` until ``stop`` (False) or until the lease is lost (True)."""
        self.fence = fence
        self._lease_deadline = self._acquired_at + self.lease_ttl * 2 / 3
        halt = self._halt = asyncio.Event()
        follow = asyncio.create_task(self._follow(), name=f"follow:{self.resource}")
        keeper = asyncio.create_task(self._keep_lease(fence), name=f"lease:{self.resource}")
        mirror = asyncio.create_task(self.stop.wait())
        mirror.add_done_callback(lambda _: halt.set())
        try:
            await asyncio.wait({follow, keeper}, return_when=asyncio.FIRST_COMPLETED)
            if not follow.done():
                # The keeper returns only when the lease is gone: stop this instant, publish and save nothing.
                halt.set()
                follow.cancel()
                await asyncio.gather(follow, return_exceptions=True)
                return True
            try:
                follow.result()
            except LeaseLost as exc:
                self._lease_lost("fence_refused", **exc.fields())
                return True
            if self.stop.is_set():
                return False
            # The pipeline found the lease past its deadline before the keeper did (the process was paused).
            if not keeper.done():
                self._lease_lost("expired_locally")
            return True
        finally:
            for task in (follow, keeper, mirror):
                task.cancel()
            await asyncio.gather(follow, keeper, mirror, return_exceptions=True)

    def _lease_lost(self, reason: str, **fields: object) -> None:
        m.LEASE_HELD.labels(self.resource).set(0)
        m.LEASE_LOSSES.labels(self.resource, reason).inc()
        self.log.error("lease_lost", **{**fields, "reason": reason, "owner": self.owner, "fence": self.fence})

    async def _keep_lease(self, fence: int) -> None:
        """Renew every ttl/3; return once the lease is lost: taken over, or not renewed in time (by its
        expiry minus ttl/3, counted from when the last successful renewal was *sent*)."""
        ttl = self.lease_ttl
        margin = ttl / 3
        valid_until = self._acquired_at + ttl
        while True:
            await asyncio.sleep(max(0.0, valid_until - ttl - time.monotonic() + margin))
            while True:
                left = valid_until - margin - time.monotonic()
                if left <= 0:
                    self._lease_lost("not_renewed", valid_for=round(valid_until - time.monotonic(), 2))
                    return
                sent = time.monotonic()
                try:
                    async with asyncio.timeout(left):
                        got = await self.store.acquire(self.tenant, self.resource, self.owner, ttl)
                except (StoreError, TimeoutError) as exc:
                    fields = exc.fields() if isinstance(exc, StoreError) else {"error": "timeout"}
                    self.log.warning("lease_renew_failed", **{**fields, "left": round(left, 2)})
                    await asyncio.sleep(min(margin / 4, max(0.0, valid_until - margin - time.monotonic())))
                    continue
                if got != fence:
                    self._lease_lost("taken_over", new_fence=got)
                    return
                valid_until = sent + ttl
                self._lease_deadline = valid_until - margin
                break

    async def _follow(self) -> None:
        """One term: load the position the previous holder saved, then run the pipeline."""
        try:
            self.saved = await self._retry_store(lambda: self.store.load(self.tenant, self.resource))
            self._saved_changed.set()
            # Where the last holder stood when it last saved is the head we can vouch for.
            self.caught_up_at = self.saved.saved_at if self.saved is not None else self.clock()
            self._window = None
            self.position = await self._initial_position(self.saved)
        except Stopping:
            return
        WATCHERS.add(self)
        reconciler = asyncio.create_task(self._reconcile(), name=f"reconcile:{self.resource}")
        try:
            await self._pipeline()
        finally:
            WATCHERS.discard(self)
            reconciler.cancel()
            await asyncio.gather(reconciler, return_exceptions=True)

    async def _pipeline(self) -> None:
        queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=1)
        fetcher = asyncio.create_task(self.fetch(queue), name=f"fetch:{self.resource}")
        try:
            await self.deliver(queue, fetcher)
        finally:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)

    async def _initial_position(self, saved: CursorState | None) -> Position:
        if saved is not None and saved.start_from is not None:
            # Left by `rwatch cursors reset --to-time/--by-duration`: resume by time, exactly there.
            self.log.info("watch_resume", mode="start_from", start_from=saved.start_from)
            return Position(start_from=saved.start_from, event_time=saved.event_time)
        if saved is not None:
            # An empty cursor (`rwatch cursors reset --to-now`) polls "from now": no bootstrap gap.
            self.log.info("watch_resume", mode=Position(cursor=saved.cursor).mode, event_time=saved.event_time)
            return Position(cursor=saved.cursor, event_time=saved.event_time or saved.saved_at)
        if self.watch.bootstrap == "resync":
            # Everything before now is history this process never saw: recorded as a gap for
            # reconciliation to fill, never silently assumed.
            now = self.client.server_now()
            await self._retry_store(lambda: self.store.add_gap(self.tenant, self.resource, 0.0, now, "bootstrap"))
            self.log.warning("bootstrap_gap", start=0.0, end=now)
        self.log.info("watch_start", mode="now")
        return Position()

    # --- stage 1: long-poll and normalize --------------------------------------------------------------

    async def fetch(self, queue: asyncio.Queue[Batch]) -> None:
        while not self._halt.is_set():
            reply = await self.poll_once()
            if reply is None:
                return
            batch = self.normalize(reply)
            if len(reply.events) < PAGE_SIZE:
                self.caught_up_at = self.clock()  # a page that is not full: nothing more is waiting
            await queue.put(batch)
            if len(reply.events) < PAGE_SIZE and await sleep_or_stop(self.settings.interval, self._halt):
                return

    async def poll_once(self) -> p.WatchReply | None:
        """One successful watch call (retrying with backoff), or None once stopping."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RETRYABLE),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._call()
        except Stopping:
            return None
        return None  # pragma: no cover - AsyncRetrying either returns or raises

    def _check_lease(self) -> None:
        """Raise Stopping (and halt the term) when the lease may have run out: after a pause of the whole
        process, the pipeline can wake before the keeper, and must not poll or publish on a dead lease."""
        if time.monotonic() >= self._lease_deadline:
            self._halt.set()
        if self._halt.is_set():
            raise Stopping("stopping")

    async def _call(self) -> p.WatchReply:
        self._check_lease()
        pos = self.position
        started = time.monotonic()
        poll = asyncio.ensure_future(self.client.watch(
            self.resource, fields=self.settings.fields, event_types=self.settings.event_types,
            cursor=pos.cursor, start_from=pos.start_from, sub_resource=self.settings.sub_resource,
        ))
        stopper = asyncio.ensure_future(self._halt.wait())
        try:
            await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not poll.done():
            # A long-poll holds nothing: abandoning it loses no event, the cursor was not advanced.
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
            raise Stopping("stopping")
        m.WATCH_REQUEST_SECONDS.labels(self.resource).observe(time.monotonic() - started)
        try:
            reply = poll.result()
        except (CursorExpired, StartOutOfWindow) as exc:
            self._outcomes.labels(self.resource, _outcome(exc)).inc()
            if pos.mode != ("cursor" if isinstance(exc, CursorExpired) else "start_from"):
                # A refusal of a start mode this request did not use (no server does that): nothing to recover
                # from, and no gap to record; back off like any other error, the position kept.
                raise
            await self.recover(exc)
            raise _Repoll() from exc
        except Exception as exc:
            self._outcomes.labels(self.resource, _outcome(exc)).inc()
            raise
        self._outcomes.labels(self.resource, "events" if reply.watched else "empty").inc()
        if self._window is not None and pos.start_from is not None:
            # Recorded before this reply's events are published, so before any cursor past the gap is saved.
            await self._start_accepted(pos.start_from)
        if self.refused is not None:
            self.log.info("cmdb_accepted", refused_for_s=round(self.clock() - float(str(self.refused["since"])), 1))
            self.refused = None
        self.last_poll = time.monotonic()
        m.LAST_POLL.labels(self.resource).set(self.clock())
        return reply

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Repoll):
            return 0.0
        if isinstance(exc, CmdbRefused):
            # Minutes, not a hot loop: nothing changes until someone grants or fixes something, and then the next
            # attempt picks it up without a restart. Jittered so replicas do not knock in step.
            return self.client.config.refusal_retry * (0.9 + 0.2 * self.backoff.rng.random())
        return self.backoff.next_delay()

    async def _sleep(self, seconds: float) -> None:
        if await sleep_or_stop(seconds, self._halt):
            raise Stopping("stopping")

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Repoll):
            return
        reason = _outcome(exc)
        m.WATCH_BACKOFFS.labels(self.resource, reason).inc()
        if isinstance(exc, CmdbRefused):
            self._refused(exc, state.upcoming_sleep)
            return
        fields = exc.fields() if isinstance(exc, RwatchError) else {"error": repr(exc)}
        # A malformed reply is no network hiccup: something between CMDB and us (or CMDB itself) answers wrong.
        level = self.log.error if isinstance(exc, PermanentError) or reason == "malformed" else self.log.warning
        level("watch_failed", **{**fields, "outcome": reason, "mode": self.position.mode,
                                 "retry_in": round(state.upcoming_sleep, 2), "attempt": state.attempt_number})

    def _refused(self, exc: CmdbRefused, retry_in: float) -> None:
        """One clear error per attempt (every ``cmdb.refusal_retry``) naming the fix; ``/readyz`` fails with it."""
        m.CMDB_REFUSALS.labels(self.resource, exc.reason).inc()
        since = self.refused["since"] if self.refused is not None else self.clock()
        self.refused = {"reason": exc.reason, "code": exc.code, "status": exc.extra.get("status"),
                        "api": exc.extra.get("api"), "error": exc.message, "fix": exc.fix, "since": since}
        self.log.error("cmdb_refused", **{**exc.fields(), "reason": exc.reason, "mode": self.position.mode,
                                          "retry_in": round(retry_in, 1)})

    # --- cursor loss (invariant 4) ---------------------------------------------------------------------

    async def recover(self, exc: CursorExpired | StartOutOfWindow) -> None:
        """Pick the next position after the server refused ours; record any history truly lost.

        Cursor refused (1103007) -> resume by time: the last event − lookback if inside the window (and always
        at least the second before the last event's: CMDB answers only events *after* the second it is given,
        so the last event's own second is replayed), else from the oldest retained second, recording the gap.
        Start time refused (1199006: the server keeps less than ``retention``, or the clocks disagree) -> a
        bounded search inside the window (``_next_start``); the gap, recorded once a start is accepted, is
        exactly [first refused start (or the last event seen, when later), accepted start). When no try is
        left, from now, the rest recorded as a gap. Never a loop: at most six requests per loss (the cursor,
        the start it led to, ``WINDOW_TRIES`` starts, from now).
        """
        pos = self.position
        now = self.client.server_now()
        last = pos.event_time
        if isinstance(exc, StartOutOfWindow) and pos.start_from is not None:
            await self._start_refused(exc, pos.start_from, now, last)
            return
        m.CURSOR_EXPIRED.labels(self.resource).inc()
        oldest = now - self.watch.retention + RESUME_MARGIN
        wanted = (last if last is not None else now) - self.watch.lookback
        if last is not None:
            # CMDB answers the events *after* the second it is given: the second before the last event's, at the
            # latest, or the events that shared that second and came after it would be skipped (lookback = 0).
            wanted = min(wanted, math.floor(last) - 1)
        start = max(wanted, oldest)
        self.log.warning("cursor_expired", code=exc.code, cursor=pos.cursor, last_event_time=last,
                         resume_from=int(start))
        if last is None or last < oldest:  # the lookback before ``last`` is a margin, not lost history
            await self.record_gap(last if last is not None else 0.0, start, "cursor_expired")
        self.position = Position(start_from=int(start), event_time=last)

    async def _start_refused(self, exc: StartOutOfWindow, refused: int, now: float, last: float | None) -> None:
        search = self._window
        if search is None:
            m.CURSOR_EXPIRED.labels(self.resource).inc()
            # What we have not seen starts at the refused start, or at the last event seen when that is later
            # (a start of last − lookback: the lookback is a margin, not history).
            search = self._window = _WindowSearch(float(max(refused, last) if last is not None else refused))
        start = self._next_start(search, refused, now)
        self.log.warning("start_from_refused", code=exc.code, start_from=refused, attempt=search.tries,
                         resume_from=start if start is not None else "now", server_now=int(now))
        if start is not None:
            self.position = Position(start_from=start, event_time=last)
            return
        # No try left: only "from now" remains, and everything since what we last saw is lost.
        self._window = None
        if now > search.lost_from:
            await self.record_gap(search.lost_from, now, "start_out_of_window")
        self.position = Position(event_time=last)

    def _next_start(self, search: _WindowSearch, refused: int, now: float) -> int | None:
        """The next start time to try after ``refused`` was refused, or None when none is left.

        Refused from inside the window as we reckon the server's clock (its ``Date`` header, corrected for when
        more than a few seconds off): the server took it for the future, its clock being behind the one we read.
        A minute before its now (then two, four) loses nothing, nothing newer than its now existing. Refused as
        too old: the server keeps less than ``retention``. Try the window's edge as configured, then half of it,
        then a quarter, each at least a minute later than the start just refused.
        """
        if search.tries >= WINDOW_TRIES:
            return None
        search.tries += 1
        if refused >= now - RESUME_MARGIN:
            return int(now - RESUME_MARGIN * 2 ** (search.tries - 1))
        span = self.watch.retention - RESUME_MARGIN
        for depth in range(search.depth, WINDOW_TRIES):
            candidate = int(now - span / 2**depth)
            if candidate >= refused + RESUME_MARGIN:
                search.depth = depth + 1
                return candidate
        return None

    async def _start_accepted(self, start: int) -> None:
        """A start time was accepted after a refusal: what lay before it, back to what we last saw, is lost."""
        search, self._window = self._window, None
        assert search is not None
        self.log.info("start_from_accepted", start_from=start, lost_from=iso_utc(search.lost_from),
                      attempts=search.tries)
        if start > search.lost_from:
            await self.record_gap(search.lost_from, float(start), "start_out_of_window")

    async def record_gap(self, start: float, end: float, reason: str) -> None:
        gap = await self._retry_store(
            lambda: self.store.add_gap(self.tenant, self.resource, start, end, reason))
        m.CURSOR_GAPS.labels(self.resource).inc()
        m.CURSOR_GAP_SECONDS.labels(self.resource).inc(max(0.0, end - start))
        self._gap_recorded.set()
        self.log.error("cursor_gap", gap_id=gap.id, start=iso_utc(start), end=iso_utc(end),
                       seconds=round(end - start, 1), reason=reason)

    # --- reconciliation: fill recorded gaps, and the periodic safety net -------------------------------

    async def _reconcile(self) -> None:
        """While this term lasts: resync whenever the resource has open gaps (at once, and whenever the
        watcher records one) and every ``watch.resync_every`` if set. A gap is filled only by a resync that
        started after it was recorded: the snapshot then postdates every change the gap lost."""
        every = self.watch.resync_every
        last = time.monotonic()
        pause = HealthyResetWait(initial=5.0, maximum=300.0)
        while not self._halt.is_set():
            self._gap_recorded.clear()
            try:
                gaps = await self._retry_store(lambda: self.store.gaps(self.tenant, self.resource))
            except Stopping:
                return
            m.GAPS_OPEN.labels(self.resource).set(len(gaps))
            # The periodic safety net only where a resync can run; a gap of an unsupported resource is
            # still reported (``resync_unsupported``), once per gap.
            due = every > 0 and time.monotonic() - last >= every and self.resource in Resyncer.SUPPORTED
            if (gaps or due) and self.resyncer is not None:
                trigger = ("bootstrap" if all(g.reason == "bootstrap" for g in gaps) else "gap") if gaps else "periodic"
                ok = await self._resync(gaps, trigger)
                if ok is None:
                    return
                if ok:
                    last = time.monotonic()
                    pause.streak = 0
                    continue
                # Failed: try again later (the error is logged and counted); a new gap does not wait.
                wait = pause.next_delay()
            elif gaps:
                return  # no resyncer (a test's bare watcher): the gaps stay open, visible in the store
            else:
                periodic = every > 0 and self.resource in Resyncer.SUPPORTED
                wait = every - (time.monotonic() - last) if periodic else float("inf")
            await self._wait_gap(wait)

    async def _wait_gap(self, seconds: float) -> None:
        waiters = {asyncio.ensure_future(self._gap_recorded.wait()), asyncio.ensure_future(self._halt.wait())}
        try:
            await asyncio.wait(waiters, timeout=None if seconds == float("inf") else max(0.0, seconds),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _resync(self, gaps: list[Gap], trigger: str) -> bool | None:
        """True once resynced (and ``gaps`` filled), False on failure, None when stopping."""
        assert self.resyncer is not None
        try:
            self.resyncer.check(self.resource)
        except ResyncUnsupported as exc:
            m.RESYNCS.labels(self.resource, trigger, "unsupported").inc()
            self.log.error("resync_unsupported", **exc.fields(), gaps=[g.id for g in gaps])
            await self._wait_gap(float("inf"))  # until a new gap or the end of the term: nothing else to do
            return False
        try:
            result = await self.resyncer.run(self.resource, trigger=trigger)
        except Stopping:
            return None
        except Exception:  # logged and counted by the resyncer; the watch itself goes on
            return False
        if not result.complete:  # published, nothing swept (resync_incomplete says why): the gaps stay open
            return False
        try:
            await fill_gaps(gaps, result, self._fill_gap, self.log)
        except Stopping:
            return None
        return True

    async def _fill_gap(self, gap: Gap) -> None:
        await self._retry_store(lambda: self.store.fill_gap(gap.id, time.time()))

    # --- normalize -------------------------------------------------------------------------------------

    def normalize(self, reply: p.WatchReply) -> Batch:
        observed = self.clock()
        observed_iso = iso_utc(observed)
        events: list[Event] = []
        counts: dict[str, int] = {}
        res = self.resource
        if reply.watched:
            for raw in reply.events:
                event = self._event(raw, observed, observed_iso)
                if event is not None:
                    events.append(event)
                    counts[event.action] = counts.get(event.action, 0) + 1
            for action, n in counts.items():
                m.EVENTS_RECEIVED.labels(res, action).inc(n)
        last = reply.last_cursor
        if last is None:
            # No element says where the stream stands (the client refuses such replies as malformed): the
            # position stays. Reading it as "from now" would skip everything since (issue 12, point 5).
            return Batch(events, None, counts)
        if last == p.NO_EVENT_CURSOR:
            # The NoEventCursor is a position only for the next poll: persisting it would replay the
            # whole retention window after a restart.
            self.position = Position(cursor=last, event_time=self.position.event_time)
            return Batch(events, None, counts)
        decoded = p.decode_cursor(last)
        event_time = float(decoded.sec) if decoded else self.position.event_time
        self.position = Position(cursor=last, event_time=event_time)
        if self.saved is not None and self.saved.cursor == last and not events:
            return Batch(events, None, counts)
        version = (decoded.sec, decoded.inc) if decoded else None
        state = CursorState(self.tenant, res, last, version, event_time, observed)
        return Batch(events, state, counts)

    def _event(self, raw: p.WatchEvent, observed: float, observed_iso: str) -> Event | None:
        res = self.resource
        action = raw.event_type
        if action not in p.EVENT_TYPES:
            self._invalid(raw, "bad_event_type")
            return None
        key = p.object_key(res, raw.detail)
        if key is None:
            self._invalid(raw, "no_key")
            return None
        decoded = p.decode_cursor(raw.cursor)
        if decoded is not None:
            version = (decoded.sec, decoded.inc)
        else:
            m.CURSOR_DECODE_FAILURES.labels(res).inc()
            self._seq += 1
            version = (int(observed), self._seq)
        occurred = self._occurred
        if occurred[0] != version[0]:
            # The events of a burst share their second: format it once, not once per event.
            occurred = self._occurred = (version[0], iso_utc(version[0]))
        # model_construct: every field is built here from checked parts; validation would only cost time.
        return Event.model_construct(
            id=watch_event_id(res, raw.cursor), resource=res, action=cast(Action, action), key=key, tenant=self.tenant,
            version=version, occurred_at=occurred[1], observed_at=observed_iso, origin="watch",
            cursor=raw.cursor, data=raw.detail,
        )

    def _invalid(self, raw: p.WatchEvent, reason: str) -> None:
        m.EVENTS_INVALID.labels(self.resource, reason).inc()
        self.log.error("event_invalid", reason=reason, cursor=raw.cursor, event_type=raw.event_type,
                       detail_keys=sorted(raw.detail)[:20])

    # --- stage 2: publish, then save -------------------------------------------------------------------

    async def deliver(self, queue: asyncio.Queue[Batch], fetcher: asyncio.Task[None]) -> None:
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, fetcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                fetcher.result()  # re-raise a crash of the fetch stage
                return
            batch = getter.result()
            if not await self.publish_batch(batch):
                return
            if self.resource == "biz" and batch.events and not await self.note_businesses(batch.events):
                return
            if batch.state is not None and not await self.save_cursor(batch.state):
                return
            self.progress_at = time.monotonic()

    async def publish_batch(self, batch: Batch) -> bool:
        if not batch.events:
            return True
        if time.monotonic() >= self._lease_deadline:
            self._halt.set()  # the lease may be gone: leave the batch to the next holder
            return False
        # The bus counts what it confirmed, and how long it took. Stopping: in-flight publishes get a grace to
        # confirm, then the batch is left unsaved (the restart replays it) so the process exits within
        # run.shutdown_timeout (invariant 6).
        publish = asyncio.ensure_future(self.bus.publish(batch.events))
        if not await finish_or_abandon(publish, self.stop, self.publish_grace):
            self.log.warning("publish_abandoned", events=len(batch.events), grace=self.publish_grace)
            return False
        try:
            publish.result()
        except Stopping:
            return False
        failpoint("watch.after_publish")
        return True

    async def note_businesses(self, events: list[Event]) -> bool:
        """Record which businesses the stream showed alive or deleted (only changes reach the store): a resync
        compares them with ``search_business``, which hides what the user may not view (README "Resync")."""
        sightings = []
        for event in events:
            live = event.action != "delete"
            default = event.data.get("default")
            pool = isinstance(default, int) and not isinstance(default, bool) and default != 0
            if self._businesses.get(event.key) != (live, pool):
                self._businesses[event.key] = (live, pool)
                sightings.append(BizSighting(int(event.key), live, event.version, pool))
        if not sightings:
            return True
        try:
            await self._retry_store(lambda: self.store.note_businesses(self.tenant, sightings))
        except Stopping:
            return False
        return True

    async def save_cursor(self, state: CursorState) -> bool:
        """Saved only after the batch is durable: a crash before this line replays, never skips."""
        try:
            await self._retry_store(lambda: self.store.save(state, fence=self.fence))
        except Stopping:
            return False
        self.saved = state
        self._saved_changed.set()
        m.CURSOR_SAVES.labels(self.resource).inc()
        failpoint("watch.after_save")
        return True

    def health(self) -> WatchHealth:
        """Lag (seconds since this watcher last knew it was at the head of the stream), cursor age, and
        whether the lag passed two thirds of ``retention``: history is lost when it reaches all of it."""
        now = self.clock()
        lag = max(0.0, now - self.caught_up_at)
        event_time = self.saved.event_time if self.saved is not None else None
        age = max(0.0, now - event_time) if event_time is not None else None
        polled = time.monotonic() - self.last_poll if self.last_poll is not None else None
        return WatchHealth(self.resource, lag, age, lag > self.watch.retention * 2 / 3, polled,
                           dict(self.refused) if self.refused is not None else None)

    async def wait_saved(self, done: Callable[[CursorState], bool]) -> CursorState:
        """Until a saved position satisfies ``done`` (for callers that must know what is durable)."""
        while self.saved is None or not done(self.saved):
            self._saved_changed.clear()
            await self._saved_changed.wait()
        return self.saved

    async def _retry_store(self, op: Callable[[], Awaitable[T]]) -> T:
        wait = HealthyResetWait(initial=0.2, maximum=10.0)
        while True:
            try:
                return await op()
            except StoreError as exc:
                delay = wait.next_delay()
                self.log.error("store_failed", **{**exc.fields(), "retry_in": round(delay, 2)})
                if await sleep_or_stop(delay, self._halt):
                    raise Stopping("stopping") from exc


def _outcome(exc: BaseException | None) -> str:
    if isinstance(exc, CursorExpired):
        return "cursor_expired"
    if isinstance(exc, StartOutOfWindow):
        return "start_out_of_window"
    if isinstance(exc, CmdbRateLimited):
        return "rate_limited"
    if isinstance(exc, CmdbRefused):
        return "refused"
    if isinstance(exc, PermanentError):
        return "permanent"
    if isinstance(exc, CmdbTransientError) and exc.extra.get("reason") == "malformed":
        return "malformed"
    return "transient"
