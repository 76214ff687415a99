"""/readyz: the dependencies answer, every followed resource polled recently, no lag past 2/3 of retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rwatch import progress
from rwatch.app import readiness
from rwatch.bus.memory import MemoryBus
from rwatch.config import Config, load_config
from rwatch.http import serve_http
from rwatch.progress import WatchHealth, WatchState
from rwatch.store.base import open_store
from tests.configs import only


class FakeWatcher(WatchState):
    """A published state whose health is given."""

    def __init__(self, health: WatchHealth) -> None:
        super().__init__(health.resource, "test", 3 * 3600.0)
        self._health = health

    def health(self) -> WatchHealth:
        return self._health


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "rwatch.toml"
    path.write_text(f'[watch]\nretention = "3h"\n[store]\nurl = "sqlite:///{tmp_path}/state.db"\n')
    return load_config(path, environ={})


@pytest.fixture
async def watched() -> AsyncIterator[list[FakeWatcher]]:
    fakes: list[FakeWatcher] = []
    yield fakes
    for fake in fakes:
        progress.withdraw(fake)


def follow(fakes: list[FakeWatcher], health: WatchHealth) -> None:
    fake = FakeWatcher(health)
    fakes.append(fake)
    progress.publish(fake)


async def readyz(checks: dict[str, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    async def ready() -> dict[str, dict[str, Any]]:
        return checks

    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve_http("127.0.0.1:0", lambda: True, stop, bound, ready=ready))
    port = await asyncio.wait_for(bound, 10)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status, await resp.json()
    finally:
        stop.set()
        await server


async def test_readiness_reports_each_dependency_and_resource(config: Config, watched: list[FakeWatcher]) -> None:
    bus = MemoryBus()
    store = open_store(config.store.url.get_secret_value())
    await store.open()
    try:
        follow(watched, WatchHealth("host", lag=1.0, cursor_age=3.0, retention_alarm=False, polled_ago=0.5))
        checks = await readiness(config, bus, store, None)
        assert checks["bus"] == {"ok": False}  # not started yet
        await bus.start()
        checks = await readiness(config, bus, store, None)
        assert checks["bus"]["ok"] and checks["store"]["ok"]
        assert checks["poll:host"]["ok"] and checks["lag:host"] == {"ok": True, "lag_s": 1.0, "limit_s": 7200.0}
        # Past two thirds of retention: history is about to be lost.
        follow(watched, WatchHealth("set", lag=7300.0, cursor_age=7300.0, retention_alarm=True, polled_ago=1.0))
        # Not polled for longer than a long-poll and its timeout allow: stuck.
        follow(watched, WatchHealth("biz", lag=0.0, cursor_age=None, retention_alarm=False, polled_ago=500.0))
        checks = await readiness(config, bus, store, None)
        assert not checks["lag:set"]["ok"] and checks["lag:set"]["lag_s"] == 7300.0
        assert not checks["poll:biz"]["ok"] and checks["lag:biz"]["ok"]
    finally:
        await store.close()
    checks = await readiness(config, None, store, None)  # closed: unreachable
    assert not checks["store"]["ok"] and checks["store"]["error"]


async def test_readyz_answers_503_naming_what_fails() -> None:
    status, body = await readyz({"bus": {"ok": True}, "lag:host": {"ok": True}})
    assert status == 200 and body["status"] == "ready"
    status, body = await readyz({"bus": {"ok": True}, "lag:host": {"ok": False, "lag_s": 9000}})
    assert status == 503 and body["status"] == "degraded" and body["failing"] == ["lag:host"]
    status, body = await readyz({"bus": {"ok": False}, "lag:host": {"ok": False}})
    assert status == 503 and body["status"] == "not_ready" and body["failing"] == ["bus", "lag:host"]


@pytest.mark.amqp
async def test_readyz_follows_the_broker(tmp_path: Path, amqp_url: str) -> None:
    """Stop RabbitMQ: /readyz answers 503 naming the bus; start it: 200 again."""
    from rwatch.app import run_async
    from rwatch.sim.parts import SimOptions
    from rwatch.sim.server import Simulator
    from tests.integration.harness import rabbitmqctl

    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01)) as sim:
        path = tmp_path / "rwatch.toml"
        path.write_text(f"""
[cmdb]
base_url = "{sim.url}"
rate_limit = 0
{only("host")}
[bus]
url = "{amqp_url}"
exchange = "readyz-{tmp_path.name}"
queue_prefix = "readyz-{tmp_path.name}"
[store]
url = "sqlite:///{tmp_path}/state.db"
[sinks.events]
kind = "jsonl"
path = "{tmp_path}/events.jsonl"
[http]
listen = "127.0.0.1:0"
""")
        # The sink is not run by a watcher; it is there so that the events have a queue (a watcher whose events
        # no queue receives is refused at start, issue 12).
        stop = asyncio.Event()
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_async(load_config(path, environ={}), stop, role="watcher", http_port=port))
        url = f"http://127.0.0.1:{await asyncio.wait_for(port, 30)}/readyz"

        async def until(status: int, timeout: float = 90) -> dict[str, Any]:
            deadline = asyncio.get_running_loop().time() + timeout
            async with aiohttp.ClientSession() as session:
                while True:
                    async with session.get(url) as resp:
                        body: dict[str, Any] = await resp.json()
                        if resp.status == status:
                            return body
                    assert asyncio.get_running_loop().time() < deadline, body
                    await asyncio.sleep(0.2)

        try:
            await until(200)
            await rabbitmqctl("stop_app")
            try:
                body = await until(503)
                assert "bus" in body["failing"] and body["status"] == "not_ready"
            finally:
                await rabbitmqctl("start_app")
                await rabbitmqctl("await_startup")
            body = await until(200)
            assert body["checks"]["bus"] == {"ok": True} and body["checks"]["poll:host"]["ok"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            import aio_pika

            connection = await aio_pika.connect(amqp_url)
            async with connection, connection.channel() as channel:
                for queue in (f"readyz-{tmp_path.name}.events.host", f"readyz-{tmp_path.name}.events.dead"):
                    await channel.queue_delete(queue)
                for name in (f"readyz-{tmp_path.name}", f"readyz-{tmp_path.name}.dlx"):
                    await channel.exchange_delete(name)
