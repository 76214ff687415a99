"""The process around the watchers: supervision, the HTTP endpoints, `rwatch health`, `rwatch sim`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from rwatch.app import run_async, supervise
from rwatch.config import load_config
from rwatch.errors import ConfigError
from rwatch.http import serve_http
from tests.entrypoint import RWATCH


async def test_supervise_restarts_a_task_that_dies_of_a_bug() -> None:
    stop = asyncio.Event()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("a bug")

    before = REGISTRY.get_sample_value("rwatch_task_crashes_total", {"task": "t"}) or 0.0
    import dataclasses

    import rwatch.app as app_module

    # One-millisecond pauses instead of the production 1 s: the policy, not the clock, is under test.
    original = app_module.SUPERVISOR
    app_module.SUPERVISOR = dataclasses.replace(original, initial=0.001, maximum=0.002)
    try:
        await asyncio.wait_for(supervise("t", flaky, stop), 10)
    finally:
        app_module.SUPERVISOR = original
    assert runs == 3
    assert (REGISTRY.get_sample_value("rwatch_task_crashes_total", {"task": "t"}) or 0.0) == before + 2


async def test_supervise_ends_when_stopping() -> None:
    stop = asyncio.Event()
    stop.set()
    called = False

    async def never() -> None:
        nonlocal called
        called = True

    await supervise("t", never, stop)
    assert not called


@pytest.mark.parametrize(("env", "role", "key"), [
    ({"RWATCH_BUS__KIND": "memory"}, "watcher", "bus.kind"),
    ({"RWATCH_BUS__KIND": "memory"}, "consumer", "bus.kind"),
    ({"RWATCH_BUS__KIND": "memory", "RWATCH_SINKS__M__KIND": "mirror", "RWATCH_SINKS__M__ENABLED": "false"},
     "all", "sinks"),
])
async def test_memory_bus_needs_one_process_with_sinks(env: dict[str, str], role: str, key: str,
                                                      tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    cfg = load_config(tmp_path / "empty.toml", environ=env)
    with pytest.raises(ConfigError) as info:
        await run_async(cfg, asyncio.Event(), role=role)  # type: ignore[arg-type]
    assert info.value.key == key


async def test_healthz_and_metrics(tmp_path: Path) -> None:
    stop = asyncio.Event()
    alive = True
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve_http("127.0.0.1:0", lambda: alive, stop, bound))
    port = await asyncio.wait_for(bound, 10)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                names = {f.name for f in text_string_to_metric_families(await resp.text())}
            assert {"rwatch_watch_requests", "rwatch_events_published", "rwatch_cursor_gaps"} <= names
            alive = False
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 503
            alive = True
            # `rwatch health`, the container's health check, reads the same endpoint.
            config = tmp_path / "health.toml"
            config.write_text(f'[http]\nlisten = "0.0.0.0:{port}"\n')
            ok = await asyncio.create_subprocess_exec(RWATCH, "health", "--config",
                                                      str(config))
            assert await ok.wait() == 0
    finally:
        stop.set()
        await server
    down = await asyncio.create_subprocess_exec(
        RWATCH, "health", stderr=subprocess.PIPE,
        env={"RWATCH_HTTP__LISTEN": f"127.0.0.1:{port}", "PATH": ""},
    )
    _, err = await down.communicate()
    assert down.returncode == 1 and b"healthz" in err


def test_sim_command_refuses_bad_options_with_exit_2() -> None:
    for args, words in ((["--listen", "nowhere"], "--listen"), (["--retention", "soon"], "--retention"),
                        (["--deny", "hosts"], "--deny"), (["--load-mix", "[1]"], "--load-mix")):
        proc = subprocess.run([RWATCH, "sim", *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


async def test_sim_command_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        RWATCH, "sim", "--listen", "127.0.0.1:0", "--hold", "1", "--hosts", "5",
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert started["event"] == "sim_started"
        auth = {"X-Bkapi-Authorization": json.dumps({"bk_app_code": "a", "bk_app_secret": "b", "bk_username": "u"})}
        async with aiohttp.ClientSession() as session, session.post(
            f"{started['url']}/api/v3/event/watch/resource/host", json={"bk_fields": ["bk_host_id"]}, headers=auth
        ) as resp:
            reply = await resp.json()
        assert reply["result"] is True and reply["data"]["bk_watched"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


def test_dlq_commands_exit_1_naming_the_broker_problem() -> None:
    proc = subprocess.run([RWATCH, "dlq", "list"], capture_output=True, text=True, timeout=60,
                          env={"RWATCH_BUS__URL": "amqp://guest:guest@127.0.0.1:1/", "PATH": ""})
    assert proc.returncode == 1 and "cannot reach the broker" in proc.stderr
    proc = subprocess.run([RWATCH, "dlq", "replay", "--sink", "nope"], capture_output=True,
                          text=True, timeout=60, env={"PATH": ""})
    assert proc.returncode == 2 and "'nope' is not an enabled sink" in proc.stderr
