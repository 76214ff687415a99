"""Consumers: queue -> batch -> ``Applier`` -> ack, and the group that runs them over one connection.

``QueueConsumer`` feeds one ``<prefix>.<sink>.<resource>`` queue to an ``Applier`` (``rwatch.sinks.applier``: retries,
the bound, isolation of poison, dead letters) and acknowledges the whole batch (``multiple``) only after it applied.
A batch whose apply crashes (``SinkCrashed``, a bug) is applied again one message at a time: each message that
applies is acknowledged alone, and the one that crashes is rejected (``basic.reject``, requeue), which every
RabbitMQ version counts against the quorum queue's ``x-delivery-limit``; innocent messages are never returned,
so never charged (closing the channel would return, and on 3.x charge, every one of them). ``ConsumerGroup``
runs every consumer of the process over one connection and starts them again when the connection is lost.

Memory bound (invariant 5): a consumer holds at most ``bus.prefetch`` unacknowledged messages (the
broker sends no more), so the process holds at most prefetch x queues messages, whatever the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError

from rwatch import metrics as m
from rwatch.bus.link import connection_gone
from rwatch.bus.topology import dead_queue_name, declare_topology, dlx_name, queue_name
from rwatch.config import Config
from rwatch.errors import TRANSIENT_ERRORS, BusError, SinkCrashed, Stopping
from rwatch.events import Message, parse_message
from rwatch.failpoints import failpoint
from rwatch.retry import BUS, HealthyResetWait, close_quietly, finish_or_abandon, log_retry, retrying
from rwatch.sinks.applier import Applier, RetryPolicy, report_crash
from rwatch.sinks.base import Sink
from rwatch.sinks.isolation import SinkHealth

log = structlog.get_logger("rwatch.consume")

# Deliveries of a burst (a watcher's batch, a backlog) follow each other well within this; a longer quiet gap
# means the stream paused, and waiting on would only delay the events in hand.
_ARRIVAL_GAP = 0.001


class QueueConsumer:
    """One ``<prefix>.<sink>.<resource>`` queue: batches of what has been delivered, up to ``batch_max`` events.

    A batch takes every message already delivered, then waits for more for at most ``batch_wait`` and only while
    they keep arriving, so a lone change is applied at once and a backlog goes in large batches.
    """

    def __init__(self, config: Config, sink: Sink, resource: str, stop: asyncio.Event,
                 health: SinkHealth | None = None) -> None:
        settings = config.sinks[sink.name]
        self.config = config
        self.sink = sink
        self.resource = resource
        self.stop = stop
        self.queue = queue_name(config, sink.name, resource)
        self.batch_max: int = getattr(settings, "batch_max", 500)
        self.batch_wait: float = getattr(settings, "batch_wait", 0.05)
        # The broker sends at most prefetch unacknowledged messages, and a batch is acknowledged only after it
        # applied: a batch holding the whole window can grow no more, and stalls the broker while it applies.
        self.batch_limit = min(self.batch_max, config.bus.prefetch)
        self.linger_limit = min(self.batch_max, max(1, config.bus.prefetch // 2))
        self.log = log.bind(sink=sink.name, resource=resource)
        self._dlx: AbstractExchange | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._applier = Applier(sink, resource, stop, self._dead_letter, RetryPolicy.of(settings), health)

    async def run(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            await channel.set_qos(prefetch_count=self.config.bus.prefetch)
            self._dlx = await channel.get_exchange(dlx_name(self.config), ensure=False)
            queue = await channel.get_queue(self.queue, ensure=False)
            # Bounded by prefetch: the broker sends no more than that many unacknowledged messages.
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            self._inbox = inbox
            await queue.consume(inbox.put, no_ack=False)
            while not self.stop.is_set():
                batch = await self._collect(inbox)
                if batch:
                    await self._handle(batch)
        except Stopping:
            pass
        finally:
            # Unacknowledged messages go back to the queue with the channel: nothing is lost, at most replayed.
            await close_quietly(channel.close(), self.config.run.close_timeout)

    async def _collect(self, inbox: asyncio.Queue[AbstractIncomingMessage]) -> list[AbstractIncomingMessage]:
        getter = asyncio.ensure_future(inbox.get())
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not getter.done():
            getter.cancel()
            return []
        batch = [getter.result()]
        self._take_ready(inbox, batch)
        # Then wait for more only while more keep arriving (a quiet gap of _ARRIVAL_GAP ends the wait: a lone
        # change is applied at once), for at most batch_wait, and only while the batch leaves the broker room in
        # the prefetch window to deliver the next one meanwhile.
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.linger_limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(inbox.get(), min(left, _ARRIVAL_GAP)))
            except TimeoutError:
                break
            self._take_ready(inbox, batch)
        return batch

    def _take_ready(self, inbox: asyncio.Queue[AbstractIncomingMessage], batch: list[AbstractIncomingMessage]) -> None:
        """Add what has already been delivered, up to the batch limit."""
        while len(batch) < self.batch_limit and not inbox.empty():
            batch.append(inbox.get_nowait())

    async def _handle(self, batch: list[AbstractIncomingMessage]) -> None:
        decoded: list[tuple[AbstractIncomingMessage, Message | None]] = []
        for message in batch:
            decoded.append((message, await self._decode(message)))

        async def more() -> list[Message]:
            """A held batch grows with what was delivered meanwhile (up to the batch limit): events that
            apply prove the sink up, so that the one that does not can be told from a sink that is down."""
            grown: list[Message] = []
            while len(batch) < self.batch_limit and not self._inbox.empty():
                message = self._inbox.get_nowait()
                batch.append(message)
                event = await self._decode(message)
                decoded.append((message, event))
                if event is not None:
                    grown.append(event)
            return grown

        try:
            await self._applier.apply([e for _, e in decoded if e is not None], more)
        except SinkCrashed as exc:
            await self._apply_one_by_one(decoded, exc)
            return
        failpoint("consume.after_apply")
        # One acknowledgement for the whole batch, after it applied: a crash before it replays the batch.
        await batch[-1].ack(multiple=True)

    async def _apply_one_by_one(self, decoded: list[tuple[AbstractIncomingMessage, Message | None]],
                                crash: SinkCrashed) -> None:
        """The batch crashed the sink (a bug): apply each message alone, acknowledge each that applies, reject
        each that crashes. ``basic.reject`` with requeue is what every RabbitMQ version counts against
        ``x-delivery-limit`` (4.3 no longer counts ``basic.nack``), so past ``bus.delivery_limit`` redeliveries
        the broker dead-letters it, and the innocent messages, acknowledged, are never charged."""
        events = [(message, event) for message, event in decoded if event is not None]
        culprits = 0
        for message, event in decoded:
            if event is None:  # already dead-lettered as undecodable
                await message.ack()
                continue
            error: SinkCrashed | None = crash if len(events) == 1 else None
            if error is None:
                try:
                    await self._applier.apply([event])
                except SinkCrashed as exc:
                    error = exc
            if error is None:
                await message.ack()
                continue
            culprits += 1
            delivery = 1 + _delivery_count(message)
            report_crash(self._applier, event, error, delivery, self.config.bus.delivery_limit)
            await message.reject(requeue=True)
        if not culprits:
            # It crashed as a batch, never alone: applied one by one, so nothing is rejected.
            self.log.error("apply_crashed", events=len(events), error=crash.message, exc_info=crash)

    async def _decode(self, message: AbstractIncomingMessage) -> Message | None:
        headers = message.headers or {}
        action = headers.get("x-action")
        try:
            event = parse_message(message.body, action if isinstance(action, str) else None)
        except ValidationError as exc:
            reason = f"not a valid rwatch event: {exc.errors()[0]['msg']}"
            await self._publish_dead(message.body, dict(message.headers or {}), reason, {})
            return None
        if event.resource != self.resource:
            await self._publish_dead(message.body, dict(message.headers or {}),
                                     f"event of {event.resource!r} in the {self.resource!r} queue", {})
            return None
        return event

    async def _dead_letter(self, event: Message, reason: str, fields: dict[str, Any]) -> None:
        headers: dict[str, Any] = {"x-event-id": event.id, "x-resource": event.resource, "x-action": event.action,
                                   "x-rwatch-attempts": int(fields.get("attempts", 1))}
        await self._publish_dead(event.to_json(), headers, reason, fields)

    async def _publish_dead(self, body: bytes, headers: dict[str, Any], reason: str,
                            fields: dict[str, Any]) -> None:
        """Into ``<prefix>.<sink>.dead`` with the reason in a header; confirmed before the batch is acked."""
        assert self._dlx is not None
        m.DEAD_LETTERS.labels(self.sink.name, self.resource).inc()
        self.log.error("event_dead_lettered", reason=reason, event_id=headers.get("x-event-id"),
                       error_type=fields.get("error_type"), attempts=headers.get("x-rwatch-attempts"))
        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={**headers, "x-rwatch-reason": reason[:1000], "x-rwatch-sink": self.sink.name,
                     "x-rwatch-queue": self.queue,
                     "x-rwatch-failed-at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                     "x-rwatch-error": orjson.dumps(fields, default=str).decode()[:2000]},
        )
        await self._dlx.publish(message, routing_key=dead_queue_name(self.config, self.sink.name),
                                mandatory=True, timeout=self.config.bus.publish_timeout)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier deliveries of this message, as the quorum queue counts them (``x-delivery-count``; absent on the
    first delivery)."""
    count = (message.headers or {}).get("x-delivery-count")
    return count if isinstance(count, int) else 0


