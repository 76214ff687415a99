"""What ``/status`` reports: per resource where it stands and how fast it goes, per sink what waits, recent errors.

Everything comes from what the process keeps anyway (what its watchers publish in ``rwatch.progress``, the
Prometheus counters), plus two bounded things: about a minute of rate samples of its own, and the last error-level
log events (``rwatch.error_tap``). Queue depths come from the broker (passive declares on a short-lived channel),
each read cached for ``DEPTH_TTL``: a status page refreshing every 2 s never hammers the broker, and a broker that
is down costs ``/status`` at most ``BROKER_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity
from aiormq.exceptions import ChannelInvalidStateError
from prometheus_client import Counter, Gauge

from rwatch import __version__, progress
from rwatch import metrics as m
from rwatch.bus.topology import dead_queue_name, queue_name
from rwatch.config import Config
from rwatch.error_tap import iso_ms, recent_errors
from rwatch.errors import TRANSIENT_ERRORS
from rwatch.retry import sleep_or_stop
from rwatch.wiring import Role

log = structlog.get_logger("rwatch.status")

RATE_WINDOW = 60.0  # seconds the published rate is averaged over
SAMPLE_EVERY = 5.0  # one sample of the published counters this often: RATE_WINDOW / SAMPLE_EVERY + 1 kept
DEPTH_TTL = 5.0  # one read of the queue depths answers every /status within this
DEPTH_REFRESH_EVERY = 15.0  # keeps rwatch_queue_depth current while consumers run, even when nobody asks
BROKER_TIMEOUT = 2.0  # connect and every declare: /status answers within this when the broker does not
# RuntimeError: aio-pika's "<Connection ...> closed" when the broker closed the connection under us before
# is_closed says so (found by the chaos suite: it crashed the status task).
_BROKER_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, aio_pika.exceptions.AMQPError,
                                               ChannelInvalidStateError, RuntimeError)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# --- counters and rates -----------------------------------------------------------------------------------


def _sums(metric: Counter | Gauge, *labels: str) -> dict[tuple[str, ...], float]:
    """The metric's values summed by ``labels`` (over every other label), read through its public collect()."""
    sums: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = tuple(sample.labels[label] for label in labels)
            sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def _by_first(sums: dict[tuple[str, ...], float]) -> dict[str, float]:
    return {key[0]: value for key, value in sums.items()}


class Rates:
    """Events per second per resource over about ``window`` seconds, from samples of the counters taken every
    ``every`` seconds; at most ``window / every + 1`` samples are kept."""

    def __init__(self, clock: Callable[[], float], window: float = RATE_WINDOW, every: float = SAMPLE_EVERY) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=int(window / every) + 1)

    def sample(self, totals: dict[str, float]) -> None:
        self._samples.append((self._clock(), dict(totals)))

    def per_second(self, totals: dict[str, float]) -> dict[str, float] | None:
        """Since the oldest sample kept; None until a second has passed (a rate over less would be noise)."""
        if not self._samples:
            return None
        then, before = self._samples[0]
        elapsed = self._clock() - then
        if elapsed < 1.0:
            return None
        return {key: round(max(0.0, n - before.get(key, 0.0)) / elapsed, 2) for key, n in totals.items()}


# --- queue depths -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Depths:
    queues: dict[str, int | None] | None  # queue -> ready messages (None: no such queue); None: broker unreadable
    error: str | None
    read_at: float  # monotonic


