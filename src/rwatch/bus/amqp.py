"""The RabbitMQ bus: confirmed, mandatory publishes through a window, with reconnect and re-publish.

``AmqpBus.publish`` returns only when the broker confirmed every event of the batch and returned none
(DESIGN.md invariant 1). Anything else (nack, return, timeout, lost channel or connection) is retried
with backoff until it is durable or stop is requested; an event is never dropped.

Reconnection is a loop of our own over a plain ``aio_pika.connect`` rather than a robust connection:
the robust connection restores channels in the background but does not replay failed publishes, and
we must know exactly which messages were confirmed on which connection. One connection and one
channel per bus; concurrent ``publish`` calls (one per watcher) share them and the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    DeliveryMode,
    ExchangeType,
)
from aiormq.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)

from rwatch.bus import Backoff
from rwatch.config import Config, mask_url
from rwatch.errors import MessageReturned, Stopping, TopologyConflict
from rwatch.events import Message
from rwatch.failpoints import failpoint
from rwatch.logs import get_logger
from rwatch.metrics import BUS_CONNECTED, BUS_RECONNECTS, EVENTS_PUBLISHED, PUBLISH_RETRIES, PUBLISH_SECONDS
from rwatch.retry import close_quietly

T = TypeVar("T")

CONTENT_TYPE = "application/json"
# Errors that mean "this connection or channel is no good": drop it, reconnect, re-publish.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
)
_ACK = aiormq.spec.Basic.Ack
_Properties = aiormq.spec.Basic.Properties
_PERSISTENT = int(DeliveryMode.PERSISTENT)
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']+)'")


# --- topology ---------------------------------------------------------------------------------------------


def queue_name(config: Config, sink: str, resource: str) -> str:
    return f"{config.bus.queue_prefix}.{sink}.{resource}"


def dead_queue_name(config: Config, sink: str) -> str:
    return f"{config.bus.queue_prefix}.{sink}.dead"


def dlx_name(config: Config) -> str:
    return f"{config.bus.queue_prefix}.dlx"


def queue_arguments(config: Config, sink: str) -> dict[str, Any]:
    """The arguments of every ``<prefix>.<sink>.<resource>`` queue; a consumer declaring it must use these."""
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": config.bus.delivery_limit,
        "x-dead-letter-exchange": dlx_name(config),
        "x-dead-letter-routing-key": dead_queue_name(config, sink),
    }


DEAD_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


async def _declared(kind: str, name: str, step: Awaitable[T]) -> T:
    """Turn the broker's PRECONDITION_FAILED into an error that names the queue and the argument."""
    try:
        return await step
    except ChannelPreconditionFailed as exc:
        detail = str(exc)
        match = _INEQUIVALENT.search(detail)
        argument = match.group(1) if match else None
        what = f"argument {argument!r}" if argument else "arguments"
        raise TopologyConflict(
            f"{kind} {name!r} already exists with a different {what}; delete it or align the configuration "
            f"(broker: {detail})",
            **{kind: name},
            argument=argument,
        ) from None


async def declare_topology(channel: AbstractChannel, config: Config) -> AbstractExchange:
    """Declare the exchange, the dead-letter exchange, and every sink's queues and bindings.

    Idempotent with the same configuration. A queue or exchange that exists with other arguments raises
    ``TopologyConflict`` (and the broker closes ``channel``). Returns the events exchange.
    """
    bus = config.bus
    exchange = await _declared(
        "exchange", bus.exchange, channel.declare_exchange(bus.exchange, ExchangeType.TOPIC, durable=True)
    )
    sinks = config.queue_sinks
    if not sinks:
        return exchange
    dlx_ = dlx_name(config)
    dlx = await _declared("exchange", dlx_, channel.declare_exchange(dlx_, ExchangeType.DIRECT, durable=True))
    for sink in sinks:
        dead = dead_queue_name(config, sink)
        dead_queue = await _declared(
            "queue", dead, channel.declare_queue(dead, durable=True, arguments=DEAD_QUEUE_ARGUMENTS)
        )
        await dead_queue.bind(dlx, routing_key=dead)
        arguments = queue_arguments(config, sink)
        for resource in config.sink_resources(sink):
            name = queue_name(config, sink, resource)
            declare = channel.declare_queue(name, durable=True, arguments=arguments)
            queue = await _declared("queue", name, declare)
            await queue.bind(exchange, routing_key=f"cmdb.{resource}.*")
    return exchange


def _count_published(events: Sequence[Message], confirmed: list[int]) -> None:
    if not confirmed:
        return
    chosen = events if len(confirmed) == len(events) else [events[i] for i in confirmed]
    for (resource, action), n in Counter((e.resource, e.action) for e in chosen).items():
        EVENTS_PUBLISHED.labels(resource, action).inc(n)


# --- the bus ----------------------------------------------------------------------------------------------


