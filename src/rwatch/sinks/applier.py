"""The Applier: applies batches of one (sink, resource) queue until each message is applied or dead-lettered.

A transient sink failure holds the batch and retries it with backoff. Once it has failed ``max_attempts`` times
(or for ``retry_timeout``), the batch is *isolated*: the longest prefix that applies is applied (bisection), the
first event that fails alone becomes a *suspect*, the later events of its object wait behind it (per-object
order), and the rest goes on. A suspect is dead-lettered as poison only on proof that the sink is up: it fails
alone right after the sink applied other events (of this batch, of a batch grown from what was delivered
meanwhile, or of another queue of the same sink: ``SinkHealth``), with no failing attempt of several events
since. Without that proof the sink is down: the batch stays in hand, is retried with backoff, and nothing is
dead-lettered, however long it lasts.

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
from dataclasses import dataclass
from typing import Any, Literal

import structlog

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
from rwatch.retry import HealthyResetWait, sleep_or_stop
from rwatch.sinks.base import Sink

log = structlog.get_logger("rwatch.consume")

DeadLetter = Callable[[Message, str, dict[str, Any]], Awaitable[None]]
# What the consumer has been delivered meanwhile (decoded), to grow a held batch with.
More = Callable[[], Awaitable[list[Message]]]
_Outcome = Literal["applied", "failed", "refused"]


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


class SinkHealth:
    """What every queue of one sink saw lately, in one sequence: the proof that tells "this event fails" from
    "the sink is down". A failed attempt of one message proves nothing (that message may be the poison); a
    failed attempt of several, after the last success, says the sink itself is failing."""

    def __init__(self) -> None:
        self._seq = 0
        self.last_applied = 0
        self.last_failed = 0

    def tick(self) -> int:
        self._seq += 1
        return self._seq

    def applied(self) -> None:
        self.last_applied = self.tick()

    def failed(self) -> None:
        self.last_failed = self.tick()

    def up_since(self, seq: int) -> bool:
        """The sink applied something after ``seq``, and no attempt of several messages failed after that."""
        return self.last_applied > seq and self.last_applied > self.last_failed


@dataclass(eq=False, slots=True)
class _Item:
    message: Message
    attempts: int = 0  # failed attempts that included it
    failed_at: int = 0  # SinkHealth sequence of its last failure
    alone_at: int = 0  # ... of its last failure alone
    proven: bool = False  # its last failure was alone, and the sink applied other events since the one before
    error: BaseException | None = None

    @property
    def obj(self) -> tuple[str, ...]:
        msg = self.message
        return (msg.tenant, msg.resource, msg.key) if isinstance(msg, Event) else ("resync", msg.id)

    @property
    def failed_alone_last(self) -> bool:
        return self.failed_at == self.alone_at != 0


@dataclass(slots=True)
class _Round:
    """One isolation of a held batch."""

    held: list[_Item]
    suspects: set[_Item]
    applied: int = 0
    poison: int = 0
    probes: int = 0
    grown: int = 0
    new_suspects: int = 0


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
        self.backoff = HealthyResetWait(initial=self.policy.retry_backoff, maximum=self.policy.retry_backoff_max)
        self.log = log.bind(sink=sink.name, resource=resource)

    async def apply(self, messages: Sequence[Message], more: More | None = None) -> None:
        """Return once every message is applied (every mark swept) or dead-lettered; ``Stopping`` if asked to
        stop first, ``SinkCrashed`` if the sink raised a bug. A resync mark is swept after the events before it
        and before those after it. ``more`` may grow the last run of events while it is held (see ``_isolate``)."""
        queue: deque[Message] = deque(messages)
        while queue:
            head = queue.popleft()
            if isinstance(head, ResyncMark):
                await self._settle([_Item(head)], None)
                continue
            run = [_Item(head)]
            while queue and isinstance(queue[0], Event):
                run.append(_Item(queue.popleft()))
            grow = self._grower(more, queue) if more is not None and not queue else None
            await self._settle(run, grow)

    def _grower(self, more: More, queue: deque[Message]) -> Callable[[], Awaitable[list[_Item]]]:
        async def grow() -> list[_Item]:
            if queue:  # a mark came in: nothing may join the run past it
                return []
            got = await more()
            taken: list[_Item] = []
            for i, message in enumerate(got):
                if isinstance(message, ResyncMark):
                    queue.extend(got[i:])  # swept after the run, then what follows it
                    break
                taken.append(_Item(message))
            return taken

        return grow

    # -- one batch -------------------------------------------------------------------------------------------

    async def _settle(self, items: list[_Item], grow: Callable[[], Awaitable[list[_Item]]] | None) -> None:
        """Hold ``items`` until each is applied or dead-lettered. Past the bound, the next attempt (after the
        pause, so that other queues of the sink had time to prove it up) is an isolation of the batch."""
        started = time.perf_counter()
        left = items
        suspects: set[_Item] = set()
        failures, first_failure = 0, 0.0
        while True:
            if failures and (failures >= self.policy.max_attempts
                             or self.clock() - first_failure >= self.policy.retry_timeout):
                left = await self._isolate(left, suspects, grow)
                failures = 0
                if not left:
                    break
            else:
                outcome = await self._try(left)
                if outcome == "applied":
                    break
                if outcome == "refused":  # the sink refused the batch without saying which event: one at a time
                    for item in left:
                        await self._settle([item], None)
                    break
                failures += 1
                if failures == 1:
                    first_failure = self.clock()
                m.APPLY_RETRIES.labels(self.sink.name).inc()
            error = left[0].error
            delay = self.backoff.next_delay()
            if failures:  # an isolation that held the batch has logged apply_isolated instead
                fields = error.fields() if isinstance(error, RwatchError) else {"error": repr(error)}
                self.log.warning("sink_apply_failed", **{**fields, "events": len(left), "attempt": failures,
                                                          "retry_in": round(delay, 2)})
            if await sleep_or_stop(delay, self.stop):
                raise Stopping("stopping while the sink is failing") from error
        if isinstance(items[0].message, Event):
            m.APPLY_SECONDS.labels(self.sink.name).observe(time.perf_counter() - started)

    async def _try(self, items: list[_Item]) -> _Outcome:
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

    async def _refused(self, items: list[_Item], exc: SinkRejected) -> _Outcome:
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

    async def _dead_letter(self, item: _Item, reason: str, fields: dict[str, Any], *, refused: bool) -> None:
        await self.dead_letter(item.message, reason, {**fields, "attempts": item.attempts + refused})

    # -- isolation -------------------------------------------------------------------------------------------

    async def _isolate(self, items: list[_Item], suspects: set[_Item],
                       grow: Callable[[], Awaitable[list[_Item]]] | None) -> list[_Item]:
        """The batch failed up to the bound: apply what applies, dead-letter what fails alone while the sink
        applies the rest, and return what is left (nothing, or everything the sink could not be proved up for).

        ``suspects`` (events that failed alone without that proof) outlive this round, for the next one.
        """
        r = _Round(held=list(items), suspects=suspects)
        known_bad = not suspects  # the whole batch just failed: trying it again proves nothing
        while True:
            if self.stop.is_set():
                raise Stopping("stopping while isolating a failing batch")
            blocked = {i.obj for i in r.held if i in r.suspects}
            runnable = [i for i in r.held if i.obj not in blocked]
            if runnable:
                if r.new_suspects and not r.applied and not known_bad:
                    # One event failed alone and nothing applied since: if the others fail too, the sink is down.
                    if await self._probe(r, runnable) != "applied":
                        break
                    continue
                await self._bisect(r, runnable, known_bad)
                known_bad = False
                continue
            if await self._confirm(r):
                continue
            grown = await grow() if grow is not None else []
            if not grown:
                break
            r.grown += len(grown)
            r.held.extend(grown)
        outcome = "poison" if r.poison else ("applied" if not r.held else "held")
        m.APPLY_ISOLATIONS.labels(self.sink.name, self.resource, outcome).inc()
        self.log.warning("apply_isolated", outcome=outcome, applied=r.applied, dead_lettered=r.poison,
                         held=len(r.held), suspects=len(r.suspects), grown=r.grown, probes=r.probes)
        return r.held

    async def _probe(self, r: _Round, items: list[_Item]) -> _Outcome:
        r.probes += 1
        outcome = await self._try(items)
        if outcome == "applied":
            r.applied += len(items)
            done = set(items)
            r.held = [i for i in r.held if i not in done]
        return outcome

    async def _bisect(self, r: _Round, runnable: list[_Item], known_bad: bool) -> None:
        """Apply the longest prefix of ``runnable`` that applies, then judge the first event that fails alone."""
        if not known_bad and await self._probe(r, runnable) == "applied":
            return
        lo, bad = 0, len(runnable)  # runnable[lo:bad] does not apply as a whole
        while bad - lo > 1:
            mid = (lo + bad) // 2
            if await self._probe(r, runnable[lo:mid]) == "applied":
                lo = mid
            else:
                bad = mid
        culprit = runnable[lo]
        if not culprit.failed_alone_last and await self._probe(r, [culprit]) == "applied":
            return
        if not await self._judge(r, culprit):
            r.suspects.add(culprit)
            r.new_suspects += 1

    async def _judge(self, r: _Round, item: _Item) -> bool:
        """Settle an event that failed alone, if the sink can be proved up around it: applied on a last try, or
        dead-lettered as poison. False when nothing proves the sink up: it stays a suspect."""
        if not (item.failed_alone_last and item.proven):
            if not self.health.up_since(item.failed_at):
                return False
            # The sink applied other events since this one last failed: one more try alone decides.
            if await self._probe(r, [item]) == "applied":
                r.suspects.discard(item)
                return True
            if not item.proven:  # a failure of several events came in between: the sink may be failing
                return False
        await self._poison(r, item)
        return True

    async def _confirm(self, r: _Round) -> bool:
        """Judge each suspect; False when none could be settled."""
        progressed = False
        for item in [i for i in r.held if i in r.suspects]:
            progressed = await self._judge(r, item) or progressed
        return progressed

    async def _poison(self, r: _Round, item: _Item) -> None:
        error = item.error
        message = error.message if isinstance(error, RwatchError) else repr(error)
        fields = error.fields() if isinstance(error, RwatchError) else {"error": repr(error)}
        r.suspects.discard(item)
        r.held.remove(item)
        r.poison += 1
        m.POISON_EVENTS.labels(self.sink.name, self.resource).inc()
        await self._dead_letter(item, f"poison: {message}", {**fields, "poison": True}, refused=False)

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


async def _crash_of(applier: Applier, message: Message) -> SinkCrashed | None:
    try:
        await applier.apply([message])
    except SinkCrashed as exc:
        return exc
    return None


async def apply_counting_crashes(applier: Applier, messages: Sequence[Message], limit: int) -> None:
    """The memory bus has no broker to count deliveries: a batch whose apply crashes (a bug) is applied one
    message at a time; one that crashes alone is tried again, with backoff, until it crashed ``limit`` + 1
    times (as many deliveries as the broker allows), then dead-lettered. The others apply once."""
    try:
        await applier.apply(messages)
        return
    except SinkCrashed as exc:
        crashed = exc
    for message in messages:
        error = crashed if len(messages) == 1 else await _crash_of(applier, message)
        crashes = 0
        while error is not None:
            crashes += 1
            report_crash(applier, message, error, crashes, limit)
            if crashes > limit:
                await applier.dead_letter(message, f"crashed: {error.message}",
                                          {**error.fields(), "attempts": crashes, "crashed": True})
                break
            if await sleep_or_stop(applier.backoff.next_delay(), applier.stop):
                raise Stopping("stopping while a message crashes its sink") from error
            error = await _crash_of(applier, message)
