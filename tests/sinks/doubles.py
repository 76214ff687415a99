"""Doubles for the applier's and the consumers' tests: a recording sink, events and marks, dead-letter recorders,
and a fixture that makes the applier's backoff fast."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY

from rwatch.errors import SinkUnavailable
from rwatch.events import Event, Message, ResyncMark, iso_utc, resync_event_id, watch_event_id
from rwatch.sinks import applier as applier_module
from rwatch.sinks.applier import RetryPolicy


def event(i: int, resource: str = "host", key: str | None = None) -> Event:
    cursor = f"cursor-{i}"
    return Event(id=watch_event_id(resource, cursor), resource=resource, action="update", key=key or str(i % 7),
                 version=(1_700_000_000 + i, 0), occurred_at=iso_utc(1_700_000_000 + i),
                 observed_at=iso_utc(1_700_000_000 + i), cursor=cursor, data={"n": i})


class RecordingSink:
    """Records what it applied; ``refuse`` decides, per batch, what to refuse or when to fail."""

    def __init__(self) -> None:
        self.name = "rec"
        self.batches: list[list[Event]] = []
        self.refuse: Callable[[Sequence[Event]], None] = lambda events: None
        self.on_sweep: Callable[[ResyncMark], int] = lambda mark: 0  # the number swept, or raises
        self.calls: list[tuple[str, list[str]]] = []  # ("apply", ids) and ("sweep", [mark id]), in order
        self.changed = asyncio.Event()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, events: Sequence[Event]) -> None:
        assert all(isinstance(e, Event) for e in events), "a mark must never reach apply"
        self.refuse(events)
        self.batches.append(list(events))
        self.calls.append(("apply", [e.id for e in events]))
        self.changed.set()

    async def sweep(self, mark: ResyncMark) -> int:
        swept = self.on_sweep(mark)
        self.calls.append(("sweep", [mark.id]))
        self.changed.set()
        return swept

    @property
    def applied(self) -> list[Event]:
        return [e for batch in self.batches for e in batch]

    async def wait(self, done: Callable[[], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    original = applier_module.HealthyResetWait
    monkeypatch.setattr(applier_module, "HealthyResetWait",
                        lambda **_: original(initial=0.01, maximum=0.05))


def mark(resource: str = "host", resync_id: str = "r1", i: int = 500) -> ResyncMark:
    version = (1_700_000_000 + i, 0)
    return ResyncMark(id=resync_event_id(resource, f"mark:{resync_id}", version), resource=resource, version=version,
                      resync_id=resync_id, listed=3, started_at=iso_utc(1_700_000_000),
                      observed_at=iso_utc(1_700_000_000 + i))


class DeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[Message, str, dict[str, Any]]] = []

    async def __call__(self, message: Message, reason: str, fields: dict[str, Any]) -> None:
        self.letters.append((message, reason, fields))


def swept_total(resource: str = "host", sink: str = "rec") -> float:
    return REGISTRY.get_sample_value("rwatch_resync_swept_total", {"sink": sink, "resource": resource}) or 0.0


def ids(*messages: Message) -> list[str]:
    return [m.id for m in messages]


def policy(max_attempts: int = 3, retry_timeout: float = 3600.0) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, retry_timeout=retry_timeout, retry_backoff=0.001,
                       retry_backoff_max=0.005)


def isolations(outcome: str, resource: str = "host") -> float:
    return REGISTRY.get_sample_value("rwatch_apply_isolations_total",
                                     {"sink": "rec", "resource": resource, "outcome": outcome}) or 0.0


class Timeline(DeadLetters):
    """Dead letters recorded into the sink's call log, so a test sees what came before what."""

    def __init__(self, sink: RecordingSink) -> None:
        super().__init__()
        self.sink = sink

    async def __call__(self, message: Message, reason: str, fields: dict[str, Any]) -> None:
        await super().__call__(message, reason, fields)
        self.sink.calls.append(("dead", [message.id]))


def failing_with(sink: RecordingSink, *poison: Event,
                 down: Callable[[], bool] = lambda: False) -> Callable[[Sequence[Event]], None]:
    """A sink that fails transiently for any batch holding a poison event (for ever), or for all while ``down``.
    Every attempt wakes ``sink.wait``."""
    bad = {e.id for e in poison}

    def refuse(events: Sequence[Event]) -> None:
        sink.changed.set()
        if down() or bad & {e.id for e in events}:
            raise SinkUnavailable("HTTP 500 Internal Server Error", status=500)

    return refuse


def applied_ids(sink: RecordingSink) -> list[str]:
    return [i for kind, batch in sink.calls if kind == "apply" for i in batch]
