"""The wiring: the bus, the sinks and the subscriptions that join them, built from a ``Config`` for the daemon and
the commands alike.

Nothing below this module builds a bus or a sink: the watcher, the resyncer and the sinks are handed what they
use, so the code that follows an event from CMDB to a sink never reaches back up to choose its neighbours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from rwatch.bus import Bus, make_bus
from rwatch.bus.consumer import ConsumerGroup
from rwatch.bus.memory import MemoryBus
from rwatch.config import Config, ProjectionSinkConfig
from rwatch.events import Message
from rwatch.metrics import DEAD_LETTERS
from rwatch.sinks.applier import Applier, RetryPolicy, apply_counting_crashes
from rwatch.sinks.base import Sink
from rwatch.sinks.isolation import SinkHealth
from rwatch.sinks.registry import make_sink

# What one ``rwatch run`` process does: follow CMDB (watcher), apply to the sinks (consumer), or both.
Role = Literal["watcher", "consumer", "all"]
log = structlog.get_logger("rwatch.app")  # event_dead_lettered keeps the logger name it always had


@dataclass(slots=True)
class Wiring:
    """One process's bus and sinks, and how events reach the sinks: in-process subscriptions on the memory bus,
    queue consumers on the broker (``consumers``), or neither where this process only publishes."""

    config: Config
    bus: Bus
    sinks: dict[str, Sink]
    consumers: ConsumerGroup | None
    applies: bool  # this process applies the events to its sinks

    def subscribe(self, stop: asyncio.Event) -> None:
        """With the memory bus, hand every batch to the sinks in-process (once they are open, before the bus
        starts); with the broker, ``consumers`` do it when run."""
        if self.applies and isinstance(self.bus, MemoryBus):
            subscribe_sinks(self.bus, self.config, self.sinks, stop)


def wire(config: Config, stop: asyncio.Event, *, name: str, applies: bool) -> Wiring:
    """The bus ``[bus] kind`` names (``name``: its connection's, as operators see it in RabbitMQ), and with
    ``applies`` every enabled sink and, on the broker, the consumers that feed them."""
    bus = make_bus(config, stop=stop, name=name)
    sinks = make_sinks(config) if applies else {}
    memory = isinstance(bus, MemoryBus)
    consumers = ConsumerGroup(config, sinks, stop, name=name) if applies and not memory else None
    return Wiring(config, bus, sinks, consumers, applies)


def make_sinks(config: Config) -> dict[str, Sink]:
    """Every enabled sink, mirrors first: a projection (prom_sd, zabbix, ansible_inventory) is built on its mirror."""
    order = sorted(config.enabled_sinks, key=lambda n: isinstance(config.sinks[n], ProjectionSinkConfig))
    sinks: dict[str, Sink] = {}
    for sink_name in order:
        sinks[sink_name] = make_sink(sink_name, config, sinks)
    return sinks


def subscribe_sinks(bus: MemoryBus, config: Config, sinks: dict[str, Sink], stop: asyncio.Event) -> None:
    """With the memory bus, a batch is durable once every sink applied it: the watcher then saves its cursor.

    The same rules as a queue's consumer: each sink's bound and isolation of poison, and a message that crashes
    its sink dead-lettered after ``bus.delivery_limit`` more attempts (there is no broker to count them)."""

    for sink_name in config.queue_sinks:

        async def dead_letter(event: Message, reason: str, fields: dict[str, object], sink: str = sink_name) -> None:
            # No broker, no dead-letter queue: the refused event is logged whole, so nothing vanishes unseen. (Not
            # as ``event``: that is the log line's own name, and passing it again raised TypeError instead.)
            DEAD_LETTERS.labels(sink, event.resource).inc()
            log.error("event_dead_lettered", **{**fields, "sink": sink, "reason": reason, "event_id": event.id,
                                                "payload": event.to_dict()})

        policy, health = RetryPolicy.of(config.sinks[sink_name]), SinkHealth()
        appliers = {
            resource: Applier(sinks[sink_name], resource, stop, dead_letter, policy, health)
            for resource in config.sink_resources(sink_name)
        }

        async def handler(events: Sequence[Message], appliers: dict[str, Applier] = appliers) -> None:
            await apply_counting_crashes(appliers[events[0].resource], events, config.bus.delivery_limit)

        bus.subscribe(sink_name, appliers, handler)
