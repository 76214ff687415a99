"""The RabbitMQ bus: confirmed, mandatory publishes through a window, re-published until every one is durable.

``AmqpBus.publish`` returns only when the broker confirmed every event of the batch and returned none
(DESIGN.md invariant 1). Anything else (nack, return, timeout, lost channel or connection) is retried with the
bus's backoff until it is durable or stop is requested; an event is never dropped. One connection and one
channel per bus (``rwatch.bus.link``); concurrent ``publish`` calls (one per watcher) share them and the window.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiormq
from aio_pika.abc import DeliveryMode
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError
from tenacity.wait import wait_base

from rwatch.bus.link import Connector, Link
from rwatch.config import Config
from rwatch.errors import BusError, MessageReturned
from rwatch.events import Message
from rwatch.failpoints import failpoint
from rwatch.logs import get_logger
from rwatch.metrics import EVENTS_PUBLISHED, PUBLISH_RETRIES, PUBLISH_SECONDS
from rwatch.retry import BUS, Policy, log_retry, retrying

CONTENT_TYPE = "application/json"
_ACK = aiormq.spec.Basic.Ack
_Properties = aiormq.spec.Basic.Properties
_PERSISTENT = int(DeliveryMode.PERSISTENT)


def _count_published(events: Sequence[Message], confirmed: list[int]) -> None:
    if not confirmed:
        return
    chosen = events if len(confirmed) == len(events) else [events[i] for i in confirmed]
    for (resource, action), n in Counter((e.resource, e.action) for e in chosen).items():
        EVENTS_PUBLISHED.labels(resource, action).inc(n)


class _Batch:
    """One ``publish`` call's events, encoded once, and which of them are not confirmed yet."""

    __slots__ = ("bodies", "events", "headers", "pending", "stamps")

    def __init__(self, events: Sequence[Message]) -> None:
        self.events = events
        # Bodies and headers are built once per batch; only message_id changes between attempts.
        self.bodies = [e.to_json() for e in events]
        self.headers: list[dict[str, Any]] = [
            {"x-event-id": e.id, "x-resource": e.resource, "x-action": e.action} for e in events
        ]
        self.stamps = [datetime.fromtimestamp(e.version[0], UTC) for e in events]
        self.pending = list(range(len(events)))


