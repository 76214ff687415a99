"""The Applier: applies batches of one (sink, resource) queue until each message is applied or dead-lettered.

A transient sink failure holds the batch and retries it with the sink's backoff (``retry_backoff`` doubling to
``retry_backoff_max``). Once it has failed ``max_attempts`` times (or for ``retry_timeout``), the batch is
*isolated* (``rwatch.sinks.isolation``): what applies is applied, a poison is dead-lettered only on proof that the
sink is up, and what is left is held and retried again, however long the sink stays down.

A permanent refusal dead-letters exactly the refused events (finding them one by one when the sink cannot name
them). Anything else a sink raises is a bug: it leaves as ``SinkCrashed``, for the consumer to find and reject
the message that crashes (the broker's delivery limit counts it), or, on the memory bus, for
``apply_counting_crashes`` to count it in place.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from tenacity import RetryCallState

from rwatch import metrics as m
from rwatch.errors import (
    TRANSIENT_ERRORS,
    PermanentError,
    RwatchError,
    SinkCrashed,
    SinkRejected,
    Stopping,
)
from rwatch.events import Event, Message, ResyncMark
from rwatch.retry import HealthyResetWait, retrying
from rwatch.sinks.base import Sink
from rwatch.sinks.isolation import Grow, Isolation, Item, Outcome, SinkHealth

log = structlog.get_logger("rwatch.consume")

DeadLetter = Callable[[Message, str, dict[str, Any]], Awaitable[None]]
# What the consumer has been delivered meanwhile (decoded), to grow a held batch with.
More = Callable[[], Awaitable[list[Message]]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A sink's bound on holding a failing batch, and its backoff (``sinks.<name>`` keys of the same names)."""

    max_attempts: int = 10
    retry_timeout: float = 120.0
    retry_backoff: float = 0.2
    retry_backoff_max: float = 30.0

    @classmethod
    def of(cls, settings: object) -> RetryPolicy:
        default = cls()
        return cls(*(getattr(settings, name, getattr(default, name))
                     for name in ("max_attempts", "retry_timeout", "retry_backoff", "retry_backoff_max")))


@dataclass(slots=True)
class _Hold:
    """A batch in hand: what is left of it, its suspects, and its failed attempts since the last isolation."""

    left: list[Item]
    suspects: set[Item] = field(default_factory=set)
    failures: int = 0
    first_failure: float = 0.0


