"""Dead letters: what sinks refused for good, kept in ``<prefix>.<sink>.dead``, listed and replayed.

Listing takes messages without acknowledging them and closes the channel, so the broker puts them all
back. Replay moves the chosen ones to their sink's queue (publisher confirm first, acknowledgement
after: a crash in between leaves a copy in both places, never in neither).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from rwatch.bus.topology import dead_queue_name, declare_topology, queue_name
from rwatch.config import Config


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sink: str
    event_id: str
    resource: str
    action: str
    reason: str
    failed_at: str
    queue: str
    attempts: int | None = None  # failed attempts (deliveries, for the broker's delivery limit); None: unknown

    @classmethod
    def of(cls, sink: str, message: AbstractIncomingMessage, delivery_limit: int | None = None) -> DeadLetter:
        h: dict[str, Any] = dict(message.headers or {})
        death = _broker_death(h)
        attempts = h.get("x-rwatch-attempts")
        if not isinstance(attempts, int) and death.get("reason") == "delivery_limit" and delivery_limit is not None:
            # The quorum queue dead-letters a message returned more than x-delivery-limit times: it was
            # delivered delivery_limit + 1 times (checked on RabbitMQ 3.10; 4.x documents the same).
            attempts = delivery_limit + 1
        failed_at = h.get("x-rwatch-failed-at") or _iso(death.get("time"))
        return cls(sink, str(h.get("x-event-id", "")), str(h.get("x-resource", "")), str(h.get("x-action", "")),
                   str(h.get("x-rwatch-reason") or _broker_reason(death)), str(failed_at or ""),
                   str(h.get("x-rwatch-queue") or death.get("queue") or ""),
                   attempts if isinstance(attempts, int) else None)


def _broker_death(headers: dict[str, Any]) -> dict[str, Any]:
    """The newest ``x-death`` entry: set when the broker itself dead-lettered the message."""
    deaths = headers.get("x-death") or []
    return deaths[0] if deaths and isinstance(deaths[0], dict) else {}


def _broker_reason(death: dict[str, Any]) -> str:
    """Dead-lettered by the broker itself (e.g. past x-delivery-limit): its x-death says why."""
    return f"broker: {death.get('reason', 'unknown')}" if death else "unknown"


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return None


@contextlib.asynccontextmanager
async def _channel(config: Config) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(config.bus.url.get_secret_value(),
                                        client_properties={"connection_name": "rwatch dlq"})
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_topology(channel, config)
        yield channel
    finally:
        await connection.close()


def _sinks(config: Config, sink: str | None) -> list[str]:
    if sink is None:
        return config.queue_sinks
    if sink not in config.queue_sinks:
        raise ValueError(f"{sink!r} is not an enabled sink with queues (those are: {', '.join(config.queue_sinks)})")
    return [sink]


async def list_dead(config: Config, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]:
    found: list[DeadLetter] = []
    for name in _sinks(config, sink):
        async with _channel(config) as channel:
            queue = await channel.get_queue(dead_queue_name(config, name), ensure=False)
            # Taken without acknowledging; closing the channel hands every one back to the queue.
            while len(found) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                found.append(DeadLetter.of(name, message, config.bus.delivery_limit))
    return found


async def replay(config: Config, sink: str | None = None, resource: str | None = None) -> int:
    """Move dead letters (of one sink, of one resource) back to their sink's queue; returns how many."""
    moved = 0
    for name in _sinks(config, sink):
        async with _channel(config) as channel:
            queue = await channel.get_queue(dead_queue_name(config, name), ensure=False)
            declared = await channel.declare_queue(dead_queue_name(config, name), passive=True)
            pending = declared.declaration_result.message_count or 0
            for _ in range(pending):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                letter = DeadLetter.of(name, message)
                if resource is not None and letter.resource != resource:
                    continue  # left unacknowledged: back in the dead queue when the channel closes
                if letter.resource not in config.sink_resources(name):
                    continue  # its queue is no longer configured: leave it where it is
                headers = {k: v for k, v in (message.headers or {}).items() if not str(k).startswith("x-rwatch-")}
                headers["x-rwatch-replayed"] = True
                await channel.default_exchange.publish(
                    aio_pika.Message(message.body, content_type="application/json", headers=headers,
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue_name(config, name, letter.resource), mandatory=True,
                    timeout=config.bus.publish_timeout,
                )
                await message.ack()
                moved += 1
    return moved
