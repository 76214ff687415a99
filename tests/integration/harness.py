"""What the end-to-end tests share: a config for rwatch against the simulator, a queue reader, the truth."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from rwatch.bus import Bus, make_bus
from rwatch.cmdb.client import CmdbClient
from rwatch.config import Config, load_config
from rwatch.retry import HealthyResetWait
from rwatch.store.base import CursorStore, open_store
from rwatch.watch.watcher import Watcher
from tests.entrypoint import RWATCH

SINK = "mirror"


@dataclass
class Setup:
    """One isolated rwatch installation: its own exchange, queues, store and config file."""

    tmp: Path
    sim_url: str
    amqp_url: str
    unique: str
    resources: list[str]
    store_url: str = ""
    hold: float = 1.0
    bootstrap: str = "now"
    bus: str = "amqp"
    mirror_url: str = ""
    prefetch: int = 256
    delivery_limit: int = 5
    extra: str = ""
    cmdb: str = ""  # more [cmdb] keys (api, tenant_id, ...)
    watch: str = ""  # more [watch] keys (mass_delete_share, ...)
    bus_url: str = ""  # the broker as rwatch reaches it (e.g. through a proxy); the test itself uses amqp_url
    path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.store_url = self.store_url or f"sqlite:///{self.tmp}/state-{self.unique}.db"
        self.path = self.tmp / f"rwatch-{self.unique}.toml"
        self.write()

    @property
    def exchange(self) -> str:
        return f"cmdb-{self.unique}"

    @property
    def prefix(self) -> str:
        return f"rw-{self.unique}"

    def queue(self, resource: str, sink: str = SINK) -> str:
        return f"{self.prefix}.{sink}.{resource}"

    def write(self) -> None:
        tables = []
        for res in ("host", "host_relation", "biz", "set", "module", "process", "object_instance",
                    "mainline_instance", "biz_set", "biz_set_relation", "plat", "project"):
            tables.append(f"[watch.resources.{res}]\nenabled = {'true' if res in self.resources else 'false'}\n")
        self.path.write_text(f"""
