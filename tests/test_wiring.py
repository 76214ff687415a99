"""The wiring: which bus, sinks and subscriptions a Config gives a process, and the memory bus's dead letters."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

from rwatch.bus.memory import MemoryBus
from rwatch.config import Config
from rwatch.wiring import wire


def test_a_process_that_applies_gets_every_sink_and_on_the_broker_its_consumers() -> None:
    sinks = {"rec": {"kind": "jsonl", "resources": ["host"]}}
    memory = Config.model_validate({"bus": {"kind": "memory"}, "sinks": sinks})
    wired = wire(memory, asyncio.Event(), name="t", applies=True)
    assert isinstance(wired.bus, MemoryBus) and list(wired.sinks) == ["rec"] and wired.consumers is None

    broker = Config.model_validate({"sinks": sinks})
    wired = wire(broker, asyncio.Event(), name="t", applies=True)
    assert list(wired.sinks) == ["rec"] and wired.consumers is not None
    # A command that only publishes (rwatch resync on the broker): the daemon's consumers apply.
    wired = wire(broker, asyncio.Event(), name="t", applies=False)
    assert wired.sinks == {} and wired.consumers is None


async def test_memory_bus_logs_a_refused_event_whole_as_event_dead_lettered() -> None:
    """No dead-letter queue on the memory bus: the log line is where a refused event goes, so it must be written
    (passing the event as ``event=`` collided with the line's own name and raised TypeError instead)."""
    from rwatch.bus.memory import MemoryBus
    from rwatch.config import Config
    from rwatch.errors import SinkRejected
    from rwatch.events import Event, Message, ResyncMark, iso_utc, watch_event_id
    from rwatch.logs import setup_logging
    from rwatch.wiring import subscribe_sinks

    class Refusing:
        name = "rec"

        async def apply(self, events: list[Event]) -> None:
            raise SinkRejected("422 from the endpoint", event_ids=tuple(e.id for e in events), status=422)

        async def sweep(self, mark: ResyncMark) -> int:
            return 0

    config = Config.model_validate({"bus": {"kind": "memory"},
                                    "sinks": {"rec": {"kind": "jsonl", "resources": ["host"]}}})
    bus = MemoryBus()
    subscribe_sinks(bus, config, {"rec": Refusing()}, asyncio.Event())  # type: ignore[dict-item]
    await bus.start()
    refused: Message = Event(id=watch_event_id("host", "c1"), resource="host", action="update", key="1",
                             version=(1_700_000_000, 0), occurred_at=iso_utc(1_700_000_000),
                             observed_at=iso_utc(1_700_000_000), cursor="c1", data={"bk_host_id": 1})
    # Through the stdlib, as `rwatch run` logs: structlog's capture_logs misses loggers an earlier test cached.
    setup_logging("info", "json", io.StringIO())
    records: list[dict[str, Any]] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.msg) if isinstance(record.msg, dict) else None  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        await bus.publish([refused])
    finally:
        logging.getLogger().removeHandler(handler)
    [line] = [e for e in records if e["event"] == "event_dead_lettered"]
    assert line["payload"] == refused.to_dict() and line["event_id"] == refused.id
    assert line["reason"] == "422 from the endpoint" and line["sink"] == "rec"
