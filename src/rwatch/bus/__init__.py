"""The bus: where a watcher hands a batch of events and learns when every one of them is durable.

Two implementations behind one ``Bus`` protocol: ``AmqpBus`` (RabbitMQ, publisher confirms) and
``MemoryBus`` (in-process, "durable" means every subscribed sink applied it). ``make_bus`` picks one
from ``[bus] kind``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from rwatch.errors import Stopping
from rwatch.retry import HealthyResetWait

if TYPE_CHECKING:
    from rwatch.config import Config
    from rwatch.events import Message

__all__ = ["Backoff", "Bus", "make_bus"]


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
    # Imported here: the implementations import ``Backoff`` from this module.
    if config.bus.kind == "amqp":
        from rwatch.bus.amqp import AmqpBus

        return AmqpBus(config, stop=stop, connection_name=name)
    from rwatch.bus.memory import MemoryBus

    return MemoryBus(stop=stop)


class Backoff:
    """Pauses of 0.1 s doubling to 5 s (each drawn in [d/2, d]), ended early by any stop event.

    ``pause`` raises ``Stopping`` when a stop event is set before or during the pause, so retry loops
    unwind instead of retrying during shutdown. The delays are the CMDB backoff's (``rwatch.retry``) with
    the broker's shorter bounds; a Backoff lives for one operation, so its streak never times out.
    """

    def __init__(self, *stops: asyncio.Event, first: float = 0.1, cap: float = 5.0) -> None:
        self._stops = stops
        self._delays = HealthyResetWait(initial=first, maximum=cap, healthy_after=math.inf)

    @property
    def attempt(self) -> int:
        return self._delays.streak

    @attempt.setter
    def attempt(self, value: int) -> None:
        self._delays.streak = value

    @property
    def stopping(self) -> bool:
        return any(e.is_set() for e in self._stops)

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        return self._delays.next_delay()

    async def pause(self, delay: float | None = None) -> None:
        if self.stopping:
            raise Stopping("stop requested while retrying")
        delay = self.next_delay() if delay is None else delay
        if not self._stops:
            await asyncio.sleep(delay)
            return
        waiters = [asyncio.ensure_future(e.wait()) for e in self._stops]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self.stopping:
            raise Stopping("stop requested while retrying")
