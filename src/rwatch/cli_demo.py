"""``rwatch demo``: the simulator and rwatch in one process, with a live view of the events flowing.

Nothing to configure: a small simulated CMDB (3 businesses, ~50 hosts) with a change generator, rwatch on
the memory bus (or on RabbitMQ with ``--amqp-url``, under an exchange and queues of its own that are deleted
at exit), a SQLite mirror and a Prometheus ``file_sd`` file in one folder. The watchers start at the oldest
event CMDB retains (the NoEventCursor, never saved by rwatch itself), so the mirror holds the whole
topology, resource pool included, within a second or two. Ctrl-C (or SIGTERM, or ``--seconds``) stops
rwatch cleanly, then the simulator, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from rwatch.config import Config
    from rwatch.sim.server import Simulator

# Topology operations only: every change the generator makes is one the mirror and file_sd show.
DEMO_MIX: dict[str, float] = {
    "host.create": 4, "host.update": 10, "host.delete": 2, "host.move": 6,
    "set.create": 1, "set.update": 1, "set.delete": 0.5,
    "module.create": 1, "module.update": 2, "module.delete": 0.5,
    "biz.update": 1,
}
DEFAULT_PORT = 9108
SINK = "mirror"
ACTIONS = ("create", "update", "delete")
# Files the demo owns in its folder; they are replaced at every start (the simulator starts afresh too).
MIRROR_FILE = "demo-mirror.db"
STATE_FILE = "demo-state.db"
TARGETS_FILE = "demo-targets.json"
LOG_FILE = "demo.log"


def demo(
    amqp_url: Annotated[str | None, typer.Option(
        "--amqp-url", help="go through this RabbitMQ (own exchange and queues, deleted at exit) instead of the "
                           "in-process memory bus, e.g. amqp://guest:guest@127.0.0.1:5672/")] = None,
    rate: Annotated[float, typer.Option(min=0, help="simulated CMDB changes per second")] = 5.0,
    seconds: Annotated[float, typer.Option(min=0, help="stop after this many seconds (0 = until Ctrl-C)")] = 0.0,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, show_default=False,
        help=f"status page port on 127.0.0.1 (0 = any free port); by default {DEFAULT_PORT}, or any free port when "
             f"{DEFAULT_PORT} is taken")] = None,
    directory: Annotated[Path | None, typer.Option(
        "--dir", file_okay=False, help="folder for the mirror, file_sd output, state and log (default: a new "
                                       "temporary folder); the demo's own files in it are replaced")] = None,
) -> None:
    """See rwatch work in one command: a simulated CMDB, rwatch, a SQLite mirror and file_sd, live."""
    try:
        chosen = _choose_port(port)
    except OSError as exc:
        typer.echo(f"rwatch demo: --port {port}: cannot listen on 127.0.0.1:{port}: {exc.strerror} "
                   "(--port 0 picks a free port)", err=True)
        raise typer.Exit(1) from None
    folder = (directory or Path(tempfile.mkdtemp(prefix="rwatch-demo-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = DemoFiles(folder)
    files.clear()
    with files.log.open("w", encoding="utf-8") as log_stream:
        from rwatch.logs import setup_logging

        setup_logging("info", "json", log_stream)  # the view owns the terminal; the JSON logs go to the file
        options = DemoOptions(amqp_url=amqp_url, rate=rate, seconds=seconds, port=chosen, files=files,
                              live=sys.stdout.isatty())
        try:
            code = asyncio.run(run_demo(options, sys.stdout))
        except DemoError as exc:
            typer.echo(f"rwatch demo: {exc}", err=True)
            code = 1
        finally:
            logging.getLogger().handlers.clear()  # nothing may write to the file once it is closed
    raise typer.Exit(code)


class DemoError(Exception):
    """A reason the demo cannot start, said in one line."""


@dataclass(frozen=True)
class DemoFiles:
    folder: Path

    @property
    def mirror(self) -> Path:
        return self.folder / MIRROR_FILE

    @property
    def state(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def targets(self) -> Path:
        return self.folder / TARGETS_FILE

    @property
    def log(self) -> Path:
        return self.folder / LOG_FILE

    def clear(self) -> None:
        """Start afresh: a cursor or a row from an earlier demo means nothing to this run's new simulator."""
        for db in (self.mirror, self.state):
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    db.with_name(db.name + suffix).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.targets.unlink()


@dataclass
class DemoOptions:
    amqp_url: str | None
    rate: float
    seconds: float
    port: int
    files: DemoFiles
    live: bool
    unique: str = field(default_factory=lambda: uuid.uuid4().hex[:10])


