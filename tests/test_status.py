"""/status: where each resource stands and how fast it goes, what waits in each sink's queue, recent errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import structlog
from prometheus_client import REGISTRY

from rwatch import __version__, error_tap
from rwatch import status as status_module
from rwatch.app import run_async
from rwatch.bus.topology import declare_topology
from rwatch.config import Config, load_config
from rwatch.error_tap import ErrorTap, install_error_tap, recent_errors
from rwatch.logs import get_logger, setup_logging
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.status import QueueDepths, Rates, Status
from tests.integration.harness import Setup, delete_topology

RESOURCES = ["biz", "set", "module", "host"]
RESOURCE_KEYS = {"resource", "mode", "leader", "cursor", "lag_s", "cursor_age_s", "polled_ago_s", "retention_alarm",
                 "events_received", "events_published", "rate_per_s", "gaps_open", "refused"}
SINK_KEYS = {"sink", "kind", "resources", "queue_depth", "dead_queue_depth", "queue_error", "applied", "dead"}


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Logging as ``rwatch run`` sets it up (structlog through the root logger); put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    setup_logging("info", "json", out)
    yield out
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@contextlib.asynccontextmanager
async def daemon(config: Config) -> AsyncIterator[str]:
    """``run_async`` with every role in this process; yields its base URL."""
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_async(config, stop, role="all", http_port=port))
    try:
        done, _ = await asyncio.wait({task, port}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        yield f"http://127.0.0.1:{await asyncio.wait_for(port, 1)}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def get_status(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/status") as resp:
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        doc: dict[str, Any] = await resp.json()
        return doc


async def wait_status(session: aiohttp.ClientSession, base: str, what: str, done: Any,
                      timeout: float = 30.0) -> dict[str, Any]:
    """Ask /status until ``done(doc)``: the daemon offers nothing else to await from outside."""
    deadline = time.monotonic() + timeout
    while True:
        doc = await get_status(session, base)
        if done(doc):
            return doc
        assert time.monotonic() < deadline, f"/status never showed {what}: {doc}"
        await asyncio.sleep(0.1)


def by_resource(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["resource"]: row for row in doc["resources"]}


async def test_status_of_a_running_daemon(tmp_path: Path, json_logs: io.StringIO) -> None:
    async with Simulator(SimOptions(port=0, hold=0.5, seed=5, bizs=2, hosts=20)) as sim:
        setup = Setup(tmp_path, sim.url, "amqp://unused.invalid/", "st1", RESOURCES, bus="memory")
        async with daemon(setup.config()) as base, aiohttp.ClientSession() as session:
            doc = await wait_status(session, base, "every resource followed",
                                    lambda d: all(r["leader"] and r["polled_ago_s"] is not None
                                                  for r in d["resources"]))
            assert doc["version"] == __version__ and doc["role"] == "all"
            assert doc["started_at"].endswith("Z") and doc["uptime_s"] >= 0
            assert [r["resource"] for r in doc["resources"]] == setup.config().watch.enabled
            for row in doc["resources"]:
                assert set(row) == RESOURCE_KEYS
                assert row["mode"] in ("now", "cursor", "start_from")
                assert isinstance(row["lag_s"], float) and row["lag_s"] < 60 and not row["retention_alarm"]

            # Process-wide counters (earlier daemons of this test session count too): compare increments.
            host = by_resource(doc)["host"]
            received, before, applied = host["events_received"], host["events_published"], doc["sinks"][0]["applied"]
            sim.load.set_mix({"host.create": 1, "host.update": 3})
            sim.load.run(50)
            # The rate is null for the first second (a rate over less would be noise), then counts from start-up.
            doc = await wait_status(session, base, "the host changes published, applied and in the rate",
                                    lambda d: by_resource(d)["host"]["events_published"] >= before + 50
                                    and d["sinks"][0]["applied"] >= applied + 50
                                    and by_resource(d)["host"]["rate_per_s"])
            host = by_resource(doc)["host"]
            assert host["mode"] == "cursor" and host["cursor"]
            assert host["events_received"] >= received + 50
            (mirror,) = doc["sinks"]
            assert set(mirror) == SINK_KEYS
            # The memory bus hands batches straight to the sinks: nothing ever waits in a queue.
            assert mirror["sink"] == "mirror" and mirror["kind"] == "mirror" and mirror["queue_error"] is None
            assert mirror["resources"] == setup.config().sink_resources("mirror") and mirror["dead"] >= 0
            assert mirror["queue_depth"] == dict.fromkeys(setup.config().sink_resources("mirror"), 0)
            assert REGISTRY.get_sample_value("rwatch_queue_depth", {"sink": "mirror", "resource": "host"}) == 0

            get_logger("rwatch.test").error("status_probe_failed", resource="host", error="boom")
            doc = await get_status(session, base)
            newest = doc["recent_errors"][0]
            assert {k: newest[k] for k in ("event", "resource", "error")} == {
                "event": "status_probe_failed", "resource": "host", "error": "boom"}
            assert newest["time"].endswith("Z")

            async with session.get(f"{base}/") as resp:
                page = await resp.text()
                assert resp.status == 200 and resp.content_type == "text/html"
            # Self-contained: inline style and script, nothing fetched but /status.
            assert "<style>" in page and "<script>" in page and "<noscript>" in page
            assert "src=" not in page and "http://" not in page and "https://" not in page
            assert 'fetch("status"' in page


def test_rates_average_over_about_a_minute_of_samples() -> None:
    now = 100.0
    rates = Rates(lambda: now, window=60.0, every=5.0)
    assert rates.per_second({"host": 0.0}) is None
    rates.sample({"host": 0.0})
    now += 0.5
    assert rates.per_second({"host": 10.0}) is None  # over half a second, a rate would be noise
    for i in range(1, 30):  # 2 events per second for 145 s
        now = 100.0 + 5 * i
        rates.sample({"host": 10.0 * i})
    # Only the last 13 samples are kept: the rate is over the last minute, whatever the history.
    assert rates.per_second({"host": 290.0, "set": 0.0}) == {"host": 2.0, "set": 0.0}
    assert len(rates._samples) == 13


def test_error_tap_keeps_the_last_errors_of_structlog_and_stdlib(json_logs: io.StringIO) -> None:
    tap = ErrorTap(keep=3)
    logging.getLogger().addHandler(tap)
    try:
        log = get_logger("rwatch.watch", resource="set")
        log.warning("not_kept")  # below error level
        log.error("store_failed", error="database is locked", retry_in=0.2)
        try:
            raise ValueError("a bug")
        except ValueError:
            get_logger("rwatch.app").exception("task_crashed", task="watch:set")
        logging.getLogger("aiohttp.server").error("Error handling request %s", "/x")
        log.error("event_dead_lettered", reason="refused by the sink")
    finally:
        logging.getLogger().removeHandler(tap)
    entries = [{k: e[k] for k in ("event", "resource", "error")} for e in tap.recent]
    assert entries == [
        {"event": "task_crashed", "resource": None, "error": "ValueError: a bug"},
        {"event": "Error handling request /x", "resource": None, "error": None},
        {"event": "event_dead_lettered", "resource": "set", "error": "refused by the sink"},
    ]
    # The tap reads the event, it does not consume it: the JSON line is still written whole.
    assert '"event":"store_failed"' in json_logs.getvalue()


def test_install_error_tap_is_idempotent_and_survives_logging_setup(json_logs: io.StringIO) -> None:
    root = logging.getLogger()
    tap = install_error_tap()
    assert install_error_tap() is tap and root.handlers.count(tap) == 1
    get_logger("rwatch.test").error("tap_probe", error="x")
    assert recent_errors()[0]["event"] == "tap_probe"
    assert len(recent_errors()) <= error_tap.ERRORS_KEPT
    root.removeHandler(tap)


@pytest.fixture
def amqp_config(tmp_path: Path) -> Config:
    path = tmp_path / "rwatch.toml"
    path.write_text(f"""
