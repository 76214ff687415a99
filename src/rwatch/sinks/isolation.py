"""Isolation: a batch that failed up to its sink's bound is split until only what cannot be applied is held.

The longest prefix that applies is applied (bisection), the first event that fails alone becomes a *suspect*, the
later events of its object wait behind it (per-object order), and the rest goes on. A suspect is dead-lettered as
poison only on proof that the sink is up: it fails alone right after the sink applied other events (of this batch,
of a batch grown from what was delivered meanwhile, or of another queue of the same sink: ``SinkHealth``), with no
failing attempt of several events since. Without that proof the sink is down: what is left stays in hand for the
``Applier`` to hold and retry, and nothing is dead-lettered, however long it lasts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from rwatch import metrics as m
from rwatch.errors import RwatchError, Stopping
from rwatch.events import Event, Message

Outcome = Literal["applied", "failed", "refused"]


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
class Item:
    """A held message and the record of its failures."""

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
class Round:
    """One isolation of a held batch."""

    held: list[Item]
    suspects: set[Item]
    applied: int = 0
    poison: int = 0
    probes: int = 0
    grown: int = 0
    new_suspects: int = 0


# One attempt at some held items (the Applier's), and the poison's way to the dead-letter queue.
Attempt = Callable[[list[Item]], Awaitable[Outcome]]
Poisoned = Callable[[Item, str, dict[str, Any]], Awaitable[None]]
Grow = Callable[[], Awaitable[list[Item]]]


class Isolation:
    """Isolates the held batches of one (sink, resource) queue; ``isolate`` is one round."""

    def __init__(self, sink: str, resource: str, stop: asyncio.Event, health: SinkHealth, attempt: Attempt,
                 poisoned: Poisoned, log: Any) -> None:
        self.sink = sink
        self.resource = resource
        self.stop = stop
        self.health = health
        self.attempt = attempt
        self.poisoned = poisoned
        self.log = log

    async def isolate(self, items: list[Item], suspects: set[Item], grow: Grow | None) -> list[Item]:
        """The batch failed up to the bound: apply what applies, dead-letter what fails alone while the sink
        applies the rest, and return what is left (nothing, or everything the sink could not be proved up for).

        ``suspects`` (events that failed alone without that proof) outlive this round, for the next one.
        """
        r = Round(held=list(items), suspects=suspects)
        known_bad = not suspects  # the whole batch just failed: trying it again proves nothing
        # Not a retry: each pass applies, judges or grows; it ends when a pass can do none of them (or at stop).
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
        m.APPLY_ISOLATIONS.labels(self.sink, self.resource, outcome).inc()
        self.log.warning("apply_isolated", outcome=outcome, applied=r.applied, dead_lettered=r.poison,
                         held=len(r.held), suspects=len(r.suspects), grown=r.grown, probes=r.probes)
        return r.held

    async def _probe(self, r: Round, items: list[Item]) -> Outcome:
        r.probes += 1
        outcome = await self.attempt(items)
        if outcome == "applied":
            r.applied += len(items)
            done = set(items)
            r.held = [i for i in r.held if i not in done]
        return outcome

    async def _bisect(self, r: Round, runnable: list[Item], known_bad: bool) -> None:
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

    async def _judge(self, r: Round, item: Item) -> bool:
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

    async def _confirm(self, r: Round) -> bool:
        """Judge each suspect; False when none could be settled."""
        progressed = False
        for item in [i for i in r.held if i in r.suspects]:
            progressed = await self._judge(r, item) or progressed
        return progressed

    async def _poison(self, r: Round, item: Item) -> None:
        error = item.error
        message = error.message if isinstance(error, RwatchError) else repr(error)
        fields = error.fields() if isinstance(error, RwatchError) else {"error": repr(error)}
        r.suspects.discard(item)
        r.held.remove(item)
        r.poison += 1
        m.POISON_EVENTS.labels(self.sink, self.resource).inc()
        await self.poisoned(item, f"poison: {message}", {**fields, "poison": True})
