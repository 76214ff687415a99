"""End to end: ``rwatch cursors reset`` (the real command, in a subprocess) moves the position, and the daemon
(in-process, against the simulator, memory bus, SQLite mirror) resumes from exactly there.

Two separated bursts of simulator changes: host A, then (seconds later) hosts B and C. A reset to a time
between them must bring B and C into the mirror and not A; a start "from now" would bring only the newest,
a start from the old cursor all three. The simulator is spied on to see the ``bk_start_from`` it was asked
for. ``watch.lookback = 0``: a watcher that reaches the start time through 1103007 recovery (the stored
marker is no CMDB cursor) resumes from ``event_time − lookback``, so the test holds with and without a
watcher that reads the marker directly.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

import rwatch.sim.server as sim_server
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from tests.integration.harness import Setup
from tests.integration.test_apply_e2e import rwatch_all

HOST = "host"


def make_setup(tmp_path: Path, sim: Simulator, bootstrap: str = "now") -> Setup:
    setup = Setup(tmp_path, sim.url, "amqp://unused", "reset", [HOST], bus="memory", bootstrap=bootstrap)
    text = setup.path.read_text()
    assert 'lookback = "5m"' in text
    setup.path.write_text(text.replace('lookback = "5m"', 'lookback = "0s"'))
    return setup


async def cli(setup: Setup, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rwatch.cli", "cursors", *args, "-c", str(setup.path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def mirror_hosts(setup: Setup) -> dict[str, Any]:
    path = setup.tmp / f"mirror-{setup.unique}.db"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as conn:
        try:
            rows = conn.execute("SELECT key, data FROM rwatch_objects WHERE resource = ? AND NOT deleted",
                                (HOST,)).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return {}
    return {key: orjson.loads(data) for key, data in rows}


async def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def second_after(sec: int) -> None:
    """Sleep until the wall clock (the simulator's cluster time) is past ``sec``."""
    await asyncio.sleep(max(0.0, sec + 1 - time.time()) + 0.02)
    assert int(time.time()) > sec


async def test_daemon_resumes_from_a_reset_by_duration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    answer = sim_server.answer_start_from

    def spy(state: Any, req: Any) -> Any:
        if req.resource == HOST:
            asked.append(req.start_from)
        return answer(state, req)

    monkeypatch.setattr(sim_server, "answer_start_from", spy)
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01)) as sim:
        setup = make_setup(tmp_path, sim)
        # Follow for a moment, so a real cursor is saved (the old position a reset replaces). From now, CMDB
        # hands out its newest event: that host is in the mirror from then on.
        async with rwatch_all(setup):
            await wait_for(lambda: sim.stats.watch_count(HOST, "cursor") >= 1)
            await wait_for(lambda: bool(mirror_hosts(setup)))
        first = set(mirror_hosts(setup))
        a, b, c = sorted(set(sim.state.objects(HOST)) - first, key=int)[:3]
        async with open_store(setup.store_url) as store:
            old = await store.load("0", HOST)
        assert old is not None
        assert old.mode == "cursor"

        await second_after(int(time.time()))
        sim.state.update(HOST, a, {"bk_host_name": "before-the-reset"})
        a_sec = int(time.time())
        await second_after(a_sec + 4)  # B and C five seconds or more after A
        sim.state.update(HOST, b, {"bk_host_name": "after-the-reset-1"})
        sim.state.update(HOST, c, {"bk_host_name": "after-the-reset-2"})
        b_sec = sim.state.chain_of(HOST).newest.sec  # type: ignore[union-attr]
        assert b_sec >= a_sec + 5

        # Back 3 s from now: a start between A and B (the subprocess takes about a second to start).
        code, out, err = await cli(setup, "reset", HOST, "--by-duration", "3s", "--execute", "--json")
        assert code == 0, err
        plan = json.loads(out)
        assert plan["applied"] is True
        assert plan["old"]["cursor"] == old.cursor
        start = plan["new"]["start_from"]
        assert a_sec <= start < b_sec

        code, out, err = await cli(setup, "list", "--json")
        assert code == 0, err
        (row,) = [r for r in json.loads(out)["resources"] if r["resource"] == HOST]
        assert (row["mode"], row["start_from"]) == ("start_from", start)

        async with rwatch_all(setup):
            await wait_for(lambda: {b, c} <= set(mirror_hosts(setup)))
            await asyncio.sleep(1.5)  # a further poll, in case anything else were to come
        assert asked[:1] == [start]
        hosts = mirror_hosts(setup)
        assert set(hosts) - first == {b, c}, "A predates the reset, and everything else predates A"
        assert hosts[b]["bk_host_name"] == "after-the-reset-1"
        assert hosts[c]["bk_host_name"] == "after-the-reset-2"

        async with open_store(setup.store_url) as store:
            resumed = await store.load("0", HOST)
            gaps = await store.gaps("0", HOST)
        assert resumed is not None
        assert resumed.mode == "cursor"  # the daemon moved on to CMDB's own cursors
        assert resumed.event_time == b_sec
        assert gaps == []


async def test_a_reset_to_now_starts_from_now_without_a_bootstrap_gap(tmp_path: Path) -> None:
    async with Simulator(SimOptions(port=0, hold=1.0, error_delay=0.01)) as sim:
        setup = make_setup(tmp_path, sim, bootstrap="resync")
        code, _, err = await cli(setup, "reset", HOST, "--to-now", "--execute")
        assert code == 0, err
        newest = sim.state.chain_of(HOST).newest
        assert newest is not None
        async with rwatch_all(setup):
            await wait_for(lambda: sim.stats.watch_count(HOST, "cursor") >= 1)
            await wait_for(lambda: bool(mirror_hosts(setup)))
        assert sim.stats.watch_count(HOST, "now") >= 1
        assert sim.stats.watch_count(HOST, "start_from") == 0
        # From now is CMDB's newest event on: that one host only, and no resync was run for a bootstrap gap.
        assert set(mirror_hosts(setup)) == {newest.key}
        assert not sim.stats.lists
        async with open_store(setup.store_url) as store:
            assert await store.gaps("0", HOST, open_only=False) == []
            saved = await store.load("0", HOST)
        assert saved is not None
        assert saved.cursor == newest.cursor