class ConsumerGroup:
    """Every consumer of this process on one connection; a lost connection restarts them all."""

    def __init__(self, config: Config, sinks: dict[str, Sink], stop: asyncio.Event, name: str = "rwatch") -> None:
        self.config = config
        self.stop = stop
        self.name = name
        # One health per sink, shared by its queues: events another queue applies prove the sink up.
        healths = {sink: SinkHealth() for sink in config.queue_sinks}
        self.consumers = [
            QueueConsumer(config, sinks[sink], resource, stop, healths[sink])
            for sink in config.queue_sinks for resource in config.sink_resources(sink)
        ]
        self.connected = False

    async def run(self) -> None:
        """Consume until ``stop``. Then each consumer finishes and acknowledges the batch in hand, within
        ``run.stop_grace``: past it (a broker or sink that answers nothing) the rest is abandoned, and the
        broker redelivers what was not acknowledged after the restart (invariants 6 and 2)."""
        sessions = asyncio.ensure_future(self._sessions())
        if await finish_or_abandon(sessions, self.stop, self.config.run.stop_grace):
            sessions.result()
            return
        log.warning("consume_abandoned", grace=self.config.run.stop_grace)

    async def _sessions(self) -> None:
        """One session per connection, the next after a pause once it is lost, until ``stop``."""
        wait = BUS.wait()  # one streak across connects and sessions: a session that declared its topology resets it
        with contextlib.suppress(Stopping):
            async for attempt in retrying(wait, stop=self.stop):
                with attempt:
                    await self._session(wait)

    async def _session(self, wait: HealthyResetWait) -> None:
        """Connect, declare, and consume until ``stop`` (returns) or the connection is lost (``BusError``)."""
        connecting = retrying(wait, stop=self.stop, on=(*TRANSIENT_ERRORS, AMQPError),
                              before_sleep=log_retry(log, "consumer_connect_failed"))
        connection: AbstractConnection = await connecting(aio_pika.connect, self.config.bus.url.get_secret_value(),
                                      client_properties={"connection_name": self.name})
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            async with connection.channel() as channel:
                await declare_topology(channel, self.config)
            wait.streak = 0
            self.connected = True
            m.CONSUMER_CONNECTED.set(1)
            log.info("consumers_started", queues=[c.queue for c in self.consumers])
            await self._run_until_lost(connection, lost)
        except AMQPError as exc:  # aio-pika's word for broker trouble
            raise _lost(exc) from exc
        except TRANSIENT_ERRORS as exc:
            raise _lost(exc) from exc
        finally:
            self.connected = False
            m.CONSUMER_CONNECTED.set(0)
            await close_quietly(connection.close(), self.config.run.close_timeout)
        if not self.stop.is_set():
            raise BusError("consumer connection lost")  # a pause, then the next session

    async def _run_until_lost(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        tasks = [asyncio.create_task(c.run(connection), name=f"consume:{c.queue}") for c in self.consumers]
        watcher = asyncio.create_task(_first(self.stop, lost))
        try:
            done, _ = await asyncio.wait({*tasks, watcher}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not watcher and not task.cancelled() and (error := task.exception()) is not None:
                    if isinstance(error, ChannelInvalidStateError) or lost.is_set() or connection_gone(connection):
                        # The channel or the connection went while the consumer opened a channel or acknowledged;
                        # aio-pika says so with a bare RuntimeError ("... closed"), sometimes before the close
                        # callback set ``lost``. Broker trouble, not a bug: the next session.
                        raise BusError(f"channel closed under a consumer: {error!r}") from error
                    raise error
            if self.stop.is_set():
                # Let every consumer finish the batch in hand and acknowledge it.
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            watcher.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, watcher, return_exceptions=True)


def _lost(exc: BaseException) -> BusError:
    log.warning("consumer_connection_lost", error=repr(exc))
    return BusError("consumer connection lost")


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()