class _Round:
    """One pass over the pending events; ``failed`` stops launching more once anything went wrong."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False


class _Link:
    """One connection, its channel, and the publishes in flight on that channel.

    ``abort`` fails every publish in flight on the link at once; it runs when the channel closes (the
    broker or the network closed it, or we dropped it). aiormq only rejects the futures it tracks (the
    confirmations): a publish still waiting inside ``basic_publish`` for the channel lock, or for room in
    the connection's bounded write queue whose writer died with the socket, is never woken and would
    wait for its ``publish_timeout``, holding window slots and stalling every publish behind it.
    """

    __slots__ = ("channel", "connection", "inflight", "raw")

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel, raw: aiormq.Channel) -> None:
        self.connection = connection
        self.channel = channel
        self.raw = raw
        self.inflight: set[asyncio.Task[None]] = set()

    @property
    def usable(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed and not self.raw.is_closed

    def abort(self, *_: Any) -> None:
        for task in list(self.inflight):
            task.cancel("rwatch: connection or channel lost")


def _reason(exc: BaseException) -> str | None:
    """The retry reason (a metric label), or None for an exception that is a bug, not broker trouble."""
    if isinstance(exc, PublishError | MessageReturned):
        return "returned"
    if isinstance(exc, DeliveryError):
        return "nack"
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return "timeout"
    if isinstance(exc, _TRANSPORT_ERRORS):
        return "connection"
    if isinstance(exc, asyncio.CancelledError):
        # Only a publish cancelled from outside the round gets here (cancelling publish() itself raises
        # out of gather): ``_Link.abort`` cancelled it because its channel or connection closed, or the
        # client library gave up on it while tearing down a channel.
        return "connection"
    return None


class AmqpBus:
    """Publishes events to RabbitMQ; ``publish`` returns once every event is confirmed and routed."""

    def __init__(
        self,
        config: Config,
        *,
        stop: asyncio.Event | None = None,
        connection_name: str = "rwatch",
        connect_timeout: float = 30.0,
    ) -> None:
        self._config = config
        self._url = config.bus.url.get_secret_value()
        self._timeout = config.bus.publish_timeout
        self._connection_name = connection_name  # shown by the broker; lets ops (and tests) find it
        self._connect_timeout = connect_timeout  # connect, open the channel, declare the topology
        self._close_timeout = config.run.close_timeout  # a close handshake the broker does not answer
        self._stop = stop if stop is not None else asyncio.Event()
        self._closed = asyncio.Event()
        # At most publish_window unconfirmed publishes in flight, across all concurrent publish calls.
        self._window = asyncio.Semaphore(config.bus.publish_window)
        self._connect_lock = asyncio.Lock()
        self._link: _Link | None = None  # the connection and channel (and aio-pika's channel's aiormq one)
        self._reconnecting: asyncio.Task[None] | None = None  # after the broker closed it (kept: not collected)
        self._exchange_name = config.bus.exchange
        self._ever_connected = False
        self._log = get_logger("rwatch.bus", exchange=config.bus.exchange)
        # Resources whose last publish the broker returned (no queue bound for them), since when (Unix time):
        # their watcher waits, saving nothing, until a queue is bound. /readyz shows each as route:<resource>.
        self.unrouted: dict[str, float] = {}

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.usable

    async def start(self) -> None:
        """Connect and declare the topology, retrying while the broker is unreachable (until stop)."""
        await self._ready()

    async def close(self) -> None:
        """Close the connection. A publish still retrying ends with ``Stopping``."""
        self._closed.set()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        link, self._link = self._link, None
        BUS_CONNECTED.set(0)
        if link is not None:
            link.abort()
            await close_quietly(link.connection.close(), self._close_timeout)

    # -- publishing ----------------------------------------------------------------------------------------

    async def publish(self, events: Sequence[Message]) -> None:
        if not events:
            return
        started = time.perf_counter()
        # Bodies and headers are built once per batch; only message_id changes between attempts.
        bodies = [e.to_json() for e in events]
        headers: list[dict[str, Any]] = [
            {"x-event-id": e.id, "x-resource": e.resource, "x-action": e.action} for e in events
        ]
        stamps = [datetime.fromtimestamp(e.version[0], UTC) for e in events]
        pending = list(range(len(events)))
        backoff = Backoff(self._stop, self._closed)
        while True:
            link = await self._ready()
            results = await self._publish_round(link, self._exchange_name, events, bodies, headers, stamps,
                                                pending)
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
                PUBLISH_SECONDS.observe(time.perf_counter() - started)
                return
            # Re-publish what is not confirmed, in its original order, before anything later: only messages
            # that were in flight together (at most the window) can end up reordered relative to each other
            # (e.g. #5 nacked while #6 was confirmed). That is acceptable only because every sink is
            # version-fenced (invariant 2); otherwise per-resource order holds (invariant 3).
            pending = failed
            for reason, count in reasons.items():
                PUBLISH_RETRIES.labels(reason).inc(count)
            if "connection" in reasons or "timeout" in reasons:
                await self._drop(link, "publish_failed")
            delay = backoff.next_delay()
            self._log.warning("publish_retry", pending=len(pending), reasons=dict(reasons),
                              attempt=backoff.attempt, delay=round(delay, 3), stopping=backoff.stopping)
            await backoff.pause(delay)

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

    async def _publish_round(
        self,
        link: _Link,
        exchange: str,
        events: Sequence[Message],
        bodies: list[bytes],
        headers: list[dict[str, Any]],
        stamps: list[datetime],
        pending: list[int],
    ) -> list[BaseException | None]:
        """Publish ``pending`` in order through the window; one result per launched event (None = confirmed).

        Once anything fails, the rest are held back (fewer results than ``pending``) so that the retry
        goes out first, in order. Every publish is registered on ``link`` so that losing the channel fails
        it at once (``_Link.abort``) instead of after ``publish_timeout``.
        """
        window = self._window
        state = _Round()
        tasks: list[asyncio.Task[None]] = []
        channel, inflight = link.raw, link.inflight

        def settled(task: asyncio.Task[None]) -> None:
            # A done callback, not a finally in _send: it also runs for a task cancelled before it started
            # (by abort or by a cancelled publish), which would otherwise keep its window slot forever.
            inflight.discard(task)
            if task.cancelled() or task.exception() is not None:
                state.failed = True
            window.release()

        try:
            for i in pending:
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

    # -- connection ----------------------------------------------------------------------------------------

    async def _ready(self) -> _Link:
        """The current link, connecting (with backoff, until stop) when there is none."""
        link = self._link
        if link is not None and link.usable:
            return link
        async with self._connect_lock:
            backoff = Backoff(self._stop, self._closed)
            while True:
                if self._closed.is_set():
                    raise Stopping("bus closed")
                link = self._link
                if link is not None and link.usable:
                    return link
                await self._drop(link, "channel_closed")  # a half-dead connection: channel gone, socket open
                try:
                    await self._connect()
                except TopologyConflict:
                    raise
                except _TRANSPORT_ERRORS as exc:  # TimeoutError is an OSError
                    self._log.warning("bus_connect_failed", error=repr(exc), attempt=backoff.attempt + 1,
                                      url=mask_url(self._url))
                    await backoff.pause()

    async def _connect(self) -> None:
        conn = await aio_pika.connect(
            self._url,
            timeout=self._connect_timeout,
            client_properties={"connection_name": self._connection_name},
        )
        try:
            async with asyncio.timeout(self._connect_timeout):
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                await declare_topology(channel, self._config)
                raw = await channel.get_underlay_channel()
            if not isinstance(raw, aiormq.Channel):  # pragma: no cover - aio-pika always builds on aiormq
                raise TypeError(f"unexpected channel type {type(raw).__name__}")
            if self._closed.is_set():
                raise Stopping("bus closed while connecting")
        except BaseException:
            await close_quietly(conn.close(), self._close_timeout)
            raise
        link = _Link(conn, channel, raw)
        # The aiormq channel's closing future completes whenever the channel goes, with its connection
        # too (the connection rejects its channels' futures), so this one hook covers every way to lose it.
        raw.closing.add_done_callback(link.abort)
        conn.close_callbacks.add(self._on_connection_closed)
        self._link = link
        BUS_CONNECTED.set(1)
        if self._ever_connected:
            BUS_RECONNECTS.inc()
        self._log.info("bus_connected", url=mask_url(self._url), reconnect=self._ever_connected,
                       sinks=self._config.queue_sinks)
        self._ever_connected = True

    async def _drop(self, link: _Link | None, reason: str) -> None:
        """Forget ``link`` (if it is still the current one) and close it; the next publish reconnects."""
        if link is None or link is not self._link:
            return
        self._link = None
        BUS_CONNECTED.set(0)
        conn = link.connection
        if not conn.is_closed:  # else the close callback has already logged it
            self._log.warning("bus_connection_lost", reason=reason)
        # Publishes of other rounds still in flight on it fail now, not when the close handshake is done.
        link.abort()
        await close_quietly(conn.close(), self._close_timeout)

    def _on_connection_closed(self, sender: Any, exc: BaseException | None = None, *_: Any) -> None:
        link = self._link
        if link is None or sender is not link.connection or self._closed.is_set():
            return
        # The broker or the network closed it. Reconnect now, not at the next publish: an idle watcher may not
        # publish for a long time, and meanwhile /readyz would report the broker down after it came back.
        BUS_CONNECTED.set(0)
        self._log.warning("bus_connection_lost", reason="closed", error=repr(exc))
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="bus:reconnect")

    async def _reconnect(self) -> None:
        with contextlib.suppress(Stopping, TopologyConflict):  # stopping; a conflict is reported by the next publish
            await self._ready()