def _choose_port(port: int | None) -> int:
    """The port to serve on: the one asked for (checked free now, for a clear message), else 9108 when it is
    free, else 0 (any)."""
    wanted = DEFAULT_PORT if port is None else port
    if wanted == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like aiohttp's listener: a port in TIME_WAIT after an earlier run is free to reuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", wanted))
        except OSError:
            if port is None:
                return 0
            raise
    return wanted


def demo_config(options: DemoOptions, sim_url: str) -> Config:
    """rwatch's embedded configuration for the demo."""
    from rwatch.config import Config

    files = options.files
    bus: dict[str, Any] = {"kind": "memory"}
    if options.amqp_url is not None:
        # Never the real "cmdb" exchange or "rwatch" queues: a name of this run's own, deleted at exit.
        name = f"rwatch-demo-{options.unique}"
        bus = {"kind": "amqp", "url": options.amqp_url, "exchange": name, "queue_prefix": name}
    return Config.model_validate({
        "cmdb": {"base_url": sim_url, "rate_limit": 0},
        "watch": {"bootstrap": "now"},
        "bus": bus,
        "store": {"url": f"sqlite:///{files.state}"},
        "sinks": {
            SINK: {"kind": "mirror", "url": f"sqlite:///{files.mirror}"},
            "targets": {"kind": "prom_sd", "source": SINK, "file": str(files.targets),
                        "jobs": [{"name": "node", "port": 9100}]},
        },
        "http": {"listen": f"127.0.0.1:{options.port}"},
        "log": {"level": "info", "format": "json"},
    })


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
                        _say(out, f"rwatch did not start within 30 s (see {options.files.log})")
                    stop.set()
                    code = await _finish(daemon, config, options, out, stopped_early=True)
                    return code if asked else code or 1
                if options.rate > 0:
                    sim.load.start(options.rate)
                _banner(out, options, bound.result(), sim.url)
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
        _say(out, f"rwatch did not stop within {config.run.shutdown_timeout:g} s (see {options.files.log})")
        code = 1
    elif not daemon.cancelled() and daemon.exception() is not None:
        exc = daemon.exception()
        _say(out, f"rwatch stopped with an error: {_describe(exc)} (see {options.files.log})")
        code = 1
    if options.amqp_url is not None:
        try:
            await _delete_broker_topology(config)
        except Exception as exc:
            _say(out, f"could not delete the demo's exchange and queues ({config.bus.exchange}): {exc}")
    if not stopped_early:
        _say(out, f"stopped. The mirror, file_sd output and log stay in {options.files.folder}")
    return code


def _describe(exc: BaseException | None) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return repr(exc)