class QueueDepths:
    """Ready-message counts of queues, read by passive declares over a connection of its own (opened on first use,
    and again after a failure) on a channel that lives for one read. A read serves every caller for ``ttl``, a
    failed one too: however often ``/status`` is asked, the broker sees at most one round per ``ttl``."""

    def __init__(self, url: str, stop: asyncio.Event, *, name: str = "rwatch status", ttl: float = DEPTH_TTL,
                 timeout: float = BROKER_TIMEOUT, clock: Callable[[], float] = time.monotonic) -> None:
        self._url = url
        self._stop = stop
        self._name = name
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self._connection: AbstractConnection | None = None
        self._last: Depths | None = None

    async def read(self, queues: Sequence[str]) -> Depths:
        async with self._lock:
            last = self._last
            if last is not None and self._clock() - last.read_at < self._ttl:
                return last
            if self._stop.is_set():  # no new connection while the process shuts down
                return last or Depths(None, "stopping", self._clock())
            try:
                async with asyncio.timeout(self._timeout):
                    depths = Depths(await self._count(queues), None, self._clock())
            except _BROKER_ERRORS as exc:
                await self.close()
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if last is None or last.error is None:  # once per outage, not at every refresh
                    log.warning("queue_depth_failed", error=error)
                depths = Depths(None, error, self._clock())
            self._last = depths
            return depths

    async def _count(self, queues: Sequence[str]) -> dict[str, int | None]:
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self._url, timeout=self._timeout,
                                                      client_properties={"connection_name": self._name})
        counts: dict[str, int | None] = {}
        channel: AbstractChannel | None = None
        try:
            for queue in queues:
                if channel is None:
                    channel = await self._connection.channel(publisher_confirms=False)
                try:
                    declared = await channel.declare_queue(queue, passive=True, timeout=self._timeout)
                except ChannelNotFoundEntity:
                    # Not declared yet (no consumer started): the broker closed the channel, the next one is new.
                    counts[queue] = None
                    closed, channel = channel, None
                    with contextlib.suppress(*_BROKER_ERRORS):
                        await closed.close()  # settles aio-pika's side of it
                    continue
                counts[queue] = int(declared.declaration_result.message_count or 0)
        finally:
            if channel is not None:
                with contextlib.suppress(*_BROKER_ERRORS):
                    await asyncio.wait_for(channel.close(), self._timeout)
        return counts

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await asyncio.wait_for(connection.close(), self._timeout)


# --- the document ------------------------------------------------------------------------------------------


