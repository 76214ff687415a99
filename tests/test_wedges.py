"""No configuration can wedge a watcher (issue 12, point 8).

A resource whose events no sink of the configuration takes, or a ``--role watcher`` with no sink at all, is refused
at start: exit 2, naming the key, the file and the fix (``bus.publish_only`` is the explicit mode for consumers that
live elsewhere, tested in ``tests/integration/test_publish_only.py``). A watcher that keeps crashing fails
``/readyz`` with its last error until it runs again; it never just vanishes from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import rwatch.app as app_module
from rwatch.app import run_async
from rwatch.cmdb import protocol as p
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.watch.batch import Batch
from rwatch.watch.watcher import Watcher
from tests.entrypoint import RWATCH
from tests.test_refusals import daemon_config, readyz, until

# Nothing listens here: a refused configuration must be refused before rwatch touches the broker or CMDB.
NOWHERE = 'base_url = "http://127.0.0.1:1"\n'


def write(tmp_path: Path, body: str, bus: str = 'kind = "amqp"\nurl = "amqp://guest:guest@127.0.0.1:1/"') -> Path:
    path = tmp_path / "rwatch.toml"
    path.write_text(f"""[cmdb]
{NOWHERE}
[watch.resources.host]
enabled = true
[watch.resources.host_relation]
enabled = false
[watch.resources.biz]
enabled = true
[watch.resources.set]
enabled = false
[watch.resources.module]
enabled = false
[bus]
{bus}
[store]
url = "sqlite:///{tmp_path}/state.db"
[http]
listen = "127.0.0.1:0"
{body}""")
    return path


def rwatch(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
    return subprocess.run([RWATCH, *args], capture_output=True, text=True, timeout=60, env=env)


MIRROR_FOR_HOST = '[sinks.m]\nkind = "mirror"\nurl = "sqlite:///{tmp}/m.db"\nresources = ["host"]\n'


@pytest.mark.parametrize(("case", "role", "key", "words"), [
    # A watcher whose configuration names no sink: every publish would be returned, retried for ever.
    ("no_sink", "watcher", "[sinks]", ["no enabled sink", "bus.publish_only = true"]),
    ("no_sink", "all", "[sinks]", ["no enabled sink", "bus.publish_only = true"]),
    # biz is followed, but the only sink takes host alone: biz would wait for a queue for ever.
    ("host_only_sink", "all", "[watch.resources.biz.enabled]",
     ["'biz' is followed but no enabled sink takes it", "sinks.m.resources = ['host']", "bus.publish_only"]),
    ("host_only_sink", "watcher", "[watch.resources.biz.enabled]", ["no enabled sink takes it"]),
    # With the memory bus the same watcher used to crash and restart in a loop.
    ("host_only_sink_memory", "all", "[watch.resources.biz.enabled]", ["no enabled sink takes it"]),
])
def test_a_configuration_that_would_wedge_a_watcher_is_refused_at_start(
        tmp_path: Path, case: str, role: str, key: str, words: list[str]) -> None:
    sink = "" if case == "no_sink" else MIRROR_FOR_HOST.format(tmp=tmp_path)
    path = write(tmp_path, sink, 'kind = "memory"') if case.endswith("memory") else write(tmp_path, sink)
    for command in (["run", "--role", role], ["check-config", "--role", role]):
        proc = rwatch(*command, "--config", str(path))
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert f"{path}: {key}" in proc.stderr, proc.stderr
        for word in words:
            assert word in proc.stderr, proc.stderr
    assert not (tmp_path / "state.db").exists()  # refused before anything was opened


def test_the_same_configurations_are_fine_where_they_wedge_nothing(tmp_path: Path) -> None:
    # A consumer does not publish; publish_only says the consumers are configured elsewhere.
    path = write(tmp_path, MIRROR_FOR_HOST.format(tmp=tmp_path))
    assert rwatch("check-config", "--role", "consumer", "--config", str(path)).returncode == 0
    path = write(tmp_path, "", 'kind = "amqp"\npublish_only = true')
    proc = rwatch("check-config", "--role", "watcher", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "publish_only = true" in proc.stdout
    # publish_only means nothing to the memory bus: its only consumers are this process's sinks.
    path = write(tmp_path, MIRROR_FOR_HOST.format(tmp=tmp_path), 'kind = "memory"\npublish_only = true')
    proc = rwatch("check-config", "--config", str(path))
    assert proc.returncode == 2 and f"{path}: [bus.publish_only]" in proc.stderr, proc.stderr


# --- a watcher that keeps crashing --------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=0.5, error_delay=0.0, hosts=4)) as s:
        yield s


async def test_a_crashing_watcher_fails_readyz_with_its_error_until_it_runs_again(
        tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = True
    normalize = Watcher.normalize

    def buggy(self: Watcher, reply: p.WatchReply) -> Batch:
        if broken:
            raise RuntimeError("a bug in normalize")
        return normalize(self, reply)

    monkeypatch.setattr(Watcher, "normalize", buggy)
    # Restarts within a tenth of a second instead of the production 1 s doubling: the policy is under test.
    monkeypatch.setattr(app_module, "SUPERVISOR", dataclasses.replace(app_module.SUPERVISOR, initial=0.05,
                                                                       maximum=0.1))
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    daemon = asyncio.create_task(run_async(daemon_config(tmp_path, sim), stop, http_port=port))
    try:
        http = await asyncio.wait_for(port, 30)

        async def crashed(times: int) -> dict[str, Any] | None:
            status, body = await readyz(http)
            check = body["checks"].get("watch:host")
            if check is not None and check["crashes"] >= times:
                assert status == 503 and body["status"] == "not_ready" and "watch:host" in body["failing"]
                return check
            return None

        check = await until(lambda: crashed(1))
        assert check["ok"] is False and check["error"] == "RuntimeError: a bug in normalize"
        assert "task_crashed" in check["fix"]
        # It keeps crashing and keeps failing: the check never drops out between two crashes.
        later = await until(lambda: crashed(3))
        assert later["since"] == check["since"]

        broken = False  # fixed (in real life: a new release); the next restart runs

        async def ready() -> bool:
            status, body = await readyz(http)
            return status == 200 and "watch:host" not in body["checks"] and "poll:host" in body["checks"]

        await until(ready)
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 30)
