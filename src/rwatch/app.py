"""The process: one TaskGroup owning every watcher and the HTTP server; ``run_async(stop)`` is what tests call."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from tenacity import RetryCallState, retry_if_exception_type, retry_if_not_exception_type

from rwatch import __version__
from rwatch.bus import Bus
from rwatch.bus.consumer import ConsumerGroup
from rwatch.cmdb.client import CmdbClient
from rwatch.config import Config
from rwatch.error_tap import install_error_tap
from rwatch.errors import TRANSIENT_ERRORS, ConfigError, RwatchError, Stopping
from rwatch.events import iso_utc
from rwatch.http import serve_http
from rwatch.metrics import TASK_CRASHES
from rwatch.progress import healths
from rwatch.retry import STARTUP, SUPERVISOR, log_retry, retrying
from rwatch.sinks.prom_sd import PromSdSink, sd_routes
from rwatch.status import Status
from rwatch.store.base import CursorStore, open_store
from rwatch.watch.resync import Resyncer
from rwatch.watch.verify import export_verify_metrics
from rwatch.watch.watcher import Watcher, default_owner
from rwatch.wiring import Role, wire

log = structlog.get_logger("rwatch.app")
# A dependency that is not up yet fails transiently or with its own error; a configuration error never heals.
_NOT_UP_YET = retry_if_exception_type((*TRANSIENT_ERRORS, RwatchError)) & retry_if_not_exception_type(ConfigError)


async def _until_up(what: str, connect: Callable[[], Awaitable[None]], stop: asyncio.Event) -> bool:
    """Retry a dependency's start-up until it answers; False when asked to stop first."""
    if stop.is_set():
        return False
    try:
        await retrying(STARTUP, stop=stop, retry_if=_NOT_UP_YET,
                       before_sleep=log_retry(log, "dependency_unavailable", level="error", dependency=what))(connect)
    except Stopping:
        return False
    return True


@dataclass(slots=True)
class Crash:
    """The last time a supervised task died of a bug, for ``/readyz``: a crashing task must not just vanish."""

    error: str
    count: int  # crashes in a row, without progress in between
    at: float  # monotonic time of the last crash
    since: float  # Unix time of the first crash in a row
    restart_in: float


