"""The broker's names and declarations: the events exchange, each sink's quorum queues, and the dead letters.

``<exchange>`` (topic) routes ``cmdb.<resource>.<action>`` to ``<prefix>.<sink>.<resource>`` queues; a queue's
dead letters go through ``<prefix>.dlx`` (direct) to ``<prefix>.<sink>.dead``. The publisher, the consumers and
the dead-letter tools all declare this one topology, with the same arguments.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any, TypeVar

from aio_pika.abc import AbstractChannel, AbstractExchange, ExchangeType
from aiormq.exceptions import ChannelPreconditionFailed

from rwatch.config import Config
from rwatch.errors import TopologyConflict

T = TypeVar("T")

_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']+)'")

DEAD_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


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
