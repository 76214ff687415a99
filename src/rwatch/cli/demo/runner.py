"""The demo's run: the simulator, rwatch beside it, the live view, then a clean stop and the broker cleaned up."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING, Any, TextIO

from rwatch.cli.demo.options import DemoError, DemoOptions, demo_config
from rwatch.cli.demo.view import View, say
from rwatch.cli.demo.zabbix import ZabbixUnusable, check_zabbix, remove_demo

if TYPE_CHECKING:

    from rwatch.config import Config
    from rwatch.sinks.zabbix.api import ApiVersion


# Topology operations only: every change the generator makes is one the mirror and file_sd show.
DEMO_MIX: dict[str, float] = {
    "host.create": 4, "host.update": 10, "host.delete": 2, "host.move": 6,
    "set.create": 1, "set.update": 1, "set.delete": 0.5,
    "module.create": 1, "module.update": 2, "module.delete": 0.5,
    "biz.update": 1,
}


async def seed_from_start(config: Config) -> None:
    """Point every watcher at the oldest event CMDB retains, so the mirror gets the whole topology at once
    (resource pool included, which the list APIs of a resync would not show). NoEventCursor means exactly
    that to the server (cmdb-watch-api §3.3); rwatch itself never saves it."""
    from rwatch.cmdb.protocol import NO_EVENT_CURSOR
    from rwatch.store.base import open_store
    from rwatch.store.records import CursorState

    store = open_store(config.store.url.get_secret_value())
    await store.open()
    try:
        for resource in config.watch.enabled:
            await store.save(CursorState(config.cmdb.tenant, resource, NO_EVENT_CURSOR, None, None, time.time()))
    finally:
        await store.close()


async def _check_broker(url: str) -> None:
    import aio_pika

    from rwatch.config import mask_url

    try:
        async with asyncio.timeout(10):
            conn = await aio_pika.connect(url)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise DemoError(f"--amqp-url: cannot reach RabbitMQ at {mask_url(url)}: {exc or type(exc).__name__}") from None
    await conn.close()


async def _delete_broker_topology(config: Config) -> None:
    """Remove what rwatch declared for the demo: its queues, dead-letter queues and exchanges."""
    import aio_pika

    from rwatch.bus.topology import dead_queue_name, dlx_name, queue_name

    conn = await aio_pika.connect(config.bus.url.get_secret_value())
    try:
        channel = await conn.channel()
        for sink in config.queue_sinks:
            for resource in config.sink_resources(sink):
                await channel.queue_delete(queue_name(config, sink, resource))
            await channel.queue_delete(dead_queue_name(config, sink))
        await channel.exchange_delete(config.bus.exchange)
        await channel.exchange_delete(dlx_name(config))
    finally:
        await conn.close()


async def run_demo(options: DemoOptions, out: TextIO) -> int:
    """The whole demo; 0 after a clean stop."""
    from rwatch.app import run_async
    from rwatch.logs import get_logger
    from rwatch.sim.parts import SimOptions
    from rwatch.sim.server import Simulator

    log = get_logger("rwatch.demo")
    if options.amqp_url is not None:
        await _check_broker(options.amqp_url)
    zabbix_version: ApiVersion | None = None
    if options.zabbix is not None:
        try:
            zabbix_version, cleared = await check_zabbix(options.zabbix)
        except ZabbixUnusable as exc:
            raise DemoError(str(exc)) from None
        if cleared:
            say(out, f"removed {cleared} hosts an earlier demo left in Zabbix under {options.zabbix.prefix}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second Ctrl-C: leave at once
            os._exit(1)
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    sim_options = SimOptions(host="127.0.0.1", port=0, seed=1, bizs=3, sets_per_biz=2, modules_per_set=2, hosts=50,
                             load_rate=0.0, load_mix=DEMO_MIX)
    started = time.monotonic()
    try:
        async with Simulator(sim_options) as sim:
            config = demo_config(options, sim.url)
            await seed_from_start(config)
            bound: asyncio.Future[int] = loop.create_future()
            daemon = asyncio.create_task(run_async(config, stop, role="all", http_port=bound), name="rwatch")
            try:
                waiter = asyncio.ensure_future(stop.wait())
                starting: set[asyncio.Future[Any]] = {daemon, bound, waiter}
                await asyncio.wait(starting, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not bound.done():  # asked to stop while starting (exit 0), or rwatch failed to start
                    asked = stop.is_set()
                    if not asked and not daemon.done():
                        say(out, f"rwatch did not start within 30 s (see {options.files.log})")
                    stop.set()
                    code = await _finish(daemon, config, options, out, stopped_early=True)
                    return code if asked else code or 1
                if options.rate > 0:
                    sim.load.start(options.rate)
                _banner(out, options, bound.result(), sim.url, zabbix_version)
                view = View(config, options, sim)
                await view.run(stop, daemon, out, deadline=started + options.seconds if options.seconds else None)
            finally:
                stop.set()
                sim.load.stop()
            return await _finish(daemon, config, options, out)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _finish(daemon: asyncio.Task[None], config: Config, options: DemoOptions, out: TextIO,
                  stopped_early: bool = False) -> int:
    """Wait for rwatch to stop (within its shutdown timeout), clean the broker up, say where the files are."""
    code = 0
    done, _ = await asyncio.wait({daemon}, timeout=config.run.shutdown_timeout)
    if not done:
        daemon.cancel()
        await asyncio.wait({daemon}, timeout=1.0)
        say(out, f"rwatch did not stop within {config.run.shutdown_timeout:g} s (see {options.files.log})")
        code = 1
    elif not daemon.cancelled() and daemon.exception() is not None:
        exc = daemon.exception()
        say(out, f"rwatch stopped with an error: {_describe(exc)} (see {options.files.log})")
        code = 1
    if options.amqp_url is not None:
        try:
            await _delete_broker_topology(config)
        except Exception as exc:
            say(out, f"could not delete the demo's exchange and queues ({config.bus.exchange}): {exc}")
    zabbix = options.zabbix
    if zabbix is not None and zabbix.keep:
        say(out, f"the demo's hosts and groups stay in Zabbix under {zabbix.prefix} (the next demo with this prefix "
                 "removes them)")
    elif zabbix is not None:
        try:
            removed = await remove_demo(zabbix)
            say(out, f"removed the demo's {removed} hosts and its groups from Zabbix ({zabbix.prefix}; "
                     "--zabbix-keep leaves them)")
        except Exception as exc:
            say(out, f"could not remove the demo's hosts and groups from Zabbix ({zabbix.prefix}): {exc}")
    if not stopped_early:
        say(out, f"stopped. The mirror, file_sd output and log stay in {options.files.folder}")
    return code


def _describe(exc: BaseException | None) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return repr(exc)


def _banner(out: TextIO, options: DemoOptions, port: int, sim_url: str,
            zabbix_version: ApiVersion | None) -> None:
    files = options.files
    bus = f"RabbitMQ, exchange rwatch-demo-{options.unique} (deleted at exit)" if options.amqp_url else "memory"
    changes = f"{options.rate:g} changes/s" if options.rate else "no changes (--rate 0)"
    stop = f"stops after {options.seconds:g} s, or press Ctrl-C" if options.seconds else "press Ctrl-C to stop"
    lines = [
        "rwatch demo: a simulated CMDB -> rwatch -> SQLite mirror + Prometheus file_sd"
        + (" + Zabbix" if options.zabbix else ""),
        f"  status page  http://127.0.0.1:{port}/   (also /healthz, /readyz, /metrics, /sd)",
        f"  simulator    {sim_url}   ({changes})",
        f"  bus          {bus}",
        f"  mirror       {files.mirror}   (sqlite3 {files.mirror} 'SELECT * FROM rwatch_topology LIMIT 5')",
        f"  file_sd      {files.targets}",
        *_zabbix_lines(options, zabbix_version),
        f"  logs         {files.log}",
        f"  {stop}",
        "",
    ]
    say(out, "\n".join(lines))


def _zabbix_lines(options: DemoOptions, version: ApiVersion | None) -> list[str]:
    zabbix = options.zabbix
    if zabbix is None or version is None:
        return []
    leave = "kept at exit (--zabbix-keep)" if zabbix.keep else "removed at exit"
    return [
        f"  zabbix       {zabbix.url}   (Zabbix {version.text}, {zabbix.login}; "
        f"groups {zabbix.prefix}/<biz>/<set>/<module>, {leave})",
        f"               in its UI: {zabbix.groups_page(version)}   ({_who(zabbix.username)})",
    ]


def _who(username: str | None) -> str:
    return f"sign in as {username}" if username else "sign in as a user who may see them"
