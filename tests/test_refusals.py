"""A refused watcher (credentials, grant, tenant, IAM): one clear error naming the fix, /readyz fails with it, a slow
retry, and a grant made later is picked up without a restart (cmdb-watch-api §10, issue 11)."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rwatch.app import run_async
from rwatch.config import Config, load_config
from rwatch.logs import setup_logging
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from tests.configs import only


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=0.5, error_delay=0.0, hosts=4)) as s:
        yield s


def daemon_config(tmp_path: Path, sim: Simulator, extra: str = "") -> Config:
    path = tmp_path / "rwatch.toml"
    path.write_text(f"""
[cmdb]
base_url = "{sim.url}"
rate_limit = 0
refusal_retry = "2s"
{extra}
{only("host")}
[bus]
kind = "memory"
[store]
url = "sqlite:///{tmp_path}/state.db"
[sinks.mirror]
kind = "mirror"
url = "sqlite:///{tmp_path}/mirror.db"
[http]
listen = "127.0.0.1:0"
""")
    return load_config(path, environ={})


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


async def until(check: Any, timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def mirror_hosts(tmp_path: Path) -> int:
    path = tmp_path / "mirror.db"
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return int(db.execute("SELECT count(*) FROM rwatch_objects WHERE resource = 'host'").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet
            return 0


async def test_iam_refusal_fails_readyz_with_the_fix_retries_slowly_and_heals_without_restart(
        tmp_path: Path, sim: Simulator) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    sim.denied.add("host")  # 9900403 with a permission object for watch_host_event
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    daemon = asyncio.create_task(run_async(daemon_config(tmp_path, sim), stop, http_port=port))
    try:
        http = await asyncio.wait_for(port, 30)

        async def refused() -> dict[str, Any] | None:
            status, body = await readyz(http)
            return body if status == 503 and "cmdb:host" in body.get("failing", []) else None

        body = await until(refused)
        check = body["checks"]["cmdb:host"]
        assert body["status"] == "not_ready" and check["reason"] == "permission" and check["code"] == 9900403
        assert "watch_host_event" in check["fix"]
        # Wait for a second refusal: both log lines say the pause, which is cmdb.refusal_retry, not the 0.8 s
        # doubling of a transient failure (the old behaviour: a hot loop at first).
        async def refused_twice() -> bool:
            return stream.getvalue().count('"cmdb_refused"') >= 2
        await until(refused_twice, timeout=20)
        lines = [json.loads(line) for line in stream.getvalue().splitlines() if '"cmdb_refused"' in line]
        assert all(1.7 <= line["retry_in"] <= 2.3 for line in lines), [line["retry_in"] for line in lines]
        assert lines[0]["level"] == "error" and "watch_host_event" in lines[0]["fix"]
        assert await mirror_hosts(tmp_path) == 0  # nothing flows while refused

        sim.denied.clear()  # the administrators granted the action: no restart needed

        async def ready() -> bool:
            status, _ = await readyz(http)
            return status == 200
        await until(ready)

        async def mirrored() -> bool:
            return await mirror_hosts(tmp_path) > 0
        await until(mirrored)
        assert '"cmdb_accepted"' in stream.getvalue()
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 30)