class Status:
    """The ``/status`` document of one ``run_async``: ``snapshot()`` answers it; ``run()`` takes the rate samples
    and, while consumers run on the broker, keeps ``rwatch_queue_depth`` fresh."""

    def __init__(self, config: Config, stop: asyncio.Event, *, role: Role, owner: str, started: float | None = None,
                 name: str = "rwatch status", every: float = SAMPLE_EVERY,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.stop = stop
        self.role = role
        self.owner = owner  # the lease owner of this process's watchers: "leader" means one of them follows
        self._clock = clock
        self._every = every
        self._started = clock() if started is None else started
        self._started_wall = wall() - (clock() - self._started)
        self.resources = config.watch.enabled if role in ("watcher", "all") else []
        self.sinks = config.enabled_sinks if role in ("consumer", "all") else []
        self.depths = (QueueDepths(config.bus.url.get_secret_value(), stop, name=name, clock=clock)
                       if config.bus.kind == "amqp" and self.sinks else None)
        self.rates = Rates(clock, every=every)
        self.rates.sample(self._published())

    @staticmethod
    def _published() -> dict[str, float]:
        return _by_first(_sums(m.EVENTS_PUBLISHED, "resource"))

    async def snapshot(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "role": self.role,
            "started_at": iso_ms(self._started_wall),
            "uptime_s": round(self._clock() - self._started, 1),
            "resources": self.resource_rows(),
            "sinks": await self.sink_rows(),
            "recent_errors": recent_errors(),
        }

    def resource_rows(self) -> list[dict[str, Any]]:
        received = _by_first(_sums(m.EVENTS_RECEIVED, "resource"))
        published = self._published()
        rates = self.rates.per_second(published)
        gaps = _by_first(_sums(m.GAPS_OPEN, "resource"))
        # Only this process's watchers, and only during a term: a watcher publishes its state while it holds the lease
        mine = {s.resource: s for s in progress.states() if s.owner == self.owner}
        rows = []
        for resource in self.resources:
            state = mine.get(resource)
            health = state.health() if state is not None else None
            rows.append({
                "resource": resource,
                "mode": state.mode if state is not None else None,
                "leader": state is not None,
                "cursor": state.cursor if state is not None else None,
                "lag_s": _round(health.lag) if health is not None else None,
                "cursor_age_s": _round(health.cursor_age) if health is not None else None,
                "polled_ago_s": _round(health.polled_ago) if health is not None else None,
                "retention_alarm": health.retention_alarm if health is not None else False,
                "events_received": int(received.get(resource, 0)),
                "events_published": int(published.get(resource, 0)),
                "rate_per_s": rates.get(resource, 0.0) if rates is not None else None,
                # The gauge is the leader's: a standby's value would be the last term's, stale.
                "gaps_open": int(gaps[resource]) if state is not None and resource in gaps else None,
                # While CMDB refuses this watcher: reason, code and the fix (also /readyz's cmdb:<resource>).
                "refused": health.refused if health is not None else None,
            })
        return rows

    async def sink_rows(self) -> list[dict[str, Any]]:
        applied = _by_first(_sums(m.EVENTS_APPLIED, "sink"))
        dead = _by_first(_sums(m.DEAD_LETTERS, "sink"))
        read = await self.read_depths()
        rows = []
        for sink in self.sinks:
            queue_depth, dead_depth, error = read.get(sink, ({}, None, None))
            rows.append({
                "sink": sink,
                "kind": self.config.sinks[sink].kind,
                "resources": self.config.sink_resources(sink),
                "queue_depth": queue_depth,
                "dead_queue_depth": dead_depth,
                "queue_error": error,
                "applied": int(applied.get(sink, 0)),
                "dead": int(dead.get(sink, 0)),
            })
        return rows

    async def read_depths(self) -> dict[str, tuple[dict[str, int | None] | None, int | None, str | None]]:
        """Per queue sink: depth per resource (None when the broker could not be read), dead-letter queue depth,
        and the error; ``rwatch_queue_depth`` follows what was read."""
        config = self.config
        queue_sinks = [s for s in self.sinks if s in config.queue_sinks]
        result: dict[str, tuple[dict[str, int | None] | None, int | None, str | None]] = {}
        if self.depths is None:
            # The memory bus hands each batch to the sinks directly: nothing ever waits in a queue.
            for sink in queue_sinks:
                result[sink] = ({r: 0 for r in config.sink_resources(sink)}, None, None)
        else:
            names = [queue_name(config, s, r) for s in queue_sinks for r in config.sink_resources(s)]
            names += [dead_queue_name(config, s) for s in queue_sinks]
            read = await self.depths.read(names)
            for sink in queue_sinks:
                if read.queues is None:
                    result[sink] = (None, None, read.error)
                    continue
                per_resource = {r: read.queues.get(queue_name(config, sink, r)) for r in config.sink_resources(sink)}
                result[sink] = (per_resource, read.queues.get(dead_queue_name(config, sink)), None)
        for sink, (depths, _, _) in result.items():
            for resource in config.sink_resources(sink):
                depth = depths.get(resource) if depths is not None else None
                if depth is None:
                    with contextlib.suppress(KeyError):  # unknown now: no stale value on the dashboards
                        m.QUEUE_DEPTH.remove(sink, resource)
                else:
                    m.QUEUE_DEPTH.labels(sink, resource).set(depth)
        return result

    async def run(self) -> None:
        """Until ``stop``: sample the published counters every ``every`` seconds and, with queues on the broker,
        read their depths every ``DEPTH_REFRESH_EVERY``."""
        last_depths = float("-inf")
        try:
            while not await sleep_or_stop(self._every, self.stop):
                self.rates.sample(self._published())
                if self.depths is not None and self._clock() - last_depths >= DEPTH_REFRESH_EVERY:
                    last_depths = self._clock()
                    await self.read_depths()
        finally:
            if self.depths is not None:
                await self.depths.close()