class Applier:
    """Applies batches of one resource to one sink until each message is applied or dead-lettered."""

    def __init__(self, sink: Sink, resource: str, stop: asyncio.Event, dead_letter: DeadLetter,
                 policy: RetryPolicy | None = None, health: SinkHealth | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.resource = resource
        self.stop = stop
        self.dead_letter = dead_letter
        self.policy = policy or RetryPolicy()
        self.health = health or SinkHealth()
        self.clock = clock
        # Kept across batches: a sink that flaps (one batch applied between failures) keeps backing off.
        self.backoff = HealthyResetWait(initial=self.policy.retry_backoff, maximum=self.policy.retry_backoff_max)
        self.log = log.bind(sink=sink.name, resource=resource)
        self.isolation = Isolation(sink.name, resource, stop, self.health, self._try, self._poisoned, self.log)

    async def apply(self, messages: Sequence[Message], more: More | None = None) -> None:
        """Return once every message is applied (every mark swept) or dead-lettered; ``Stopping`` if asked to
        stop first, ``SinkCrashed`` if the sink raised a bug. A resync mark is swept after the events before it
        and before those after it. ``more`` may grow the last run of events while it is held (see ``Isolation``)."""
        queue: deque[Message] = deque(messages)
        while queue:
            head = queue.popleft()
            if isinstance(head, ResyncMark):
                await self._settle([Item(head)], None)
                continue
            run = [Item(head)]
            while queue and isinstance(queue[0], Event):
                run.append(Item(queue.popleft()))
            grow = self._grower(more, queue) if more is not None and not queue else None
            await self._settle(run, grow)

    def _grower(self, more: More, queue: deque[Message]) -> Grow:
        async def grow() -> list[Item]:
            if queue:  # a mark came in: nothing may join the run past it
                return []
            got = await more()
            taken: list[Item] = []
            for i, message in enumerate(got):
                if isinstance(message, ResyncMark):
                    queue.extend(got[i:])  # swept after the run, then what follows it
                    break
                taken.append(Item(message))
            return taken

        return grow

    # -- one batch -------------------------------------------------------------------------------------------

    async def _settle(self, items: list[Item], grow: Grow | None) -> None:
        """Hold ``items`` until each is applied or dead-lettered: an attempt, or past the bound an isolation, then
        the sink's backoff, until nothing is left (``Stopping`` if stop comes first). The isolation comes after a
        pause, so that other queues of the sink had time to prove it up."""
        started = time.perf_counter()
        hold = _Hold(items)
        holding = retrying(self.backoff, stop=self.stop, on=(), until=bool, before_sleep=self._log_held(hold))
        await holding(self._step, hold, grow)
        if isinstance(items[0].message, Event):
            m.APPLY_SECONDS.labels(self.sink.name).observe(time.perf_counter() - started)

    async def _step(self, hold: _Hold, grow: Grow | None) -> bool:
        """One step of holding a batch; True once nothing of it is left."""
        if hold.failures and (hold.failures >= self.policy.max_attempts
                              or self.clock() - hold.first_failure >= self.policy.retry_timeout):
            hold.left = await self.isolation.isolate(hold.left, hold.suspects, grow)
            hold.failures = 0
            return not hold.left
        outcome = await self._try(hold.left)
        if outcome == "applied":
            return True
        if outcome == "refused":  # the sink refused the batch without saying which event: one at a time
            for item in hold.left:
                await self._settle([item], None)
            return True
        hold.failures += 1
        if hold.failures == 1:
            hold.first_failure = self.clock()
        m.APPLY_RETRIES.labels(self.sink.name).inc()
        return False

    def _log_held(self, hold: _Hold) -> Callable[[RetryCallState], None]:
        def logged(state: RetryCallState) -> None:
            if not hold.failures:  # an isolation that held the batch has logged apply_isolated instead
                return
            error = hold.left[0].error
            fields = error.fields() if isinstance(error, RwatchError) else {"error": repr(error)}
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            self.log.warning("sink_apply_failed", **{**fields, "events": len(hold.left), "attempt": hold.failures,
                                                      "retry_in": round(delay, 2)})

        return logged

    async def _try(self, items: list[Item]) -> Outcome:
        """One attempt. ``applied``: done (refused events dead-lettered, the rest applied); ``refused``: the
        sink refused several events without naming them; ``failed``: a transient failure, recorded."""
        messages = [i.message for i in items]
        try:
            if isinstance(messages[0], ResyncMark):
                swept = await self.sink.sweep(messages[0])
            else:
                await self.sink.apply(messages)  # type: ignore[arg-type]  # a run holds events only
        except Stopping:
            raise
        except SinkRejected as exc:
            return await self._refused(items, exc)
        except PermanentError as exc:
            return await self._refused(items, SinkRejected(exc.message, **exc.extra))
        except TRANSIENT_ERRORS as exc:
            alone = len(items) == 1
            if alone:
                # Proves nothing about the sink (this message may be the poison), but may prove the message.
                items[0].proven = self.health.up_since(items[0].failed_at)
                seq = items[0].alone_at = self.health.tick()
            else:
                self.health.failed()
                seq = self.health.last_failed
            for item in items:
                item.attempts += 1
                item.failed_at, item.error = seq, exc
                item.proven = item.proven and alone
            return "failed"
        except Exception as exc:
            raise SinkCrashed(f"{type(exc).__name__}: {exc}", sink=self.sink.name, resource=self.resource,
                              events=len(items)) from exc
        self.health.applied()
        if isinstance(messages[0], ResyncMark):
            mark = messages[0]
            m.RESYNC_SWEPT.labels(self.sink.name, mark.resource).inc(swept)
            self.log.info("resync_swept", resync_id=mark.resync_id, swept=swept, version=list(mark.version))
        else:
            self._count(messages)
        return "applied"

    async def _refused(self, items: list[Item], exc: SinkRejected) -> Outcome:
        self.health.applied()  # the sink answered: it is up, and judging
        if exc.event_ids and isinstance(items[0].message, Event):
            refused = set(exc.event_ids)
            for item in items:
                if item.message.id in refused:
                    await self._dead_letter(item, exc.message, exc.fields(), refused=True)
            self._count(i.message for i in items if i.message.id not in refused)
            return "applied"
        if len(items) == 1:
            await self._dead_letter(items[0], exc.message, exc.fields(), refused=True)
            return "applied"
        return "refused"

    async def _dead_letter(self, item: Item, reason: str, fields: dict[str, Any], *, refused: bool) -> None:
        await self.dead_letter(item.message, reason, {**fields, "attempts": item.attempts + refused})

    async def _poisoned(self, item: Item, reason: str, fields: dict[str, Any]) -> None:
        await self._dead_letter(item, reason, fields, refused=False)

    def _count(self, events: Any) -> None:
        counts: dict[str, int] = {}
        for event in events:
            counts[event.action] = counts.get(event.action, 0) + 1
        for action, n in counts.items():
            m.EVENTS_APPLIED.labels(self.sink.name, self.resource, action).inc(n)


def report_crash(applier: Applier, message: Message, error: SinkCrashed, delivery: int, limit: int) -> None:
    """A message crashed its sink alone: counted, and logged with the traceback (a bug to fix)."""
    m.APPLY_CRASHES.labels(applier.sink.name, applier.resource).inc()
    applier.log.error("apply_crashed", event_id=message.id, action=message.action, delivery=delivery,
                      delivery_limit=limit, error=error.message, exc_info=error)


async def apply_counting_crashes(applier: Applier, messages: Sequence[Message], limit: int) -> None:
    """The memory bus has no broker to count deliveries: a batch whose apply crashes (a bug) is applied one
    message at a time; one that crashes alone is tried again, with backoff, until it crashed ``limit`` + 1
    times (as many deliveries as the broker allows), then dead-lettered. The others apply once."""
    if len(messages) > 1:
        try:
            await applier.apply(messages)
            return
        except SinkCrashed:
            pass
    for message in messages:
        await _apply_or_dead_letter(applier, message, limit)


async def _apply_or_dead_letter(applier: Applier, message: Message, limit: int) -> None:
    def crashed(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        assert isinstance(error, SinkCrashed)
        report_crash(applier, message, error, state.attempt_number, limit)

    applying = retrying(applier.backoff, stop=applier.stop, on=(SinkCrashed,), attempts=limit + 1,
                        before_sleep=crashed)
    try:
        await applying(applier.apply, [message])
    except SinkCrashed as error:  # the last of limit + 1 crashes
        report_crash(applier, message, error, limit + 1, limit)
        await applier.dead_letter(message, f"crashed: {error.message}",
                                  {**error.fields(), "attempts": limit + 1, "crashed": True})