[cmdb]
base_url = "{self.sim_url}"
rate_limit = 0
{self.cmdb}
[watch]
bootstrap = "{self.bootstrap}"
lookback = "5m"
retention = "3h"
{self.watch}
{"".join(tables)}
[bus]
kind = "{self.bus}"
url = "{self.bus_url or self.amqp_url}"
exchange = "{self.exchange}"
queue_prefix = "{self.prefix}"
prefetch = {self.prefetch}
delivery_limit = {self.delivery_limit}
[store]
url = "{self.store_url}"
[sinks.{SINK}]
kind = "mirror"
url = "{self.mirror_url or f'sqlite:///{self.tmp}/mirror-{self.unique}.db'}"
[http]
listen = "127.0.0.1:0"
[log]
level = "info"
{self.extra}
""")

    def config(self) -> Config:
        return load_config(self.path, environ={})

    def fields(self, resource: str) -> list[str] | None:
        return self.config().watch.resources[resource].fields or None


# --- the truth -----------------------------------------------------------------------------------------


def expected_event(setup: Setup, resource: str, node: Any) -> dict[str, Any]:
    """What rwatch must publish for one chain node: action, key, cursor and the requested fields."""
    fields = setup.fields(resource)
    data = node.detail if fields is None or resource == "biz_set_relation" else {
        f: node.detail.get(f) for f in fields}
    return {"action": node.event_type, "key": node.key, "cursor": node.cursor, "data": data,
            "version": [node.sec, node.inc]}


def published_view(event: dict[str, Any]) -> dict[str, Any]:
    return {k: event[k] for k in ("action", "key", "cursor", "data", "version")}


# --- reading the queues --------------------------------------------------------------------------------


class QueueReader:
    """Consumes the sink queues of one Setup and keeps every message body, per resource, in arrival order."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.headers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> QueueReader:
        self._conn = await aio_pika.connect(self.setup.amqp_url)
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=500)
        for res in self.setup.resources:
            queue = await channel.get_queue(self.setup.queue(res), ensure=True)
            await queue.consume(self._on_message(res))
        return self

    def _on_message(self, resource: str) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Any]:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.events[resource].append(orjson.loads(message.body))
            self.headers[resource].append({**(message.headers or {}), "message_id": message.message_id,
                                           "routing_key": message.routing_key,
                                           "delivery_mode": message.delivery_mode,
                                           "content_type": message.content_type})
            await message.ack()
            self._changed.set()

        return on_message

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def wait_for(self, done: Callable[[QueueReader], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            if left <= 0:
                counts = {r: len(v) for r, v in self.events.items()}
                raise AssertionError(f"queues did not reach the expected state in {timeout} s: {counts}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    def ids(self, resource: str) -> list[str]:
        return [e["id"] for e in self.events[resource]]


async def delete_topology(setup: Setup) -> None:
    config = setup.config()
    conn = await aio_pika.connect(setup.amqp_url)
    try:
        channel = await conn.channel()
        for sink in config.queue_sinks:
            for res in config.sink_resources(sink):
                await channel.queue_delete(setup.queue(res, sink))
            await channel.queue_delete(f"{setup.prefix}.{sink}.dead")
        await channel.exchange_delete(setup.exchange)
        await channel.exchange_delete(f"{setup.prefix}.dlx")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def reading(setup: Setup) -> AsyncIterator[QueueReader]:
    """Read the queues rwatch declared (it must have started). The ``setups`` fixture deletes them later,
    after rwatch stopped: deleting a quorum queue under a live publisher crashes the broker's channel."""
    async with QueueReader(setup) as reader:
        yield reader


# --- rwatch as a process ---------------------------------------------------------------------------------


class Daemon:
    """``rwatch run --role watcher`` as a child process, the way an operator runs it."""

    def __init__(self, setup: Setup, env: dict[str, str] | None = None, role: str = "watcher") -> None:
        self.setup = setup
        self.env = env or {}
        self.role = role
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = setup.tmp / f"rwatch-{setup.unique}-{role}.log"

    def start(self, env: dict[str, str] | None = None) -> None:
        # Only this start's fail points apply; nothing leaks in from the test runner's environment.
        full = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
        full.update(self.env)
        full.update(env or {})
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [RWATCH, "run", "--role", self.role, "--config", str(self.setup.path)],
                stdout=out, stderr=subprocess.STDOUT, env=full,
            )

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"rwatch did not exit within {timeout} s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_events(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                lines.append(orjson.loads(raw))
        return lines

    async def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return await self.wait()


def chain_suffix_from(nodes: list[Any], first_cursor: str) -> list[Any]:
    """The chain from the node with ``first_cursor`` on (rwatch's first from-now answer)."""
    for i, node in enumerate(nodes):
        if node.cursor == first_cursor:
            return nodes[i:]
    raise AssertionError(f"first published cursor {first_cursor!r} is not in the simulator's chain")


def dedupe(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for e in events:
        if e["id"] not in seen:
            seen.add(e["id"])
            out.append(e)
    return out


# --- one Watcher driven directly -------------------------------------------------------------------------


@dataclass
class Parts:
    """Client, bus and store as ``run_async`` builds them, for tests that drive Watchers directly."""

    config: Config
    client: CmdbClient
    bus: Bus
    store: CursorStore
    stop: asyncio.Event

    def watcher(self, resource: str, *, fast_backoff: bool = True, store: CursorStore | None = None,
                owner: str | None = None, lease_ttl: float | None = None) -> Watcher:
        return Watcher(
            resource, settings=self.config.watch.resources[resource], watch=self.config.watch, tenant="0",
            client=self.client, bus=self.bus, store=store or self.store, stop=self.stop,
            backoff=HealthyResetWait(initial=0.05, maximum=0.2) if fast_backoff else None,
            owner=owner, lease_ttl=lease_ttl,
        )


@contextlib.asynccontextmanager
async def watcher_parts(setup: Setup, *, timeout: float | None = None) -> AsyncIterator[Parts]:
    cfg = setup.config()
    # model_copy skips validation on purpose: tests want a client timeout below the 20 s production floor.
    cmdb = cfg.cmdb.model_copy(update={"timeout": timeout}) if timeout else cfg.cmdb
    stop = asyncio.Event()
    store = open_store(setup.store_url)
    await store.open()
    bus = make_bus(cfg, stop=stop)
    await bus.start()
    client = CmdbClient(cmdb)
    try:
        yield Parts(cfg, client, bus, store, stop)
    finally:
        stop.set()
        await client.close()
        await bus.close()
        await store.close()


@contextlib.asynccontextmanager
async def running(watcher: Watcher) -> AsyncIterator[Watcher]:
    """Run a watcher in the background; stop it (its own stop event) and wait for it on exit."""
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        watcher.stopping.set()
        await asyncio.wait_for(task, 30)


MakeSetup = Callable[..., Setup]


# --- the broker, operated on from outside --------------------------------------------------------------


async def rabbitmqctl(*args: str, timeout: float = 120.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def close_connections(match: Callable[[str], bool]) -> int:
    """Close, broker side, only the connections whose client-provided name ``match`` accepts."""
    # Tab-separated "<pid>\t[{...,{"connection_name","..."},...}]": the pid in this form is what
    # close_connection accepts (the JSON formatter prints it as #PID<...>, which it does not).
    listing = await rabbitmqctl("-s", "list_connections", "pid", "client_properties")
    closed = 0
    for line in listing.splitlines():
        pid, _, props = line.partition("\t")
        found = re.search(r'\{"connection_name","([^"]*)"\}', props)
        if found and match(found.group(1)):
            await rabbitmqctl("-q", "close_connection", pid, "rwatch test: connection dropped on purpose")
            closed += 1
    return closed


# --- a webhook receiver, as a downstream team would write one ----------------------------------------------


class Receiver:
    """Verifies each delivery's signature (standardwebhooks), dedupes by webhook-id, keeps per object the
    newest version: the "effect" of the stream. ``refuse`` picks a status for an event; ``gate`` stalls."""

    SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

    def __init__(self) -> None:
        from standardwebhooks import Webhook

        self.webhook = Webhook(self.SECRET)
        self.deliveries: list[str] = []  # webhook-id of every accepted request, duplicates included
        self.state: dict[tuple[str, str], tuple[list[int], bool, Any]] = {}
        self.refuse: Callable[[dict[str, Any]], int | None] = lambda event: None
        self.gate = asyncio.Event()
        self.gate.set()
        self.changed = asyncio.Event()
        self.url = ""
        self._runner: Any = None

    async def __aenter__(self) -> Receiver:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.gate.set()
        await self._runner.cleanup()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        event = self.webhook.verify(body, dict(request.headers))  # raises on a bad signature: a 500 here
        await self.gate.wait()
        status = self.refuse(event)
        if status is not None:
            return web.Response(status=status, text="refused by the test")
        self.deliveries.append(request.headers["webhook-id"])
        key = (event["resource"], event["key"])
        held = self.state.get(key)
        # Version-fenced, as the README asks receivers to be: newer wins, and a resync's snapshot row wins a tie.
        if held is None or event["version"] > held[0] or (event["version"] == held[0] and event["origin"] == "resync"):
            self.state[key] = (event["version"], event["action"] == "delete", event["data"])
        self.changed.set()
        return web.Response(status=204)

    def live(self, resource: str) -> dict[str, Any]:
        return {k: data for (res, k), (_, deleted, data) in self.state.items() if res == resource and not deleted}

    async def wait(self, done: Callable[[], bool], timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 1.0)

    def sink_toml(self, name: str = "hook", **extra: Any) -> str:
        lines = [f"[sinks.{name}]", 'kind = "webhook"', f'url = "{self.url}"', f'secret = "{self.SECRET}"']
        lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in extra.items()]
        return "\n".join(lines) + "\n"
