"""The work of ``rwatch resync`` and ``rwatch verify``: wire a bus and sinks, check CMDB answers, resync or compare.

Beside (or without) a running daemon: with ``bus.kind = "memory"`` the sinks are built here and applied
in-process; with AMQP the daemon's consumers apply what is published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Final

import structlog
from tenacity import RetryError, retry_if_exception, wait_exponential

from rwatch.bus import Bus
from rwatch.bus.memory import MemoryBus
from rwatch.cmdb.client import CmdbClient
from rwatch.config import Config
from rwatch.errors import TRANSIENT_ERRORS, CmdbError, CmdbRefused, CmdbTransientError, RwatchError, Stopping
from rwatch.retry import LIST, retrying
from rwatch.sinks.base import Sink
from rwatch.sinks.mirror import MirrorSink
from rwatch.store.base import open_store
from rwatch.watch.resync import Resyncer, ResyncResult, fill_gaps
from rwatch.watch.snapshot import Progress
from rwatch.watch.verify import VerifyReport, choose, mirror_settings, remember, verify_pass
from rwatch.wiring import wire

log = structlog.get_logger("rwatch.resync")

PROBE_ATTEMPTS: Final = 4


def _passing(exc: BaseException) -> bool:
    """A rate limit or a backend hiccup (the gateway's, at any HTTP status) is not "unreachable"."""
    return isinstance(exc, CmdbTransientError) and exc.extra.get("reason") not in ("connection", "timeout")


async def probe(client: CmdbClient, config: Config, resources: Sequence[str]) -> None:
    """One request before a command starts: listing retries transient errors for ever (right for the daemon),
    so a command must find an unreachable CMDB here, once, and say so."""
    if not resources:
        return
    settings = config.watch.resources[resources[0]]
    # 0.5 s, 1 s, 2 s between the attempts, without jitter: one command, no storm to spread.
    ask = retrying(wait_exponential(multiplier=0.5), stop=None, retry_if=retry_if_exception(_passing),
                   attempts=PROBE_ATTEMPTS)
    try:
        await ask(client.watch, resources[0], fields=settings.fields, event_types=settings.event_types,
                  sub_resource=settings.sub_resource)
    except Exception as exc:
        if not isinstance(exc, (*TRANSIENT_ERRORS, CmdbError)):
            raise
        reason = exc.message if isinstance(exc, RwatchError) else repr(exc)
        if isinstance(exc, CmdbRefused):
            raise RwatchError(f"CMDB at {config.cmdb.base_url} refused rwatch: {reason}; {exc.fix}") from None
        raise RwatchError(f"cannot reach CMDB at {config.cmdb.base_url}: {reason}") from None


async def resync_now(config: Config, resources: Sequence[str], stop: asyncio.Event, *,
                     progress: Progress | None = None,
                     allow_mass_delete: bool = False) -> dict[str, ResyncResult | BaseException]:
    """``rwatch resync``: resync ``resources`` now, then fill every gap of each resource recorded before its
    resync started."""
    for resource in resources:
        Resyncer.check(resource)
    store = open_store(config.store.url.get_secret_value())
    wired = wire(config, stop, name="rwatch resync", applies=config.bus.kind == "memory")
    bus, sinks = wired.bus, wired.sinks
    outcome: dict[str, ResyncResult | BaseException] = {}
    try:
        await store.open()
        for sink in sinks.values():
            await sink.open()
        wired.subscribe(stop)
        await bus.start()
        async with CmdbClient(config.cmdb) as client:
            await probe(client, config, resources)
            resyncer = Resyncer(config, client, bus, stop, progress=progress, store=store,
                                allow_mass_delete=allow_mass_delete)

            async def one(resource: str) -> None:
                gaps = await store.gaps(config.cmdb.tenant, resource)
                try:
                    outcome[resource] = result = await resyncer.run(resource, trigger="manual")
                except Exception as exc:  # logged by the resyncer; the others go on
                    outcome[resource] = exc
                    return
                if result.complete:  # else nothing was swept: the gaps stay open (resync_incomplete says why)
                    await fill_gaps(gaps, result, lambda gap: store.fill_gap(gap.id, time.time()),
                                    log.bind(resource=resource))

            await asyncio.gather(*(one(r) for r in resources))
    finally:
        await bus.close()
        for sink in reversed(list(sinks.values())):
            await sink.close()
        await store.close()
    return outcome


async def verify(config: Config, *, sink: str | None = None, resources: Sequence[str] | None = None,
                 repair: bool = False, wait: float = 60.0, allow_mass_delete: bool = False) -> VerifyReport:
    """``rwatch verify``: compare the mirror ``sink`` with CMDB (``rwatch.watch.verify``); with ``repair`` resync
    each drifting resource through the configured bus and verify again (the report's ``after``; AMQP: polling
    until clean or ``wait`` seconds passed)."""
    sink, chosen, skipped = choose(config, sink, resources)
    stop = asyncio.Event()
    memory = config.bus.kind == "memory"
    # With repair on the memory bus the resync is applied here, by every sink, as the daemon would.
    wired = wire(config, stop, name="rwatch verify", applies=memory) if repair else None
    sinks: dict[str, Sink] = wired.sinks if wired is not None else {}
    mirror = sinks.get(sink) or MirrorSink(sink, mirror_settings(config, sink))
    assert isinstance(mirror, MirrorSink)
    bus: Bus = wired.bus if wired is not None else MemoryBus(stop=stop)
    opened: list[Sink] = []
    # The record of the businesses the stream showed: what search_business hides is reported, not drift.
    store = open_store(config.store.url.get_secret_value())
    try:
        await store.open()
        for one in (sinks or {sink: mirror}).values():
            await one.open()
            opened.append(one)
        async with CmdbClient(config.cmdb) as client:
            await probe(client, config, chosen)
            resyncer = Resyncer(config, client, bus, stop, store=store, allow_mass_delete=allow_mass_delete)
            report = await verify_pass(resyncer, mirror, sink, chosen, skipped)
            if wired is not None and report.drift:
                wired.subscribe(stop)
                try:
                    await asyncio.wait_for(bus.start(), max(wait, 10.0))
                except TimeoutError:
                    raise RwatchError(f"cannot reach the bus at {config.bus.url._display()}") from None
                report.repaired = [r.resource for r in report.resources if r.drift]
                for resource in report.repaired:
                    await resyncer.run(resource, trigger="repair")
                # Again until clean: at once on the memory bus (applied already), on AMQP once the consumers did.
                again = retrying(LIST, stop=stop, on=(), fixed=1.0, within=0.0 if memory else wait,
                                 until=lambda after: not after.drift)
                try:
                    report.after = await again(verify_pass, resyncer, mirror, sink, chosen, skipped)
                except RetryError as still:  # ``wait`` ran out: the report says what still drifts
                    report.after = still.last_attempt.result()
        await remember(store, report.final)
        return report
    except Stopping as exc:  # pragma: no cover - nothing sets stop but a failure elsewhere
        raise RwatchError(f"verify stopped: {exc}") from None
    finally:
        stop.set()
        await bus.close()
        for one in reversed(opened):
            await one.close()
        await store.close()
