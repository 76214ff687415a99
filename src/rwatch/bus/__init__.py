"""The bus: where a watcher hands a batch of events and learns when every one of them is durable.

Two implementations behind one ``Bus`` protocol: ``AmqpBus`` (RabbitMQ, publisher confirms) and
``MemoryBus`` (in-process, "durable" means every subscribed sink applied it). ``make_bus`` picks one
from ``[bus] kind``. Both retry with the ``BUS`` policy of ``rwatch.retry``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from rwatch.bus.amqp import AmqpBus
from rwatch.bus.memory import MemoryBus

if TYPE_CHECKING:
    from rwatch.config import Config
    from rwatch.events import Message

__all__ = ["Bus", "make_bus"]


class Bus(Protocol):
    async def start(self) -> None:
        """Connect and declare the topology."""

    async def publish(self, events: Sequence[Message]) -> None:
        """Return only when every event of the batch is durable; retry broker trouble until then.

        Raises ``Stopping`` when stop is requested while the publish is still failing.
        """

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool:
        """For readiness: connected and topology declared."""


def make_bus(config: Config, *, stop: asyncio.Event | None = None, name: str = "rwatch") -> Bus:
    """The bus ``[bus] kind`` names. ``stop`` ends retries with ``Stopping`` once set; ``name`` is the
    AMQP connection name operators see in RabbitMQ's connection list."""
    if config.bus.kind == "amqp":
        return AmqpBus(config, stop=stop, connection_name=name)
    return MemoryBus(stop=stop)
