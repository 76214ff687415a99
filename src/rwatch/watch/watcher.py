"""One long-poll loop per resource: CMDB -> normalize -> bus (durable) -> cursor store.

Two stages joined by a one-slot queue: ``fetch`` long-polls and normalizes, ``deliver`` publishes and then saves
the cursor. The next poll overlaps the previous publish, yet a cursor is saved only after its batch *and every
batch before it* is durable (invariant 1), because ``deliver`` takes batches in order.

High availability: the stages run only while this watcher holds the resource's lease (a *term*, ``lease.py``).
Each term runs its tasks in one ``TaskGroup``: the lease keeper, the gap reconciler (``gaps.py``) and the two
stages; ``fetch`` ends the queue with a sentinel, and ``deliver`` (``deliver.py``) ends the term when it arrives.
Losing the lease ends the group at once (in-flight long-poll abandoned, queued batches dropped, nothing saved) and
the watcher queues for the lease again. A reply becomes a batch in ``batch.py``, a refused position is replaced in
``resume.py``, and a failed call is paused and reported in ``polling.py``. Two stop signals, one per scope:
``stopping`` (the process) and ``term_over`` (this term: set by ``stopping``, or when the lease's deadline passed);
every wait inside a term wakes on the latter.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from rwatch import metrics as m
from rwatch import progress
from rwatch.bus import Bus
from rwatch.cmdb import protocol as p
from rwatch.cmdb.client import CmdbClient
from rwatch.config import ResourceConfig, RunConfig, WatchConfig
from rwatch.errors import CursorExpired, LeaseLost, StartOutOfWindow, Stopping
from rwatch.progress import WatchHealth, WatchState
from rwatch.retry import CMDB, HealthyResetWait, finish_or_abandon, retrying, sleep_or_stop
from rwatch.store.base import CursorStore
from rwatch.store.records import CursorState
from rwatch.watch.batch import Batch, Position, to_batch
from rwatch.watch.deliver import Delivery
from rwatch.watch.gaps import Gaps
from rwatch.watch.lease import Lease
from rwatch.watch.polling import RETRYABLE, PollPause, Repoll, outcome
from rwatch.watch.resume import Lost, Recovery
from rwatch.watch.resync import Resyncer
from rwatch.watch.storing import stored

PAGE_SIZE = 200  # the server's eventStep: a full page means more is waiting

T = TypeVar("T")


def default_owner() -> str:
    """A lease owner id unique to this process: ``host:pid:random`` (the random part survives pid reuse)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class _TermOver(Exception):
    """Raised inside a term's TaskGroup to end it (how a group is ended); ``lost``: the lease is gone."""

    def __init__(self, *, lost: bool) -> None:
        super().__init__("term over")
        self.lost = lost


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
        self.tenant = tenant
        self.client = client
        self.store = store
        self.stopping = stop  # the process is stopping
        self.term_over = stop  # the current term is over; outside a term, the process's signal
        self.clock = clock
        self.backoff = backoff or CMDB.wait()  # kept: its streak spans calls and terms
        self.log = structlog.get_logger("rwatch.watch").bind(resource=resource)
        self.owner = owner or default_owner()
        self.state = WatchState(resource, self.owner, watch.retention, clock, caught_up_at=clock())
        self.lease = Lease(store, tenant=tenant, resource=resource, owner=self.owner, log=self.log,
                           ttl=lease_ttl if lease_ttl is not None else watch.lease_ttl)
        self.gaps = Gaps(store, tenant=tenant, resource=resource, resyncer=resyncer, every=watch.resync_every,
                         log=self.log)
        self.recovery = Recovery(resource, retention=watch.retention, lookback=watch.lookback, log=self.log)
        self.pause = PollPause(self.state, self.backoff, lambda: self.client.config.refusal_retry, self.log)
        self.delivery = Delivery(bus=bus, store=store, lease=self.lease, state=self.state, tenant=tenant,
                                 stopping=stop, publish_grace=publish_grace, progressed=self._progressed, log=self.log)
        self.bootstrap = watch.bootstrap
        self._position = Position()
        # Monotonic time of the last sign that this watcher works: a batch through the whole pipeline (polled,
        # published, saved), or queueing as a standby for a lease another process holds. A restart after a crash
        # is "running again" (``/readyz``) only once this moves past the crash.
        self.progress_at: float | None = None

    @property
    def position(self) -> Position:
        """Where the next poll starts (its mode is published for ``/status``)."""
        return self._position

    @position.setter
    def position(self, position: Position) -> None:
        self._position = position
        self.state.mode = position.mode

    @property
    def saved(self) -> CursorState | None:
        """The last cursor state saved (loaded at the start of a term)."""
        return self.delivery.saved

    @saved.setter
    def saved(self, saved: CursorState | None) -> None:
        self.delivery.saved = saved

    @property
    def fence(self) -> int | None:
        return self.lease.fence

    @property
    def refused(self) -> dict[str, object] | None:
        """While CMDB refuses us: why, and the fix (readiness)."""
        return self.state.refused

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the resource while holding its lease, until ``stopping`` is set. Never raises for CMDB, broker or
        store trouble, nor for a lost lease (it queues for the lease again)."""
        try:
            while not self.stopping.is_set():
                await self.lease.acquire(self.stopping, self._progressed)
                lost = False
                try:
                    lost = await self._term()
                finally:
                    self.lease.end()
                    if not lost:
                        await self.lease.release()
        except Stopping:
            return

    async def _term(self) -> bool:
        """Follow the resource under the lease until ``stopping`` (False) or until the lease is lost (True)."""
        term_over = self.term_over = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as term:
                term.create_task(self._keep_lease(), name=f"lease:{self.resource}")
                term.create_task(self._end_on_stop(term_over), name=f"stop:{self.resource}")
                if not await self._begin():
                    raise _TermOver(lost=False)
                progress.publish(self.state)
                queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
                term.create_task(self.gaps.reconcile(term_over), name=f"reconcile:{self.resource}")
                term.create_task(self.fetch(queue), name=f"fetch:{self.resource}")
                term.create_task(self.deliver(queue), name=f"deliver:{self.resource}")
        except BaseExceptionGroup as group:
            ended = group.exceptions
            crashed = [e for e in ended if not isinstance(e, _TermOver | LeaseLost)]
            if crashed:
                raise crashed[0] from None  # a bug in a stage: the supervisor logs it and starts the watcher again
            if any(isinstance(e, _TermOver) and e.lost for e in ended):
                return True
            refused = [e for e in ended if isinstance(e, LeaseLost)]
            if refused:
                self.lease.lost("fence_refused", **refused[0].fields())
                return True
        finally:
            progress.withdraw(self.state)
            self.term_over = self.stopping
        if self.stopping.is_set():
            return False
        # The stages found the lease past its deadline before the keeper did (the process was paused).
        self.lease.lost("expired_locally")
        return True

    async def _keep_lease(self) -> None:
        await self.lease.keep()
        raise _TermOver(lost=True)  # the lease is gone: stop this instant, publish and save nothing

    async def _end_on_stop(self, term_over: asyncio.Event) -> None:
        await self.stopping.wait()
        term_over.set()

    def _progressed(self) -> None:
        self.progress_at = time.monotonic()

    async def _begin(self) -> bool:
        """Load the position the previous holder saved; False when the term ended meanwhile."""
        try:
            self.saved = await self._stored(lambda: self.store.load(self.tenant, self.resource))
            # Where the last holder stood when it last saved is the head we can vouch for.
            self.state.caught_up_at = self.saved.saved_at if self.saved is not None else self.clock()
            self.recovery.window = None
            self.position = await self._initial_position(self.saved)
        except Stopping:
            return False
        return True

    async def _initial_position(self, saved: CursorState | None) -> Position:
        if saved is not None and saved.start_from is not None:
            # Left by `rwatch cursors reset --to-time/--by-duration`: resume by time, exactly there.
            self.log.info("watch_resume", mode="start_from", start_from=saved.start_from)
            return Position(start_from=saved.start_from, event_time=saved.event_time)
        if saved is not None:
            # An empty cursor (`rwatch cursors reset --to-now`) polls "from now": no bootstrap gap.
            self.log.info("watch_resume", mode=Position(cursor=saved.cursor).mode, event_time=saved.event_time)
            return Position(cursor=saved.cursor, event_time=saved.event_time or saved.saved_at)
        if self.bootstrap == "resync":
            # Everything before now is history this process never saw: recorded as a gap for reconciliation to
            # fill, never silently assumed.
            now = self.client.server_now()
            await self._stored(lambda: self.store.add_gap(self.tenant, self.resource, 0.0, now, "bootstrap"))
            self.log.warning("bootstrap_gap", start=0.0, end=now)
        self.log.info("watch_start", mode="now")
        return Position()

    # --- stage 1: long-poll and normalize --------------------------------------------------------------------

    async def fetch(self, queue: asyncio.Queue[Batch | None]) -> None:
        """Poll and queue batches until the term is over, then queue the sentinel that ends ``deliver``."""
        while not self.term_over.is_set():
            reply = await self.poll_once()
            if reply is None:
                break
            batch = self.normalize(reply)
            if len(reply.events) < PAGE_SIZE:
                self.state.caught_up_at = self.clock()  # a page that is not full: nothing more is waiting
            await queue.put(batch)
            if len(reply.events) < PAGE_SIZE and await sleep_or_stop(self.settings.interval, self.term_over):
                break
        await queue.put(None)

    async def poll_once(self) -> p.WatchReply | None:
        """One successful watch call (retrying with backoff), or None once the term is over."""
        try:
            return await retrying(self.pause, stop=self.term_over, on=RETRYABLE,
                                  before_sleep=self.pause.failed)(self._call)
        except Stopping:
            return None

    async def _call(self) -> p.WatchReply:
        if self.lease.expired():
            self.term_over.set()  # the lease may be gone: not one more poll on it
        if self.term_over.is_set():
            raise Stopping("stopping")
        pos = self.position
        started = time.monotonic()
        poll = asyncio.ensure_future(self.client.watch(
            self.resource, fields=self.settings.fields, event_types=self.settings.event_types,
            cursor=pos.cursor, start_from=pos.start_from, sub_resource=self.settings.sub_resource,
        ))
        if not await finish_or_abandon(poll, self.term_over, 0.0):
            # A long-poll holds nothing: abandoning it loses no event, the cursor was not advanced.
            raise Stopping("stopping")
        m.WATCH_REQUEST_SECONDS.labels(self.resource).observe(time.monotonic() - started)
        try:
            reply = poll.result()
        except (CursorExpired, StartOutOfWindow) as exc:
            m.WATCH_REQUESTS.labels(self.resource, outcome(exc)).inc()
            if pos.mode != ("cursor" if isinstance(exc, CursorExpired) else "start_from"):
                # A refusal of a start mode this request did not use (no server does that): nothing to recover from,
                # and no gap to record; back off like any other error, the position kept.
                raise
            await self.recover(exc)
            raise Repoll() from exc
        except Exception as exc:
            m.WATCH_REQUESTS.labels(self.resource, outcome(exc)).inc()
            raise
        m.WATCH_REQUESTS.labels(self.resource, "events" if reply.watched else "empty").inc()
        if self.recovery.window is not None and pos.start_from is not None:
            # Recorded before this reply's events are published, so before any cursor past the gap is saved.
            await self._record(self.recovery.accepted(pos.start_from))
        self.pause.accepted()
        self.state.last_poll = time.monotonic()
        m.LAST_POLL.labels(self.resource).set(self.clock())
        return reply

    async def recover(self, exc: CursorExpired | StartOutOfWindow) -> None:
        """Pick the next position after the server refused ours; record any history truly lost (``resume.py``)."""
        position, lost = self.recovery.refused(exc, self.position, self.client.server_now())
        await self._record(lost)
        self.position = position

    async def _record(self, lost: Lost | None) -> None:
        if lost is not None:
            await self.gaps.record(lost.start, lost.end, lost.reason, stop=self.term_over)

    def normalize(self, reply: p.WatchReply) -> Batch:
        """The reply as a batch (``batch.py``); the position moves past it, bad events are counted and logged."""
        saved = self.saved.cursor if self.saved is not None else None
        batch, self.position = to_batch(reply, self.position, resource=self.resource, tenant=self.tenant,
                                        observed=self.clock(), saved=saved)
        for action, n in batch.counts.items():
            m.EVENTS_RECEIVED.labels(self.resource, action).inc(n)
        if batch.undecodable:
            m.CURSOR_DECODE_FAILURES.labels(self.resource).inc(batch.undecodable)
        for raw, reason in batch.invalid:
            m.EVENTS_INVALID.labels(self.resource, reason).inc()
            self.log.error("event_invalid", reason=reason, cursor=raw.cursor, event_type=raw.event_type,
                           detail_keys=sorted(raw.detail)[:20])
        return batch

    # --- stage 2: publish, then save (``deliver.py``) -----------------------------------------------------------

    async def deliver(self, queue: asyncio.Queue[Batch | None]) -> None:
        await self.delivery.run(queue, self.term_over)
        raise _TermOver(lost=False)  # the sentinel came: both stages are done

    def health(self) -> WatchHealth:
        return self.state.health()

    async def wait_saved(self, done: Callable[[CursorState], bool]) -> CursorState:
        """Until a saved position satisfies ``done`` (for callers that must know what is durable)."""
        return await self.delivery.wait_saved(done)

    async def _stored(self, op: Callable[[], Awaitable[T]]) -> T:
        return await stored(op, stop=self.term_over, log=self.log)