async def supervise(name: str, start: Callable[[], Awaitable[None]], stop: asyncio.Event,
                    crashes: dict[str, Crash] | None = None,
                    progress: Callable[[], float | None] | None = None) -> None:
    """Run a task; if it dies of a bug, log it with its traceback, count it, and start it again.

    A watcher restarted this way reloads its cursor from the store, so a crash costs at most a replay. Each crash
    is kept in ``crashes`` (``/readyz`` reports a watcher's until it runs again); ``progress`` tells when the task
    last made progress (monotonic), so crashes count as "in a row" only without progress in between.
    """
    def crashed(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = round(state.next_action.sleep if state.next_action is not None else 0.0, 2)
        TASK_CRASHES.labels(name).inc()
        log.error("task_crashed", task=name, restart_in=delay, exc_info=exc)
        if crashes is not None:
            last = crashes.get(name)
            moved = progress() if progress is not None else None
            streak = last is not None and (moved is None or moved < last.at)
            crashes[name] = Crash(f"{type(exc).__name__}: {exc}", last.count + 1 if streak and last else 1,
                                  time.monotonic(), last.since if streak and last else time.time(), delay)

    if stop.is_set():
        return
    try:
        # SUPERVISOR is looked up at each call: a test puts shorter pauses in its place.
        async for attempt in retrying(SUPERVISOR, stop=stop, on=(Exception,), before_sleep=crashed):
            with attempt:
                await start()
    except Stopping:
        return
    if crashes is not None:
        crashes.pop(name, None)


async def run_async(config: Config, stop: asyncio.Event, *, role: Role = "all",
                    http_port: asyncio.Future[int] | None = None) -> None:
    """Run until ``stop`` is set, then stop cleanly: watchers finish the batch in hand and save its cursor,
    consumers finish the batch in hand and acknowledge it."""
    config.check_role(role)  # what would wedge a watcher is refused before anything starts (exit 2)
    watching, consuming = role in ("watcher", "all"), role in ("consumer", "all")
    started = time.monotonic()
    install_error_tap()  # /status lists the last error log events, start-up's included
    resources = config.watch.enabled if watching else []
    log.info("startup", version=__version__, role=role, resources=resources, bus=config.bus.kind,
             lease_ttl=config.watch.lease_ttl,
             sinks=config.enabled_sinks if consuming else [], store=config.store.url._display(),
             cmdb=config.cmdb.base_url, api=config.cmdb.api, pid=os.getpid())
    store: CursorStore = open_store(config.store.url.get_secret_value())
    # Named so an operator (or a test) can tell this process's connection apart in RabbitMQ.
    name = f"rwatch {role} {socket.gethostname()}:{os.getpid()} exchange={config.bus.exchange}"
    wired = wire(config, stop, name=name, applies=consuming)
    bus, sinks = wired.bus, wired.sinks
    owner = default_owner()  # one HA lease owner for every watcher of this process
    tasks: set[asyncio.Task[None]] = set()
    crashes: dict[str, Crash] = {}  # watchers that died of a bug, until they run again (/readyz)
    followers: dict[str, Watcher] = {}  # the current watcher of each resource (a crash replaces it)

    def alive() -> bool:
        return all(not t.done() or t.cancelled() for t in tasks) or stop.is_set()

    try:
        for sink in sinks.values():
            if not await _until_up(f"sink:{sink.name}", sink.open, stop):
                return
        wired.subscribe(stop)
        if watching and (not await _until_up("store", store.open, stop) or not await _until_up("bus", bus.start, stop)):
            return
        async with CmdbClient(config.cmdb) as client, asyncio.TaskGroup() as group:
            prom = [s for s in sinks.values() if isinstance(s, PromSdSink)]
            consumers = wired.consumers

            resyncer = Resyncer(config, client, bus, stop, store=store)  # one: its concurrency bound is for all

            async def ready() -> dict[str, dict[str, Any]]:
                return await readiness(config, bus if watching else None, store if watching else None, consumers,
                                       resyncer if watching else None, crashes=crashes, watchers=followers)

            status = Status(config, stop, role=role, owner=owner, started=started, name=f"{name} status")
            http = serve_http(config.http.listen, alive, stop, http_port, routes=sd_routes(prom), ready=ready,
                              status=status.snapshot)
            tasks.add(group.create_task(http, name="http"))
            tasks.add(group.create_task(supervise("status", status.run, stop), name="status"))
            if watching:  # the last `rwatch verify`'s result, kept in the store, as this daemon's metrics
                verified = export_verify_metrics(store, config.cmdb.tenant, stop)
                tasks.add(group.create_task(verified, name="verify_metrics"))
            for resource in resources:
                def start(resource: str = resource) -> Awaitable[None]:
                    watcher = followers[resource] = Watcher(
                        resource, settings=config.watch.resources[resource], watch=config.watch,
                        tenant=config.cmdb.tenant, client=client, bus=bus, store=store, stop=stop,
                        owner=owner, lease_ttl=config.watch.lease_ttl, resyncer=resyncer,
                        publish_grace=config.run.stop_grace,
                    )
                    return watcher.run()

                def progress(resource: str = resource) -> float | None:
                    current = followers.get(resource)
                    return current.progress_at if current is not None else None

                task_name = f"watch:{resource}"
                watch_task = supervise(task_name, start, stop, crashes, progress)
                tasks.add(group.create_task(watch_task, name=task_name))
            if consumers is not None and config.queue_sinks:
                tasks.add(group.create_task(supervise("consumers", consumers.run, stop), name="consumers"))
    finally:
        await bus.close()
        await store.close(timeout=config.run.close_timeout)
        for sink in reversed(list(sinks.values())):
            with contextlib.suppress(Exception):
                await sink.close()
        log.info("shutdown", uptime_s=round(time.monotonic() - started, 1))


async def readiness(config: Config, bus: Bus | None, store: CursorStore | None,
                    consumers: ConsumerGroup | None, resyncer: Resyncer | None = None, *,
                    crashes: Mapping[str, Crash] | None = None,
                    watchers: Mapping[str, Watcher] | None = None) -> dict[str, dict[str, Any]]:
    """The checks of ``/readyz``: broker connected, store reachable, every followed resource polled recently,
    no lag past two thirds of ``watch.retention`` (``lag:<resource>``: history is about to be lost), CMDB not
    refusing a watcher (``cmdb:<resource>``), no business hidden from the user (``hidden_businesses``), no sweep
    held by the mass-delete guard (``sweep_held:<resource>``), no resource whose events no queue receives
    (``route:<resource>``), and no watcher that died of a bug and has not run again since (``watch:<resource>``:
    a crashed watcher is out of ``rwatch.progress``, so without this it would just vanish from the other checks)."""
    checks: dict[str, dict[str, Any]] = {}
    for resource, held in sorted((resyncer.held if resyncer is not None else {}).items()):
        # Degraded: the stream flows, but a sweep waits for an operator (the mass-delete guard).
        checks[f"sweep_held:{resource}"] = {"ok": False, **held.to_dict(), "why": held.describe(),
                                            "fix": f"rwatch resync --resource {resource} --allow-mass-delete"}
    for name, crash in sorted((crashes or {}).items()):
        current = (watchers or {}).get(name.removeprefix("watch:"))
        if current is not None and current.progress_at is not None and current.progress_at > crash.at:
            continue  # restarted and past the point where it died: it runs again
        checks[name] = {
            "ok": False, "error": crash.error, "crashes": crash.count, "since": iso_utc(crash.since),
            "restart_in_s": crash.restart_in,
            "fix": "a bug: the task_crashed log line has the traceback; it is restarted with backoff"}
    unrouted: Mapping[str, float] = getattr(bus, "unrouted", None) or {}
    for resource, since in sorted(unrouted.items()):
        # The broker returns its events (mandatory): no queue is bound for them, the watcher waits, nothing saved.
        checks[f"route:{resource}"] = {
            "ok": False, "since": iso_utc(since), "routing_key": f"cmdb.{resource}.*",
            "fix": f"no queue on exchange {config.bus.exchange!r} takes cmdb.{resource}.*: start the consumers that "
                   f"declare it (bus.publish_only), or give a sink of this configuration the resource"}
    if resyncer is not None and resyncer.hidden:
        # Degraded, not down: the stream flows, but resyncs sweep nothing their listing cannot see.
        checks["hidden_businesses"] = {
            "ok": False, "count": len(resyncer.hidden), "ids": resyncer.hidden[:100],
            "why": "search_business does not list businesses the biz stream showed alive (no view rights in IAM, "
                   "or deleted while history was lost); resyncs delete nothing of them",
            "fix": f"grant user {config.cmdb.username!r} view rights on every business"}
    if bus is not None:
        checks["bus"] = {"ok": bus.connected}
    if consumers is not None and config.queue_sinks:
        checks["consumers"] = {"ok": consumers.connected}
    if store is not None:
        try:
            async with asyncio.timeout(2.0):
                await store.ping()
            checks["store"] = {"ok": True}
        except (RwatchError, TimeoutError) as exc:
            checks["store"] = {"ok": False, "error": str(exc) or "timeout"}
    limit = config.watch.retention * 2 / 3
    for health in healths():
        settings = config.watch.resources[health.resource]
        # A long-poll holds ~20 s; allow the CMDB timeout and the interval twice over before calling it stale.
        stale_after = 2 * (config.cmdb.timeout + settings.interval) + 30
        polled = health.polled_ago
        checks[f"poll:{health.resource}"] = {"ok": polled is not None and polled <= stale_after,
                                             "polled_ago_s": None if polled is None else round(polled, 1),
                                             "limit_s": stale_after}
        checks[f"lag:{health.resource}"] = {"ok": not health.retention_alarm, "lag_s": round(health.lag, 1),
                                            "limit_s": round(limit, 1)}
        if health.refused is not None:
            # CMDB refuses who we are: nothing flows until an operator acts; the check says what to do.
            checks[f"cmdb:{health.resource}"] = {"ok": False, **health.refused}
    return checks


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a pending task waits: the innermost frames of its await chain, for the ``shutdown_timeout`` log
    (what held the stop up is the first question an operator, or a failing test, asks)."""
    frames: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " < ".join(reversed(frames[-4:])) or "?"


def run(config: Config, *, role: Role = "all") -> None:
    """The blocking entry: first SIGTERM/SIGINT stops cleanly, a second one exits at once."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("shutdown_forced", signal=signal.Signals(signum).name)
                os._exit(1)
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        daemon = asyncio.create_task(run_async(config, stop, role=role), name="daemon")
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({daemon, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not daemon.done():
            limit = config.run.shutdown_timeout
            done, _ = await asyncio.wait({daemon}, timeout=limit)
            if not done:
                # What is not confirmed or acknowledged by now is replayed after the restart (invariant 6).
                log.error("shutdown_timeout", seconds=limit, pending=[
                    f"{t.get_name()} at {awaiting(t)}" for t in asyncio.all_tasks() if not t.done()][:30])
                daemon.cancel()
                await asyncio.wait({daemon}, timeout=1.0)
                os._exit(1)
        daemon.result()

    # What start-up loaded (modules, config) lives for the whole process: moving it out of the cyclic
    # collector's sight keeps full collections short on the hot path (bench: drain rate x1.2).
    gc.freeze()
    asyncio.run(main())
