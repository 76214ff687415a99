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
from rwatch.events import Event
from rwatch.logs import get_logger
from rwatch.metrics import BUS_CONNECTED, BUS_RECONNECTS, EVENTS_PUBLISHED, PUBLISH_RETRIES, PUBLISH_SECONDS

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


def _count_published(events: Sequence[Event], confirmed: list[int]) -> None:
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
        # out of gather): the client library gave up on it, e.g. while tearing down a channel.
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
        self._stop = stop if stop is not None else asyncio.Event()
        self._closed = asyncio.Event()
        # At most publish_window unconfirmed publishes in flight, across all concurrent publish calls.
        self._window = asyncio.Semaphore(config.bus.publish_window)
        self._connect_lock = asyncio.Lock()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._raw: aiormq.Channel | None = None  # the channel under aio-pika's, for publishing
        self._exchange_name = config.bus.exchange
        self._ever_connected = False
        self._log = get_logger("rwatch.bus", exchange=config.bus.exchange)

    @property
    def connected(self) -> bool:
        conn, channel = self._connection, self._channel
        return conn is not None and channel is not None and not conn.is_closed and not channel.is_closed

    async def start(self) -> None:
        """Connect and declare the topology, retrying while the broker is unreachable (until stop)."""
        await self._ready()

    async def close(self) -> None:
        """Close the connection. A publish still retrying ends with ``Stopping``."""
        self._closed.set()
        conn = self._connection
        self._connection = self._channel = self._raw = None
        BUS_CONNECTED.set(0)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    # -- publishing ----------------------------------------------------------------------------------------

    async def publish(self, events: Sequence[Event]) -> None:
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
            channel, conn = await self._ready()
            results = await self._publish_round(channel, self._exchange_name, events, bodies, headers, stamps,
                                                pending)
            failed: list[int] = []
            confirmed: list[int] = []
            reasons: Counter[str] = Counter()
            bug: BaseException | None = None
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
            _count_published(events, confirmed)
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
                await self._drop(conn, "publish_failed")
            delay = backoff.next_delay()
            self._log.warning("publish_retry", pending=len(pending), reasons=dict(reasons),
                              attempt=backoff.attempt, delay=round(delay, 3), stopping=backoff.stopping)
            await backoff.pause(delay)

    async def _publish_round(
        self,
        channel: aiormq.Channel,
        exchange: str,
        events: Sequence[Event],
        bodies: list[bytes],
        headers: list[dict[str, Any]],
        stamps: list[datetime],
        pending: list[int],
    ) -> list[BaseException | None]:
        """Publish ``pending`` in order through the window; one result per launched event (None = confirmed).

        Once anything fails, the rest are held back (fewer results than ``pending``) so that the retry
        goes out first, in order.
        """
        window = self._window
        state = _Round()
        tasks: list[asyncio.Task[None]] = []
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
                send = self._send(channel, exchange, bodies[i], properties, events[i].routing_key, state)
                tasks.append(asyncio.create_task(send))
            return await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _send(self, channel: aiormq.Channel, exchange: str, body: bytes,
                    properties: aiormq.spec.Basic.Properties, routing_key: str, state: _Round) -> None:
        try:
            if channel.is_closed:
                raise ChannelInvalidStateError("channel closed")
            # aiormq's basic_publish straight, as aio-pika's Exchange.publish does, minus the per-message
            # Message object and the wait for the socket write (wait=False): the broker's confirm is what
            # we wait for. This is most of the client-side cost per message.
            result = await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                                 properties=properties, mandatory=True, timeout=self._timeout,
                                                 wait=False)
        except BaseException:
            state.failed = True
            raise
        finally:
            self._window.release()
        if type(result) is not _ACK:
            # With on_return_raises a return raises PublishError; this guards the other path (a returned
            # DeliveredMessage as the result): it is never durable.
            state.failed = True
            raise MessageReturned("the broker returned the message", routing_key=routing_key)

    # -- connection ----------------------------------------------------------------------------------------

    async def _ready(self) -> tuple[aiormq.Channel, AbstractConnection]:
        """The current channel and connection, connecting (with backoff, until stop) when there is none."""
        raw, conn = self._raw, self._connection
        if raw is not None and conn is not None and self.connected:
            return raw, conn
        async with self._connect_lock:
            backoff = Backoff(self._stop, self._closed)
            while True:
                if self._closed.is_set():
                    raise Stopping("bus closed")
                raw, conn = self._raw, self._connection
                if raw is not None and conn is not None and self.connected:
                    return raw, conn
                await self._drop(conn, "channel_closed")  # a half-dead connection: channel gone, socket open
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
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
            raise
        conn.close_callbacks.add(self._on_connection_closed)
        self._connection, self._channel, self._raw = conn, channel, raw
        BUS_CONNECTED.set(1)
        if self._ever_connected:
            BUS_RECONNECTS.inc()
        self._log.info("bus_connected", url=mask_url(self._url), reconnect=self._ever_connected,
                       sinks=self._config.queue_sinks)
        self._ever_connected = True

    async def _drop(self, conn: AbstractConnection | None, reason: str) -> None:
        """Forget ``conn`` (if it is still the current one) and close it; the next publish reconnects."""
        if conn is None or conn is not self._connection:
            return
        self._connection = self._channel = self._raw = None
        BUS_CONNECTED.set(0)
        if not conn.is_closed:  # else the close callback has already logged it
            self._log.warning("bus_connection_lost", reason=reason)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)

    def _on_connection_closed(self, sender: Any, exc: BaseException | None = None, *_: Any) -> None:
        if sender is not self._connection or self._closed.is_set():
            return
        # The broker or the network closed it; the next publish (or the current one's retry) reconnects.
        BUS_CONNECTED.set(0)
        self._log.warning("bus_connection_lost", reason="closed", error=repr(exc))
