"""The in-process bus: ``publish`` hands each subscriber its share of the batch and waits until applied.

"Durable" here means applied by every subscribed sink, so a watcher saves its cursor only after the sinks
took the batch (invariant 1). Nothing is queued: the bus holds only the batch in hand (invariant 5), and a
slow handler slows the publisher, which is the backpressure.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from tenacity import RetryCallState
from tenacity.wait import wait_base

from rwatch.errors import MessageReturned, Stopping
from rwatch.events import Message
from rwatch.logs import get_logger
from rwatch.metrics import EVENTS_PUBLISHED, PUBLISH_RETRIES
from rwatch.retry import BUS, Policy, log_retry, retrying

Handler = Callable[[Sequence[Message]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Subscriber:
    name: str
    resources: frozenset[str]
    handler: Handler


class MemoryBus:
    """Routes each event to the subscribers of its resource; ``publish`` returns when all applied it."""

    policy: ClassVar[Policy | wait_base] = BUS  # a handler's transient failures (tests make it fast)

    def __init__(self, *, stop: asyncio.Event | None = None) -> None:
        self._stop = stop if stop is not None else asyncio.Event()
        self._closed = asyncio.Event()
        self._subscribers: list[_Subscriber] = []
        self._started = False
        self._log = get_logger("rwatch.bus", bus="memory")

    def subscribe(self, name: str, resources: Iterable[str], handler: Handler) -> None:
        """``handler`` is called with this subscriber's events of each batch, in order, once per batch."""
        if any(s.name == name for s in self._subscribers):
            raise ValueError(f"subscriber {name!r} already exists")
        self._subscribers.append(_Subscriber(name, frozenset(resources), handler))

    @property
    def connected(self) -> bool:
        return self._started and not self._closed.is_set()

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._closed.set()

    async def publish(self, events: Sequence[Message]) -> None:
        if self._closed.is_set():
            raise Stopping("bus closed")
        if not events:
            return
        routed = frozenset().union(*(s.resources for s in self._subscribers))
        for event in events:
            if event.resource not in routed:
                # The mirror of AMQP's mandatory return: an event nobody takes is never "durable".
                raise MessageReturned("no subscriber for the event's resource", resource=event.resource,
                                      routing_key=event.routing_key, event_id=event.id)
        shares = [(s, [e for e in events if e.resource in s.resources]) for s in self._subscribers]
        shares = [(s, batch) for s, batch in shares if batch]
        # Every handler runs to its end (success, Stopping or a permanent error) before publish returns, so
        # no sink is left applying in the background; then the first error is raised.
        deliveries = (self._deliver(s, batch) for s, batch in shares)
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for (resource, action), n in Counter((e.resource, e.action) for e in events).items():
            EVENTS_PUBLISHED.labels(resource, action).inc(n)

    async def _deliver(self, subscriber: _Subscriber, batch: list[Message]) -> None:
        logged = log_retry(self._log, "publish_retry", subscriber=subscriber.name, pending=len(batch))

        def retried(state: RetryCallState) -> None:
            PUBLISH_RETRIES.labels("handler").inc(len(batch))
            logged(state)

        await retrying(self.policy, stop=[self._stop, self._closed], before_sleep=retried)(subscriber.handler, batch)
