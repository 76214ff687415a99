"""``rwatch cursors list|reset`` through the real command line (``typer.testing.CliRunner`` on ``rwatch.cli.app``),
against a SQLite store in the test's folder; the stored forms of a reset round-trip on both SQL backends; and
the watcher's reading of a reset position (no bootstrap gap for "from now")."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rwatch.cli import app
from rwatch.cmdb.protocol import NO_EVENT_CURSOR, Cursor
from rwatch.config import load_config
from rwatch.store.base import open_store
from rwatch.store.records import START_FROM_PREFIX, CursorState
from rwatch.watch.watcher import Watcher

RETENTION = 3 * 3600.0
OTHER = "otherhost:4242:cafe"


def sync(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "rwatch.toml"
    path.write_text(f"""
[watch]
retention = "3h"
bootstrap = "resync"
[store]
url = "sqlite:///{tmp_path}/state.db"
""")
    return path


def store_url(cfg_path: Path) -> str:
    return load_config(cfg_path, environ={}).store.url.get_secret_value()


def cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def cursor_at(sec: int, inc: int = 1) -> str:
    return Cursor(2, "65a0c0de0000000000000001", "update", sec, inc).encode()


async def seed(url: str, *states: CursorState) -> None:
    async with open_store(url) as store:
        for state in states:
            await store.save(state)


async def load(url: str, resource: str = "host") -> CursorState | None:
    async with open_store(url) as store:
        return await store.load("0", resource)


# --- the stored forms ---------------------------------------------------------------------------------


def test_cursor_state_modes() -> None:
    now = time.time()
    real = CursorState.from_cursor("0", "host", cursor_at(int(now)))
    assert (real.mode, real.start_from) == ("cursor", None)
    assert CursorState.from_cursor("0", "host", NO_EVENT_CURSOR).mode == "cursor"
    fresh = CursorState.from_now("0", "host", saved_at=now)
    assert (fresh.mode, fresh.cursor, fresh.start_from, fresh.event_time) == ("now", "", None, None)
    assert fresh.saved_at == now
    start = CursorState.starting_at("0", "host", 1_732_000_000, saved_at=now)
    assert start.cursor == f"{START_FROM_PREFIX}1732000000"
    assert (start.mode, start.start_from, start.event_time, start.version) == ("start_from", 1_732_000_000,
                                                                               1_732_000_000.0, None)
    # Not a marker after all: a cursor like any other (CMDB will refuse it, the watcher recovers by time).
    odd = CursorState("0", "host", f"{START_FROM_PREFIX}soon", None, None, now)
    assert (odd.mode, odd.start_from) == ("cursor", None)


async def test_reset_positions_round_trip(db_url: str) -> None:
    fresh = CursorState.from_now("0", "host", saved_at=1_732_600_000.5)
    start = CursorState.starting_at("0", "set", 1_732_590_000, saved_at=1_732_600_000.5)
    async with open_store(db_url) as store:
        await store.save(fresh)
        fence = await store.acquire("0", "set", "me", 10.0)
        await store.save(start, fence=fence)
        assert await store.load("0", "host") == fresh
        assert await store.load("0", "set") == start
        assert [s.mode for s in await store.states()] == ["now", "start_from"]


async def test_watcher_starts_a_reset_to_now_from_now_without_a_bootstrap_gap(cfg_path: Path) -> None:
    cfg = load_config(cfg_path, environ={})
    assert cfg.watch.bootstrap == "resync"

    class Client:
        def server_now(self) -> float:
            return time.time()

    async with open_store(store_url(cfg_path)) as store:
        watcher = Watcher("host", settings=cfg.watch.resources["host"], watch=cfg.watch, tenant="0",
                          client=Client(), bus=None, store=store, stop=asyncio.Event())  # type: ignore[arg-type]
        position = await watcher._initial_position(CursorState.from_now("0", "host"))
        assert position.mode == "now"
        assert await store.gaps() == []
        # Nothing saved at all is the other case: from now too, but the history before is a gap.
        position = await watcher._initial_position(None)
        assert position.mode == "now"
        assert [g.reason for g in await store.gaps()] == ["bootstrap"]


# --- rwatch cursors list ------------------------------------------------------------------------------


def test_list_shows_saved_cursors_gaps_and_leases(cfg_path: Path) -> None:
    url = store_url(cfg_path)
    now = time.time()
    sec = int(now) - 600

    async def prepare() -> None:
        async with open_store(url) as store:
            await store.save(CursorState.from_cursor("0", "host", cursor_at(sec), saved_at=now - 30))
            await store.save(CursorState.starting_at("0", "process", int(now) - 100, saved_at=now - 5))
            await store.add_gap("0", "host", now - 4000, now - 3000, "cursor_expired")
            await store.add_gap("0", "host", now - 2000, now - 1900, "start_out_of_window")
            filled = await store.add_gap("0", "host", now - 5000, now - 4500, "cursor_expired")
            await store.fill_gap(filled.id, now)
            await store.acquire("0", "set", OTHER, 60.0)
            await store.acquire("0", "module", "gone:1:00", 1.0, now=now - 100)  # expired long ago

    sync(prepare())
    result = cli("cursors", "list", "-c", str(cfg_path), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {r["resource"]: r for r in doc["resources"]}
    # Every enabled resource, plus the disabled one that has a saved position.
    assert list(rows) == ["host", "host_relation", "biz", "set", "module", "process"]
    assert doc["tenant"] == "0"
    assert doc["retention"] == RETENTION

    host = rows["host"]
    assert host["enabled"] is True
    assert host["mode"] == "cursor"
    assert host["cursor"] == cursor_at(sec)
    assert host["event_time"] == float(sec)
    assert host["cursor_age"] == pytest.approx(now - sec, abs=5)
    assert host["saved_ago"] == pytest.approx(30, abs=5)
    assert host["gaps_open"] == 2  # the filled one does not count
    assert host["gap_seconds"] == pytest.approx(1100)
    assert sorted(g["reason"] for g in host["gaps"]) == ["cursor_expired", "start_out_of_window"]
    assert host["lease"] is None

    assert rows["biz"]["mode"] == "none"
    assert rows["biz"]["cursor_age"] is None
    assert rows["set"]["lease"]["owner"] == OTHER
    assert rows["set"]["lease"]["live"] is True
    assert rows["set"]["lease"]["expires_in"] == pytest.approx(60, abs=5)
    assert rows["module"]["lease"]["live"] is False

    process = rows["process"]
    assert (process["enabled"], process["mode"], process["start_from"]) == (False, "start_from", int(now) - 100)

    table = cli("cursors", "list", "-c", str(cfg_path))
    assert table.exit_code == 0, table.output
    for text in ("host", "cursor", "start_from", "process (disabled)", OTHER, "2 (18m20s)", "free"):
        assert text in table.stdout


def test_list_of_a_missing_sqlite_store_creates_nothing(cfg_path: Path, tmp_path: Path) -> None:
    result = cli("cursors", "list", "-c", str(cfg_path), "--json")
    assert result.exit_code == 0, result.output
    assert {r["mode"] for r in json.loads(result.stdout)["resources"]} == {"none"}
    assert not (tmp_path / "state.db").exists()


def test_an_unreachable_store_exits_1_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pg.toml"
    path.write_text('[store]\nurl = "postgresql://rwatch:secret@127.0.0.1:1/nothing"\n')
    for args in (["list"], ["reset", "host", "--to-now", "--execute"]):
        result = cli("cursors", *args, "-c", str(path))
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert "cursor store" in lines[0]
        assert "secret" not in lines[0]


# --- rwatch cursors reset -----------------------------------------------------------------------------


def test_dry_run_changes_nothing(cfg_path: Path) -> None:
    url = store_url(cfg_path)
    saved = CursorState.from_cursor("0", "host", cursor_at(int(time.time()) - 60))
    sync(seed(url, saved))
    for target in (["--to-now"], ["--by-duration", "30m"], ["--to-time", str(int(time.time()) - 7200)]):
        result = cli("cursors", "reset", "host", *target, "-c", str(cfg_path))
        assert result.exit_code == 0, result.output
        assert "dry run: pass --execute to apply" in result.stdout
        assert "old: cursor at event time" in result.stdout
    assert sync(load(url)) == saved


def test_dry_run_json_shows_old_and_new(cfg_path: Path) -> None:
    url = store_url(cfg_path)
    sec = int(time.time()) - 60
    sync(seed(url, CursorState.from_cursor("0", "host", cursor_at(sec))))
    result = cli("cursors", "reset", "host", "--by-duration", "1h", "-c", str(cfg_path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["execute"], plan["applied"], plan["refused"]) == (False, False, False)
    assert plan["old"]["mode"] == "cursor"
    assert plan["old"]["event_time"] == float(sec)
    assert plan["new"]["mode"] == "start_from"
    assert plan["effect"] == "replay"
    assert plan["effect_seconds"] == pytest.approx(3600 - 60 + 1, abs=3)


def test_execute_by_duration_sets_now_minus_d(cfg_path: Path) -> None:
    url = store_url(cfg_path)
    sync(seed(url, CursorState.from_cursor("0", "host", cursor_at(int(time.time()) - 60))))
    before = time.time()
    result = cli("cursors", "reset", "host", "--by-duration", "30m", "--execute", "-c", str(cfg_path))
    assert result.exit_code == 0, result.output
    assert "dry run" not in result.stdout
    state = sync(load(url))
    assert state is not None
    assert state.mode == "start_from"
    # bk_start_from is the second before now − 30m: CMDB returns what comes strictly after it.
    assert state.start_from == pytest.approx(before - 1800, abs=2)
    assert state.event_time == state.start_from
    assert state.saved_at == pytest.approx(time.time(), abs=5)

    async def lease_after() -> tuple[int | None, int | None]:
        async with open_store(url) as store:
            (lease,) = await store.leases("0")
            assert lease.owner.startswith("rwatch-cursors-reset:")
            assert lease.expires_at == 0.0  # released, not left to expire
            # So a daemon takes the resource at once, with a fence above the reset's.
            return lease.fence, await store.acquire("0", "host", "daemon", 10.0)

    reset_fence, daemon_fence = sync(lease_after())
    assert daemon_fence == (reset_fence or 0) + 1


def test_execute_to_time_iso_and_unix_seconds(cfg_path: Path) -> None:
    url = store_url(cfg_path)
    when = int(time.time()) - 3600
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    for given in (f"{iso}Z", iso, f"{iso}+00:00", str(when), f"{when}.75"):
        result = cli("cursors", "reset", "host", "--to-time", given, "--execute", "-c", str(cfg_path))
        assert result.exit_code == 0, (given, result.output)
        state = sync(load(url))
        assert state is not None
        assert state.start_from == when - 1, given
    offset = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when + 8 * 3600)) + "+08:00"
    assert cli("cursors", "reset", "host", "--to-time", offset, "--execute", "-c", str(cfg_path)).exit_code == 0
    assert sync(load(url)).start_from == when - 1


def test_execute_to_now(cfg_path: Path) -> None:
    url = store_url(cfg_path)
    sync(seed(url, CursorState.from_cursor("0", "host", cursor_at(int(time.time()) - 60))))
    result = cli("cursors", "reset", "host", "--to-now", "--execute", "-c", str(cfg_path), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["applied"], doc["effect"]) == (True, "skip")
    state = sync(load(url))
    assert state is not None
    assert (state.mode, state.cursor, state.event_time) == ("now", "", None)


def test_execute_is_refused_while_another_owner_holds_the_lease(cfg_path: Path) -> None:
    url = store_url(cfg_path)
    saved = CursorState.from_cursor("0", "host", cursor_at(int(time.time()) - 60))

    async def prepare() -> int | None:
        async with open_store(url) as store:
            await store.save(saved)
            return await store.acquire("0", "host", OTHER, 60.0)

    fence = sync(prepare())
    # The dry run says so, and still exits 0.
    dry = cli("cursors", "reset", "host", "--to-now", "-c", str(cfg_path))
    assert dry.exit_code == 0, dry.output
    assert f"held by {OTHER}" in dry.stdout
    result = cli("cursors", "reset", "host", "--to-now", "--execute", "-c", str(cfg_path))
    assert result.exit_code == 1, result.output
    assert "refused" in result.stderr
    assert OTHER in result.stderr
    assert "in 5" in result.stderr or "in 1m" in result.stderr  # when the lease expires (in ~60 s)
    assert sync(load(url)) == saved

    async def holder() -> tuple[str, int]:
        async with open_store(url) as store:
            (lease,) = await store.leases("0")
            return lease.owner, lease.fence

    assert sync(holder()) == (OTHER, fence)  # untouched

    # Once that lease has expired (the daemon died), the reset goes through.
    async def expire() -> None:
        async with open_store(url) as store:
            await store.acquire("0", "host", OTHER, 1.0, now=time.time() - 10)

    sync(expire())
    assert cli("cursors", "reset", "host", "--to-now", "--execute", "-c", str(cfg_path)).exit_code == 0
    assert sync(load(url)).mode == "now"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to-time", "2001-01-01T00:00:00Z"], "outside the retention window"),
        (["--by-duration", "3h"], "outside the retention window"),
        (["--by-duration", "2h59m30s"], "outside the retention window"),  # inside 3 h, but not the 60 s margin
        (["--to-time", str(int(time.time()) + 3600)], "in the future"),
        (["--to-time", "next tuesday"], "not ISO-8601"),
        (["--to-time", "nan"], "not a time"),
        (["--by-duration", "5 parsecs"], "not a duration"),
        (["--by-duration", "-5m"], "--by-duration"),
        ([], "give exactly one of"),
        (["--to-now", "--by-duration", "5m"], "give exactly one of"),
    ],
)
def test_bad_targets_exit_2_and_change_nothing(cfg_path: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = cli("cursors", "reset", "host", *args, "--execute", "-c", str(cfg_path))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "state.db").exists()


def test_the_window_message_names_the_retention_and_the_earliest_start(cfg_path: Path) -> None:
    result = cli("cursors", "reset", "host", "--by-duration", "4h", "-c", str(cfg_path))
    assert result.exit_code == 2
    assert "3h00m" in result.stderr
    assert "watch.retention" in result.stderr
    assert "earliest start is 20" in result.stderr


def test_inside_the_window_edge_is_accepted(cfg_path: Path) -> None:
    result = cli("cursors", "reset", "host", "--by-duration", "2h58m", "-c", str(cfg_path))
    assert result.exit_code == 0, result.output


def test_unknown_resource_exits_2(cfg_path: Path, tmp_path: Path) -> None:
    result = cli("cursors", "reset", "hosts", "--to-now", "--execute", "-c", str(cfg_path))
    assert result.exit_code == 2
    assert "unknown resource 'hosts'" in result.stderr
    assert not (tmp_path / "state.db").exists()


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[watch]\nretention = \"soon\"\n")
    for args in (["list"], ["reset", "host", "--to-now"]):
        result = cli("cursors", *args, "-c", str(path))
        assert result.exit_code == 2, result.output
        assert "watch.retention" in result.stderr


def test_list_says_why_a_gap_stays_open(cfg_path: Path) -> None:
    """Issue 12: an unproved listing or a held sweep keeps the gap open, and the list says which and why."""
    url = store_url(cfg_path)

    async def record() -> None:
        async with open_store(url) as store:
            await store.add_gap("0", "host", 0.0, 100.0, "cursor_expired")
            await store.record_resync("0", "host", "held", ["the sweep would delete 40 of 100 live host objects"])
            await store.record_resync("0", "set", "ok", [], listed=12)

    sync(record())
    out = cli("cursors", "list", "--config", str(cfg_path)).output
    assert "host: gaps stay open: last resync held at" in out and "would delete 40 of 100" in out
    assert "set: gaps stay open" not in out  # no open gap, nothing to explain
    doc = json.loads(cli("cursors", "list", "--json", "--config", str(cfg_path)).output)
    rows = {r["resource"]: r for r in doc["resources"]}
    assert rows["host"]["last_resync"]["outcome"] == "held" and rows["set"]["last_resync"]["listed"] == 12