def _say(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


def _banner(out: TextIO, options: DemoOptions, port: int, sim_url: str) -> None:
    files = options.files
    bus = f"RabbitMQ, exchange rwatch-demo-{options.unique} (deleted at exit)" if options.amqp_url else "memory"
    changes = f"{options.rate:g} changes/s" if options.rate else "no changes (--rate 0)"
    stop = f"stops after {options.seconds:g} s, or press Ctrl-C" if options.seconds else "press Ctrl-C to stop"
    lines = [
        "rwatch demo: a simulated CMDB -> rwatch -> SQLite mirror + Prometheus file_sd",
        f"  status page  http://127.0.0.1:{port}/   (also /healthz, /readyz, /metrics, /sd)",
        f"  simulator    {sim_url}   ({changes})",
        f"  bus          {bus}",
        f"  mirror       {files.mirror}   (sqlite3 {files.mirror} 'SELECT * FROM rwatch_topology LIMIT 5')",
        f"  file_sd      {files.targets}",
        f"  logs         {files.log}",
        f"  {stop}",
        "",
    ]
    _say(out, "\n".join(lines))


# --- the live view --------------------------------------------------------------------------------------


@dataclass
class Row:
    resource: str
    published: int = 0
    applied: int = 0
    rows: int | None = None
    last_event: float | None = None  # CMDB time of the newest event applied to the mirror


class View:
    """Per resource: events published, applied to the mirror, live mirror rows and the newest event's time,
    read from the process's own counters and from the mirror file."""

    def __init__(self, config: Config, options: DemoOptions, sim: Simulator) -> None:
        self.resources: list[str] = list(config.watch.enabled)
        self.options = options
        self.sim = sim
        self.started = time.monotonic()
        self.history: list[tuple[float, int]] = []  # (monotonic, total applied) for the rate

    @staticmethod
    def _counter(name: str, labels: dict[str, str]) -> int:
        from prometheus_client import REGISTRY

        total = 0.0
        for action in ACTIONS:
            total += REGISTRY.get_sample_value(name, {**labels, "action": action}) or 0.0
        return int(total)

    def _mirror(self) -> dict[str, tuple[int, float | None]]:
        path = self.options.files.mirror
        if not path.exists():
            return {}
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.25)
        except sqlite3.Error:
            return {}
        try:
            found = conn.execute(
                "SELECT resource, SUM(CASE WHEN deleted THEN 0 ELSE 1 END), MAX(version_s) FROM rwatch_objects "
                "GROUP BY resource").fetchall()
        except sqlite3.Error:  # not created yet, or busy for a moment: next tick
            return {}
        finally:
            conn.close()
        return {str(r): (int(n or 0), float(v) if v is not None else None) for r, n, v in found}

    async def sample(self) -> list[Row]:
        mirror = await asyncio.to_thread(self._mirror)
        rows = []
        for resource in self.resources:
            row = Row(resource,
                      published=self._counter("rwatch_events_published_total", {"resource": resource}),
                      applied=self._counter("rwatch_events_applied_total", {"sink": SINK, "resource": resource}))
            if resource in mirror:
                row.rows, row.last_event = mirror[resource]
            rows.append(row)
        now = time.monotonic()
        self.history.append((now, sum(r.applied for r in rows)))
        self.history = [h for h in self.history if now - h[0] <= 5.0]
        return rows

    def rate(self) -> float:
        if len(self.history) < 2 or self.history[-1][0] - self.history[0][0] <= 0:
            return 0.0
        (t0, n0), (t1, n1) = self.history[0], self.history[-1]
        return (n1 - n0) / (t1 - t0)

    def changes(self) -> int:
        return sum(self.sim.load.applied.values())

    async def run(self, stop: asyncio.Event, daemon: asyncio.Task[None], out: TextIO, *,
                  deadline: float | None) -> None:
        """Refresh until ``stop``, the deadline (monotonic) or rwatch's end."""
        if self.options.live:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=out)
            with Live(self.table(await self.sample()), console=console, auto_refresh=False,
                      transient=False) as live:
                while not await self._tick(stop, daemon, deadline, 0.5):
                    live.update(self.table(await self.sample()), refresh=True)
                live.update(self.table(await self.sample()), refresh=True)
        else:
            while not await self._tick(stop, daemon, deadline, 1.0):
                _say(out, self.line(await self.sample()))

    async def _tick(self, stop: asyncio.Event, daemon: asyncio.Task[None], deadline: float | None,
                    every: float) -> bool:
        """Wait one refresh period; True when it is time to stop."""
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiter, daemon}, timeout=every, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        return stop.is_set() or daemon.done() or (deadline is not None and time.monotonic() >= deadline)

    def line(self, rows: list[Row]) -> str:
        """One plain summary line (stdout is not a terminal)."""
        parts = [f"{r.resource} published={r.published} applied={r.applied} rows={'-' if r.rows is None else r.rows}"
                 for r in rows]
        elapsed = time.monotonic() - self.started
        return f"[{elapsed:5.0f}s] changes={self.changes()} applied/s={self.rate():.1f} | " + " | ".join(parts)

    def table(self, rows: list[Row]) -> Table:
        from rich.table import Table

        elapsed = time.monotonic() - self.started
        table = Table(title=f"rwatch demo, {elapsed:.0f} s: {self.changes()} simulated changes, "
                            f"{self.rate():.1f} events applied/s", title_justify="left",
                      caption="Ctrl-C stops", caption_justify="left")
        table.add_column("resource")
        for name in ("published", "applied", "mirror rows"):
            table.add_column(name, justify="right")
        table.add_column("last event", justify="right")
        now = time.time()
        for r in rows:
            last = "-" if r.last_event is None else (
                f"{time.strftime('%H:%M:%S', time.localtime(r.last_event))} ({max(0.0, now - r.last_event):.0f} s ago)")
            behind = r.applied < r.published
            table.add_row(r.resource, str(r.published), str(r.applied), "-" if r.rows is None else str(r.rows), last,
                          style="yellow" if behind else None)
        table.add_row("total", str(sum(r.published for r in rows)), str(sum(r.applied for r in rows)),
                      str(sum(r.rows or 0 for r in rows)), "", style="bold")
        return table
