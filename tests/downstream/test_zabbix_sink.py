"""The zabbix sink over a real SQLite mirror and the real Zabbix 6.0: it follows the mirror's commits with scoped
reconciles, removes only what the mirror proves deleted, holds a mass removal, and survives Zabbix being away."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from rwatch.config import MirrorSinkConfig, SecretUrl, ZabbixSinkConfig
from rwatch.events import Event
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.zabbix.desired import ZabbixOptions, desired_state
from rwatch.sinks.zabbix.sink import ZabbixSink, options_of
from tests.downstream.instances import Zabbix, free_port
from tests.downstream.side import Side
from tests.entrypoint import RWATCH
from tests.sinks.test_mirror import host, named, relation


def settings(zabbix: Zabbix, prefix: str, **extra: Any) -> ZabbixSinkConfig:
    return ZabbixSinkConfig.model_validate({
        "kind": "zabbix", "url": zabbix.url, "username": "Admin", "password": "zabbix", "group_prefix": prefix,
        "technical_name": f"{prefix}-{{bk_host_id}}", "visible_name": f"{{label}} ({prefix}-{{bk_host_id}})",
        "debounce": 0.05, **extra})


def world(v: int = 1) -> list[Event]:
    """biz 1 (sets 11, 12; modules 111, 121) with hosts 1..6, three in each module."""
    events = [named("biz", 1, v), named("set", 11, v, bk_biz_id=1), named("set", 12, v, bk_biz_id=1),
              named("module", 111, v, bk_set_id=11, bk_biz_id=1), named("module", 121, v, bk_set_id=12, bk_biz_id=1)]
    for h in range(1, 7):
        module, set_ = (111, 11) if h <= 3 else (121, 12)
        events += [host(h, v, bk_os_type="1"), relation(h, module, set_, 1, v)]
    return events


async def apply(mirror: MirrorSink, events: list[Event]) -> None:
    for resource in ("biz", "set", "module", "host", "host_relation"):
        batch = [e for e in events if e.resource == resource]
        if batch:
            await mirror.apply(batch)


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not _holds(check):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except ValueError:  # Zabbix read in the middle of a host's write (its tags replaced): look again
        return False


@pytest.fixture
def prefix(unique: str) -> str:
    return f"s{unique}"


@pytest.fixture
def options(zabbix: Zabbix, prefix: str) -> ZabbixOptions:
    """What the sinks of these tests make of the topology (the ``side`` fixture's view)."""
    return options_of(settings(zabbix, prefix))


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[MirrorSink]:
    async with MirrorSink("mirror", MirrorSinkConfig(kind="mirror", url=SecretUrl(f"sqlite:///{tmp_path}/m.db"))) as m:
        yield m


Open = Callable[..., Awaitable[ZabbixSink]]


@pytest.fixture
async def open_sink(zabbix: Zabbix, prefix: str, mirror: MirrorSink) -> AsyncIterator[Open]:
    opened: list[ZabbixSink] = []

    async def start(source: MirrorSink = mirror, **extra: Any) -> ZabbixSink:
        sink = ZabbixSink(f"zbx{len(opened)}", settings(zabbix, prefix, **extra), source)
        await sink.open()
        opened.append(sink)
        return sink

    yield start
    for sink in opened:
        await sink.close()


def equal(side: Side, desired: Any) -> bool:
    try:
        side.assert_equal(desired)
    except AssertionError:
        return False
    return True


async def test_the_sink_follows_the_mirror_with_scoped_reconciles(
        mirror: MirrorSink, side: Side, open_sink: Open, zabbix: Zabbix, prefix: str) -> None:
    await apply(mirror, world())
    sink = await open_sink(on_delete="delete")
    options = sink.options

    async def want() -> Any:
        return desired_state(await mirror.topology(), options)

    side.assert_equal(await want())  # open() made the first, full, reconcile
    assert sink.last is not None and sink.last.hosts_created == 6

    # A host moves to the other module: one scoped reconcile, a handful of calls.
    await mirror.apply([relation(1, 111, 11, 1, 2, "delete")])
    await mirror.apply([relation(1, 121, 12, 1, 2)])
    desired = await want()
    await until(lambda: equal(side, desired), "host 1 in module 121")
    assert sink.last is not None and sink.last.api_calls <= 8, sink.last

    # The set is renamed: its group and the module group below it are renamed in place (same ids).
    before = side.groups()
    await mirror.apply([named("set", 12, 3, bk_biz_id=1, bk_set_name="web")])
    desired = await want()
    await until(lambda: equal(side, desired), "set 12 renamed")
    after = side.groups()
    assert after[f"{prefix}/biz-1/web"] == before[f"{prefix}/biz-1/set-12"]
    assert after[f"{prefix}/biz-1/web/module-121"] == before[f"{prefix}/biz-1/set-12/module-121"]

    # CMDB deletes host 6 (its relation, then the host: a tombstone proves it).
    await mirror.apply([relation(6, 121, 12, 1, 4, "delete")])
    await mirror.apply([host(6, 4, "delete")])
    desired = await want()
    await until(lambda: equal(side, desired), "host 6 gone")
    assert 6 not in side.hosts()


async def test_a_host_the_mirror_lost_without_a_tombstone_stays(
        mirror: MirrorSink, side: Side, open_sink: Open, tmp_path: Path) -> None:
    """A new (or restored) mirror file must not empty Zabbix: without CMDB's delete in the mirror, nothing goes."""
    await apply(mirror, world())
    sink = await open_sink(on_delete="delete")
    assert set(side.hosts()) == set(range(1, 7))
    await sink.close()
    fresh = MirrorSink("fresh", MirrorSinkConfig(kind="mirror", url=SecretUrl(f"sqlite:///{tmp_path}/fresh.db")))
    await fresh.open()
    try:
        await apply(fresh, [e for e in world() if e.key not in ("5", "6", "5:121", "6:121")])
        other = await open_sink(fresh, on_delete="delete")
        assert other.last is not None and other.last.hosts_unproven == 2
        assert set(side.hosts()) == set(range(1, 7))  # 5 and 6 are unproven: left as they are
        await apply(fresh, [relation(5, 121, 12, 1, 2, "delete"), host(5, 2, "delete")])
        await until(lambda: 5 not in side.hosts(), "host 5, now proven deleted, removed")
        assert 6 in side.hosts()
    finally:
        await fresh.close()


async def test_a_large_removal_cmdb_proved_goes_through(mirror: MirrorSink, side: Side, open_sink: Open) -> None:
    """CMDB deleting most hosts at once (rwatch catching up after downtime) is proof, not a mass-delete question:
    every tombstone is CMDB's own delete or a sweep that already passed the watcher's mass-delete guard."""
    await apply(mirror, world())
    sink = await open_sink(on_delete="delete")
    gone = [e for h in (2, 3, 4, 5) for e in (relation(h, 111 if h <= 3 else 121, 11 if h <= 3 else 12, 1, 2,
                                                       "delete"), host(h, 2, "delete"))]
    await apply(mirror, gone)
    await until(lambda: set(side.hosts()) == {1, 6}, "the four proven deletes carried out")
    assert sink.last is not None and sink.last.hosts_unproven == 0


async def test_zabbix_away_at_start_is_retried_not_fatal(
        mirror: MirrorSink, zabbix: Zabbix, prefix: str, side: Side) -> None:
    await apply(mirror, world())
    closed = f"http://127.0.0.1:{free_port()}/api_jsonrpc.php"
    sink = ZabbixSink("away", settings(zabbix, prefix, url=closed), mirror)
    before = REGISTRY.get_sample_value("rwatch_zabbix_errors_total", {"sink": "away"}) or 0
    await sink.open()  # does not raise: the projection failed, is counted, and is retried
    try:
        assert (REGISTRY.get_sample_value("rwatch_zabbix_errors_total", {"sink": "away"}) or 0) == before + 1
        sink.api.url = zabbix.url  # Zabbix is back
        await until(lambda: len(side.hosts()) == 6, "the retry reconciled")
    finally:
        await sink.close()


async def test_zabbix_sync_makes_zabbix_equal_now(
        mirror: MirrorSink, zabbix: Zabbix, prefix: str, side: Side, tmp_path: Path) -> None:
    await apply(mirror, world())
    config = tmp_path / "rwatch.toml"
    config.write_text(f"""
[sinks.mirror]
kind = "mirror"
url = "sqlite:///{tmp_path}/m.db"

[sinks.zbx]
kind = "zabbix"
url = "{zabbix.url}"
username = "Admin"
password = "zabbix"
group_prefix = "{prefix}"
technical_name = "{prefix}-{{bk_host_id}}"
""")
    done = await asyncio.to_thread(subprocess.run, [RWATCH, "zabbix-sync", "--config", str(config)],
                                   capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hosts_created=6" in done.stdout
    assert set(side.hosts()) == set(range(1, 7))
    again = await asyncio.to_thread(subprocess.run, [RWATCH, "zabbix-sync", "--config", str(config), "--json"],
                                    capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["write_calls"] == 0  # equal already: nothing written
    wrong = await asyncio.to_thread(subprocess.run, [RWATCH, "zabbix-sync", "--config", str(config), "--sink",
                                                     "mirror"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "no zabbix sink of that name" in wrong.stderr
    # A mirror path that holds nothing (a typo, a volume not mounted) is said, not created empty and reconciled.
    config.write_text(config.read_text().replace(f"{tmp_path}/m.db", f"{tmp_path}/typo.db"))
    missing = await asyncio.to_thread(subprocess.run, [RWATCH, "zabbix-sync", "--config", str(config)],
                                      capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "typo.db does not exist" in missing.stderr, missing.stderr
    assert not (tmp_path / "typo.db").exists()


async def test_a_host_known_only_by_its_relations_leaves_with_them(
        mirror: MirrorSink, side: Side, open_sink: Open) -> None:
    """Its host row never reached the mirror (created and deleted inside a lost interval): it entered Zabbix on its
    relation's evidence alone, and leaves when CMDB withdraws that (chaos seed 3 kept three such hosts for ever)."""
    await apply(mirror, world())
    await mirror.apply([relation(7, 121, 12, 1, 2)])  # host 7's row never arrives
    sink = await open_sink(on_delete="delete")
    assert set(side.hosts()) == set(range(1, 8))
    await mirror.apply([relation(7, 121, 12, 1, 3, "delete")])
    await until(lambda: set(side.hosts()) == set(range(1, 7)), "host 7 removed with its last relation")
    assert sink.last is not None and sink.last.hosts_unproven == 0