[watch.resources.host]
enabled = true
[bus]
url = "amqp://guest:guest@127.0.0.1:1/"
[store]
url = "sqlite:///{tmp_path}/state.db"
[sinks.mirror]
kind = "mirror"
url = "sqlite:///{tmp_path}/mirror.db"
""")
    return load_config(path, environ={})


async def test_status_answers_while_the_broker_is_down(amqp_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = 0
    real_connect = aio_pika.connect

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return await real_connect(*args, **kwargs)  # port 1: refused

    monkeypatch.setattr(status_module.aio_pika, "connect", connect)
    status = Status(amqp_config, asyncio.Event(), role="consumer", owner="test")
    doc = await status.snapshot()
    assert doc["resources"] == []  # a consumer follows no resource
    (mirror,) = doc["sinks"]
    assert mirror["queue_depth"] is None and mirror["dead_queue_depth"] is None
    assert mirror["queue_error"] and "Connect" in mirror["queue_error"]
    assert REGISTRY.get_sample_value("rwatch_queue_depth", {"sink": "mirror", "resource": "host"}) is None
    # The failure is cached like a success: a page polling every 2 s does not hammer a broker that is down.
    for _ in range(5):
        assert (await status.snapshot())["sinks"][0]["queue_error"] == mirror["queue_error"]
    assert attempts == 1


async def test_a_broker_that_does_not_answer_costs_status_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def hang(*_: Any, **__: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(status_module.aio_pika, "connect", hang)
    depths = QueueDepths("amqp://x/", asyncio.Event(), timeout=0.05)
    started = time.monotonic()
    read = await depths.read(["q"])
    assert read.queues is None and read.error == "TimeoutError" and time.monotonic() - started < 1.0
    stopping = asyncio.Event()
    stopping.set()
    assert (await QueueDepths("amqp://x/", stopping).read(["q"])).error == "stopping"


@pytest.mark.amqp
async def test_queue_depths_come_from_the_broker(amqp_url: str, tmp_path: Path, unique: str) -> None:
    setup = Setup(tmp_path, "http://127.0.0.1:1", amqp_url, unique, ["host", "biz"])
    config = setup.config()
    status = Status(config, asyncio.Event(), role="consumer", owner="test")
    try:
        # Before any consumer declared them, the queues do not exist: unknown, not an error.
        sinks = await status.sink_rows()
        assert sinks[0]["queue_depth"] == {"host": None, "biz": None} and sinks[0]["queue_error"] is None
        conn = await aio_pika.connect(amqp_url)
        try:
            channel = await conn.channel()
            exchange = await declare_topology(channel, config)
            for _ in range(3):
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="cmdb.host.create")
        finally:
            await conn.close()
        assert status.depths is not None
        await status.depths.close()
        status.depths = QueueDepths(amqp_url, status.stop, ttl=0.0)  # no cache: read again at once
        (mirror,) = await status.sink_rows()
        assert mirror["queue_depth"] == {"host": 3, "biz": 0} and mirror["dead_queue_depth"] == 0
        assert REGISTRY.get_sample_value("rwatch_queue_depth", {"sink": "mirror", "resource": "host"}) == 3
    finally:
        assert status.depths is not None
        await status.depths.close()
        await delete_topology(setup)