class _Round:
    """One pass over the pending events; ``failed`` stops launching more once anything went wrong."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False



def _reason(exc: BaseException) -> str | None:
    """The retry reason (a metric label), or None for an exception that is a bug, not broker trouble."""
    if isinstance(exc, PublishError | MessageReturned):
        return "returned"
    if isinstance(exc, DeliveryError):
        return "nack"
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return "timeout"
    if isinstance(exc, AMQPError | ChannelInvalidStateError | OSError):
        return "connection"
    if isinstance(exc, asyncio.CancelledError):
        # Only a publish cancelled from outside the round gets here (cancelling publish() itself raises
        # out of gather): ``Link.abort`` cancelled it because its channel or connection closed, or the
        # client library gave up on it while tearing down a channel.
        return "connection"
    return None


class AmqpBus:
    """Publishes events to RabbitMQ; ``publish`` returns once every event is confirmed and routed."""

    policy: ClassVar[Policy | wait_base] = BUS  # connecting and re-publishing (tests make it fast)

    def __init__(
        self,
        config: Config,
        *,
        stop: asyncio.Event | None = None,
        connection_name: str = "rwatch",
        connect_timeout: float = 30.0,
    ) -> None:
        self._timeout = config.bus.publish_timeout
        self._stop = stop if stop is not None else asyncio.Event()
        self._closed = asyncio.Event()
        self._connector = Connector(config, stop=self._stop, closed=self._closed, policy=self.policy,
                               connection_name=connection_name, connect_timeout=connect_timeout)
        # At most publish_window unconfirmed publishes in flight, across all concurrent publish calls.
        self._window = asyncio.Semaphore(config.bus.publish_window)
        self._exchange_name = config.bus.exchange
        self._log = get_logger("rwatch.bus", exchange=config.bus.exchange)
        # Resources whose last publish the broker returned (no queue bound for them), since when (Unix time):
        # their watcher waits, saving nothing, until a queue is bound. /readyz shows each as route:<resource>.
        self.unrouted: dict[str, float] = {}

    @property
    def connected(self) -> bool:
        return self._connector.connected

    async def start(self) -> None:
        """Connect and declare the topology, retrying while the broker is unreachable (until stop)."""
        await self._connector.ready()

    async def close(self) -> None:
        """Close the connection. A publish still retrying ends with ``Stopping``."""
        self._closed.set()
        await self._connector.close()

    # -- publishing ----------------------------------------------------------------------------------------

    async def publish(self, events: Sequence[Message]) -> None:
        if not events:
            return
        started = time.perf_counter()
        batch = _Batch(events)
        publishing = retrying(self.policy, stop=[self._stop, self._closed],
                              before_sleep=log_retry(self._log, "publish_retry"))
        async for attempt in publishing:
            with attempt:
                await self._publish_pending(batch)
        PUBLISH_SECONDS.observe(time.perf_counter() - started)

    async def _publish_pending(self, batch: _Batch) -> None:
        """One attempt at what is still pending; ``BusError`` (transient) names what is left unconfirmed."""
        link = await self._connector.ready()
        events, pending = batch.events, batch.pending
        results = await self._publish_round(link, batch)
        failed: list[int] = []
        confirmed: list[int] = []
        reasons: Counter[str] = Counter()
        bug: BaseException | None = None
        returned: set[str] = set()
        for i, result in zip(pending, results, strict=False):
            if result is None:
                confirmed.append(i)
                continue
            failed.append(i)
            reason = _reason(result)
            if reason is None:
                bug = bug or result
            else:
                reasons[reason] += 1
                if reason == "returned":
                    returned.add(events[i].resource)
        _count_published(events, confirmed)
        self._note_routes(events, confirmed, returned)
        if bug is not None:
            raise bug
        # Events never launched because an earlier one failed stay pending after the failed ones.
        failed += pending[len(results):]
        if not failed:
            return
        # Re-publish what is not confirmed, in its original order, before anything later: only messages
        # that were in flight together (at most the window) can end up reordered relative to each other
        # (e.g. #5 nacked while #6 was confirmed). That is acceptable only because every sink is
        # version-fenced (invariant 2); otherwise per-resource order holds (invariant 3).
        batch.pending = failed
        for reason, count in reasons.items():
            PUBLISH_RETRIES.labels(reason).inc(count)
        if "connection" in reasons or "timeout" in reasons:
            await self._connector.drop(link, "publish_failed")
        raise BusError("events not confirmed", pending=len(failed), reasons=dict(reasons),
                       stopping=self._stop.is_set() or self._closed.is_set())

    def _note_routes(self, events: Sequence[Message], confirmed: list[int], returned: set[str]) -> None:
        for resource in {events[i].resource for i in confirmed} - returned:
            if self.unrouted.pop(resource, None) is not None:
                self._log.info("publish_routed", resource=resource)
        for resource in returned - set(self.unrouted):
            self.unrouted[resource] = time.time()
            # Once per episode, not per retry: the watcher waits (nothing lost, nothing saved) until a queue exists.
            self._log.error("publish_unrouted", resource=resource, routing_key=f"cmdb.{resource}.*",
                            fix="no queue takes these events: start the consumers that declare it, or give a sink "
                                "of this configuration the resource")

    async def _publish_round(self, link: Link, batch: _Batch) -> list[BaseException | None]:
        """Publish ``batch.pending`` in order through the window; one result per launched event (None = confirmed).

        Once anything fails, the rest are held back (fewer results than pending) so that the retry
        goes out first, in order. Every publish is registered on ``link`` so that losing the channel fails
        it at once (``Link.abort``) instead of after ``publish_timeout``.
        """
        window = self._window
        state = _Round()
        tasks: list[asyncio.Task[None]] = []
        channel, inflight = link.raw, link.inflight
        exchange, events, bodies, headers, stamps = (self._exchange_name, batch.events, batch.bodies,
                                                    batch.headers, batch.stamps)

        def settled(task: asyncio.Task[None]) -> None:
            # A done callback, not a finally in _send: it also runs for a task cancelled before it started
            # (by abort or by a cancelled publish), which would otherwise keep its window slot forever.
            inflight.discard(task)
            if task.cancelled() or task.exception() is not None:
                state.failed = True
            window.release()

        try:
            for i in batch.pending:
                await window.acquire()
                if state.failed:
                    window.release()
                    break
                properties = _Properties(
                    content_type=CONTENT_TYPE,
                    delivery_mode=_PERSISTENT,
                    headers=headers[i],
                    # Fresh per attempt: aio-pika hangs when two in-flight publishes share a message_id.
                    message_id=uuid.uuid4().hex,
                    timestamp=stamps[i],
                )
                send = self._send(channel, exchange, bodies[i], properties, events[i].routing_key)
                task = asyncio.create_task(send)
                inflight.add(task)
                task.add_done_callback(settled)
                tasks.append(task)
            return await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _send(self, channel: aiormq.Channel, exchange: str, body: bytes,
                    properties: aiormq.spec.Basic.Properties, routing_key: str) -> None:
        """One confirmed publish; the round's ``settled`` callback frees its window slot and records failure."""
        if channel.is_closed:
            raise ChannelInvalidStateError("channel closed")
        # aiormq's basic_publish straight, as aio-pika's Exchange.publish does, minus the per-message
        # Message object and the wait for the socket write (wait=False): the broker's confirm is what
        # we wait for. This is most of the client-side cost per message.
        result = await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                             properties=properties, mandatory=True, timeout=self._timeout,
                                             wait=False)
        if type(result) is not _ACK:
            # With on_return_raises a return raises PublishError; this guards the other path (a returned
            # DeliveredMessage as the result): it is never durable.
            raise MessageReturned("the broker returned the message", routing_key=routing_key)
        failpoint("bus.after_confirm")
