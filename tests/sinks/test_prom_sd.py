"""prom_sd: file_sd rendering and job matching, atomic replacement, debounce, errors, and /sd over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from rwatch.config import PromSdSinkConfig
from rwatch.http import serve_http
from rwatch.sinks.base import TopologyRow
from rwatch.sinks.projection import TopologySource
from rwatch.sinks.prom_sd import PromSdSink, _target_ip, render_groups, sd_routes

DEBOUNCE = 0.05


def row(host: int, module: int, *, ip: str | None = "auto", biz: int | None = 2, biz_name: str | None = "shop",
        set_id: int | None = 10, set_name: str | None = "prod", module_name: str | None = "web",
        host_name: str | None = "auto", cloud: int | None = 0, tenant: str = "0") -> TopologyRow:
    return TopologyRow(
        tenant=tenant, bk_biz_id=biz, bk_biz_name=biz_name, bk_set_id=set_id, bk_set_name=set_name,
        bk_module_id=module, bk_module_name=module_name, bk_host_id=host,
        bk_host_innerip=f"10.0.0.{host}" if ip == "auto" else ip, bk_cloud_id=cloud,
        bk_host_name=f"h{host}" if host_name == "auto" else host_name,
    )


class FakeMirror:
    """Exactly the two methods prom_sd uses of MirrorSink."""

    def __init__(self, rows: Sequence[TopologyRow] = ()) -> None:
        self.rows = list(rows)
        self.listeners: list[Callable[[], None]] = []
        self.calls = 0
        self.error: Exception | None = None
        self.hold: asyncio.Event | None = None  # when set, topology() waits for it (a slow query)
        self.reading = asyncio.Event()

    def add_listener(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)

    async def topology(self, tenant: str | None = None) -> list[TopologyRow]:
        self.calls += 1
        snapshot = list(self.rows)  # what a database read sees: the state when the query started
        self.reading.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error
        return [r for r in snapshot if tenant is None or r.tenant == tenant]

    def commit(self, rows: Sequence[TopologyRow]) -> None:
        self.rows = list(rows)
        for callback in self.listeners:
            callback()


def settings(file: Path | None, jobs: list[dict[str, Any]] | None = None) -> PromSdSinkConfig:
    return PromSdSinkConfig.model_validate({
        "kind": "prom_sd", "file": str(file) if file else None,
        "jobs": jobs if jobs is not None else [{"name": "node", "port": 9100}],
    })


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Await a condition on a file or a counter (nothing to hang an Event on), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the states polled here (file contents) signal nothing
            await asyncio.sleep(0.005)


def sample(name: str, sink: str) -> float:
    return REGISTRY.get_sample_value(name, {"sink": sink}) or 0.0


def hosts_of(groups: list[dict[str, Any]], job: str | None = None) -> list[int]:
    return [int(g["labels"]["bk_host_id"]) for g in groups if job is None or g["labels"]["job"] == job]


# --- rendering --------------------------------------------------------------------------------------------


async def test_file_is_valid_file_sd(tmp_path: Path) -> None:
    path = tmp_path / "sd" / "targets.json"  # the directory does not exist yet
    mirror = FakeMirror([row(2, 21), row(1, 11, ip="10.1.1.1,10.1.1.2"), row(3, 31, cloud=None)])
    sink = PromSdSink("p", settings(path, [{"name": "node", "port": 9100}, {"name": "app", "port": 8080}]),
                      mirror, debounce=DEBOUNCE)
    await sink.open()
    await sink.close()
    groups = json.loads(path.read_bytes())
    assert isinstance(groups, list) and len(groups) == 6
    for group in groups:
        assert set(group) == {"targets", "labels"}
        assert isinstance(group["targets"], list) and len(group["targets"]) == 1
        assert all(isinstance(t, str) and re.fullmatch(r"[\d.]+:\d+", t) for t in group["targets"])
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in group["labels"].items())
    # Ordered by job (config order), then host id.
    assert [(g["labels"]["job"], g["labels"]["bk_host_id"]) for g in groups] == [
        ("node", "1"), ("node", "2"), ("node", "3"), ("app", "1"), ("app", "2"), ("app", "3")]
    assert groups[0] == {
        "targets": ["10.1.1.1:9100"],  # several inner IPs: the first
        "labels": {"job": "node", "bk_biz_id": "2", "bk_biz_name": "shop", "bk_set_id": "10",
                   "bk_set_name": "prod", "bk_module_id": "11", "bk_module_name": "web", "bk_host_id": "1",
                   "bk_host_name": "h1", "bk_cloud_id": "0", "tenant": "0"},
    }
    assert groups[2]["labels"]["bk_cloud_id"] == ""
    assert groups[3]["targets"] == ["10.1.1.1:8080"]
    assert sink.content == path.read_bytes()


TOPOLOGY = [
    row(1, 11, biz=2, biz_name="shop", set_id=10, set_name="prod", module_name="web"),
    row(2, 12, biz=2, biz_name="shop", set_id=10, set_name="prod", module_name="db"),
    row(3, 13, biz=2, biz_name="shop", set_id=20, set_name="test", module_name="web"),
    row(4, 14, biz=3, biz_name="blog", set_id=30, set_name="prod", module_name="web"),
]


@pytest.mark.parametrize(("job", "expected"), [
    ({}, [1, 2, 3, 4]),
    ({"biz": ["shop"]}, [1, 2, 3]),
    ({"biz": [3]}, [4]),
    ({"biz": ["3"]}, [4]),  # an id written as text (environment overrides) still matches
    ({"set": ["prod"]}, [1, 2, 4]),
    ({"set": [20, 30]}, [3, 4]),
    ({"module": ["web"]}, [1, 3, 4]),
    ({"module": [12, "nothing"]}, [2]),
    ({"biz": ["shop"], "set": ["prod"], "module": ["web"]}, [1]),  # every non-empty list must match
    ({"biz": ["shop"], "module": [14]}, []),
])
def test_job_matching(job: dict[str, Any], expected: list[int]) -> None:
    jobs = settings(None, [{"name": "j", "port": 1, **job}]).jobs
    groups, _ = render_groups(jobs, TOPOLOGY)
    assert hosts_of(list(map(dict, groups))) == expected


def test_host_in_several_modules_appears_once_per_job() -> None:
    rows = [
        row(7, 72, set_id=11, set_name="b", module_name="api"),
        row(7, 71, set_id=10, set_name="a", module_name="web"),
        row(7, 73, set_id=10, set_name="a", module_name="web"),  # same name as 71: named once
        row(8, 81, module_name="web"),
    ]
    jobs = settings(None, [{"name": "all", "port": 1}, {"name": "api", "port": 2, "module": ["api"]}]).jobs
    groups, _ = render_groups(jobs, rows)
    assert [(g["labels"]["job"], g["targets"]) for g in groups] == [
        ("all", ["10.0.0.7:1"]), ("all", ["10.0.0.8:1"]), ("api", ["10.0.0.7:2"])]
    labels = groups[0]["labels"]
    assert labels["bk_module_id"] == "71,72,73" and labels["bk_module_name"] == "web,api"
    assert labels["bk_set_id"] == "10,11" and labels["bk_set_name"] == "a,b"
    assert labels["bk_biz_id"] == "2"
    assert groups[2]["labels"]["bk_module_id"] == "72" and groups[2]["labels"]["bk_set_name"] == "b"
    # The order does not depend on the order the mirror answered in.
    assert render_groups(jobs, list(reversed(rows))) == (groups, 0)


def test_missing_names_and_ips_are_tolerated() -> None:
    rows = [
        row(1, 11, biz=None, biz_name=None, set_id=None, set_name=None, module_name=None, host_name=None,
            cloud=None),
        row(2, 21, ip=None),
        row(3, 31, ip=""),
        row(4, 41, ip=" , 10.9.9.9"),
        row(5, 51, tenant="t2"),
    ]
    groups, no_ip = render_groups(settings(None).jobs, rows)
    assert no_ip == 2
    assert hosts_of(list(map(dict, groups))) == [1, 4, 5]
    assert groups[0]["labels"] == {
        "job": "node", "bk_biz_id": "", "bk_biz_name": "", "bk_set_id": "", "bk_set_name": "",
        "bk_module_id": "11", "bk_module_name": "", "bk_host_id": "1", "bk_host_name": "", "bk_cloud_id": "",
        "tenant": "0"}
    assert groups[1]["targets"] == ["10.9.9.9:9100"]
    assert groups[2]["labels"]["tenant"] == "t2"
    # A job filtering by name does not match a row whose name is not mirrored yet.
    named = settings(None, [{"name": "j", "port": 1, "module": ["web"]}]).jobs
    assert hosts_of(list(map(dict, render_groups(named, rows)[0]))) == [4, 5]


# --- the file ---------------------------------------------------------------------------------------------


async def test_identical_topology_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    mirror = FakeMirror(TOPOLOGY)
    sink = PromSdSink("same", settings(path), mirror, debounce=DEBOUNCE)
    await sink.open()
    first = path.stat()
    content = path.read_bytes()
    mirror.commit(list(reversed(TOPOLOGY)))  # same topology, other order
    await until(lambda: mirror.calls == 2)
    await sink.close()
    assert path.read_bytes() == content
    assert path.stat().st_ino == first.st_ino and path.stat().st_mtime_ns == first.st_mtime_ns
    # A restart finds the same content on disk and leaves the file alone too.
    again = PromSdSink("same", settings(path), FakeMirror(TOPOLOGY), debounce=DEBOUNCE)
    await again.open()
    await again.close()
    assert path.stat().st_ino == first.st_ino
    assert again.content == content


async def test_replacement_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    mirror = FakeMirror([row(1, 11)])
    sink = PromSdSink("atomic", settings(path), mirror, debounce=0)
    await sink.open()
    original = path.read_bytes()
    held = path.open("rb")  # keeps the first file's inode alive (and not reused) for the check below
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # Prometheus usually runs as another user

    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                seen.append(len(json.loads(path.read_bytes())))
            except BaseException as exc:  # pragma: no cover - the failure under test
                errors.append(exc)
            # A breath between reads: a reader that never releases the GIL starves the renders it watches
            # (each handoff waits out the 5 ms switch interval), and the test took 40 s for 148 renders.
            stop.wait(0.0002)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for n in range(2, 150):
            mirror.rows = [row(h, h * 10) for h in range(1, n)]  # no listener call: only these renders run
            await sink.render_once()
    finally:
        stop.set()
        reader.join()
        await sink.close()
    assert not errors
    assert len(seen) > 10 and len(set(seen)) > 1  # it did observe the file changing
    assert len(json.loads(path.read_bytes())) == 148
    # Replaced, not rewritten in place: the first file is unlinked and still holds what it held.
    with held:
        assert os.fstat(held.fileno()).st_nlink == 0 and held.read() == original
        assert os.fstat(held.fileno()).st_ino != path.stat().st_ino
    assert sorted(os.listdir(tmp_path)) == ["targets.json"]  # no temp file left behind


async def test_write_failure_is_counted_and_http_sd_still_serves(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    mirror = FakeMirror([row(1, 11)])
    sink = PromSdSink("unwritable", settings(blocker / "targets.json"), mirror, debounce=DEBOUNCE)
    before = sample("rwatch_prom_sd_render_errors_total", "unwritable")
    await sink.open()
    await sink.close()
    assert sample("rwatch_prom_sd_render_errors_total", "unwritable") == before + 1
    assert hosts_of(json.loads(sink.content)) == [1]


async def test_without_a_file_only_memory(tmp_path: Path) -> None:
    sink = PromSdSink("memonly", settings(None), FakeMirror([row(1, 11)]), debounce=DEBOUNCE)
    await sink.apply([])  # the protocol's apply: prom_sd is fed by its mirror, not by events
    await sink.open()
    await sink.close()
    assert hosts_of(json.loads(sink.content)) == [1]
    assert os.listdir(tmp_path) == []


# --- debounce, errors, close ------------------------------------------------------------------------------


async def test_burst_is_coalesced_and_the_last_state_wins(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    mirror = FakeMirror([])
    sink = PromSdSink("burst", settings(path), mirror, debounce=0.25)
    await sink.open()
    assert mirror.calls == 1 and path.read_bytes() == b"[]\n"
    for n in range(1, 101):
        mirror.commit([row(h, h) for h in range(1, n + 1)])
        await asyncio.sleep(0.001)  # the loop runs between commits: the renderer sees the burst as it comes
    await until(lambda: path.exists() and len(json.loads(path.read_bytes())) == 100)
    # Quiet for a window: no render happens without a change.
    calls = mirror.calls
    await asyncio.sleep(0.3)
    assert mirror.calls == calls
    assert 2 <= calls <= 1 + 3
    await sink.close()
    assert hosts_of(json.loads(path.read_bytes())) == list(range(1, 101))
    assert sample("rwatch_prom_sd_targets", "burst") == 100


async def test_change_during_a_render_is_rendered_after_it(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    mirror = FakeMirror([row(1, 11)])
    sink = PromSdSink("slow", settings(path), mirror, debounce=DEBOUNCE)
    await sink.open()
    mirror.hold, mirror.reading = asyncio.Event(), asyncio.Event()
    mirror.commit([row(1, 11), row(2, 21)])
    await mirror.reading.wait()  # the render has read the listener's flag and is inside topology()
    mirror.commit([row(1, 11), row(2, 21), row(3, 31)])  # not in the running read's snapshot...
    mirror.hold.set()  # ...so a later render must pick it up
    await until(lambda: len(json.loads(path.read_bytes())) == 3)
    await sink.close()


async def test_topology_errors_are_logged_counted_and_retried(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    mirror = FakeMirror([row(1, 11)])
    mirror.error = RuntimeError("database is locked")
    sink = PromSdSink("flaky", settings(path), mirror, debounce=DEBOUNCE)
    errors = sample("rwatch_prom_sd_render_errors_total", "flaky")
    await sink.open()  # does not raise
    assert sample("rwatch_prom_sd_render_errors_total", "flaky") == errors + 1
    assert not path.exists() and sink.content == b"[]\n"
    # Retried on the next change...
    mirror.commit([row(1, 11), row(2, 21)])
    await until(lambda: mirror.calls >= 2)
    mirror.error = None
    mirror.commit([row(1, 11), row(2, 21), row(3, 31)])
    await until(lambda: path.exists() and len(json.loads(path.read_bytes())) == 3)
    # ...and, when nothing changes after a failure, by a timer: a failed read never leaves the file stale.
    mirror.error = RuntimeError("connection reset")
    mirror.commit([row(4, 41)])
    await until(lambda: sample("rwatch_prom_sd_render_errors_total", "flaky") >= errors + 3)
    mirror.error = None
    await until(lambda: hosts_of(json.loads(path.read_bytes())) == [4])
    await sink.close()
    assert sample("rwatch_prom_sd_renders_total", "flaky") == mirror.calls


async def test_close_flushes_a_pending_render(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    mirror = FakeMirror([row(1, 11)])
    sink = PromSdSink("flush", settings(path), mirror, debounce=30.0)
    await sink.open()
    mirror.commit([row(1, 11), row(2, 21)])  # rendered at once (first change of a window)
    await until(lambda: mirror.calls == 2)
    mirror.commit([row(1, 11), row(2, 21), row(3, 31)])  # pending for 30 s
    async with asyncio.timeout(2):
        await sink.close()
    assert hosts_of(json.loads(path.read_bytes())) == [1, 2, 3]


async def test_listener_from_another_thread(tmp_path: Path) -> None:
    mirror = FakeMirror([row(1, 11)])
    sink = PromSdSink("thread", settings(None), mirror, debounce=DEBOUNCE)
    await sink.open()
    mirror.rows = [row(1, 11), row(2, 21)]
    await asyncio.to_thread(mirror.listeners[0])
    await until(lambda: len(json.loads(sink.content)) == 2)
    await sink.close()


# --- /sd --------------------------------------------------------------------------------------------------


Starter = Callable[[Sequence[PromSdSink]], Awaitable[str]]


@pytest.fixture
async def served() -> AsyncIterator[Starter]:
    """Starts serve_http on a free port with the sinks' routes (returns the base URL); stops it at the end."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start(sinks: Sequence[PromSdSink]) -> str:
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        tasks.append(asyncio.create_task(
            serve_http("127.0.0.1:0", lambda: True, stop, bound, routes=sd_routes(sinks))))
        return f"http://127.0.0.1:{await asyncio.wait_for(bound, 10)}"

    yield start
    stop.set()
    await asyncio.gather(*tasks)


async def test_sd_over_http(tmp_path: Path, served: Starter) -> None:
    first_mirror = FakeMirror([row(2, 21), row(1, 11), row(1, 12, module_name="db")])
    first = PromSdSink("first", settings(tmp_path / "a.json"), first_mirror, debounce=DEBOUNCE)
    second = PromSdSink("second", settings(None), FakeMirror([]), debounce=DEBOUNCE)
    base = await served([first, second])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/sd") as resp:  # before the first render: not an empty list (see below)
            assert resp.status == 503
        await first.open()
        await second.open()
        async with session.get(f"{base}/sd") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].split(";")[0] == "application/json"
            body = await resp.read()
        assert body == (tmp_path / "a.json").read_bytes()
        groups = json.loads(body)
        assert hosts_of(groups) == [1, 2] and groups[0]["labels"]["bk_module_name"] == "web,db"
        async with session.get(f"{base}/sd/first") as resp:
            assert await resp.read() == body
        async with session.get(f"{base}/sd/second") as resp:
            assert resp.status == 200 and await resp.json() == []
        first_mirror.commit([row(3, 31)])
        await until(lambda: hosts_of(json.loads(first.content)) == [3])
        async with session.get(f"{base}/sd") as resp:
            assert hosts_of(await resp.json()) == [3]
        async with session.get(f"{base}/healthz") as resp:  # the existing endpoints are still there
            assert resp.status == 200
    await first.close()
    await second.close()


async def test_sd_answers_503_until_a_render_succeeded_so_prometheus_keeps_its_targets(
        tmp_path: Path, served: Starter) -> None:
    """Prometheus' http_sd keeps its last targets when a refresh fails, and drops them all on an empty list: a
    restarted rwatch whose mirror is not readable yet must fail the refresh, not blank every target."""
    mirror = FakeMirror([row(1, 11)])
    mirror.error = RuntimeError("mirror not readable yet")
    sink = PromSdSink("unready", settings(None), mirror, debounce=DEBOUNCE)
    base = await served([sink])
    await sink.open()  # its first render fails
    async with aiohttp.ClientSession() as session:
        for path in ("/sd", "/sd/unready"):
            async with session.get(f"{base}{path}") as resp:
                assert resp.status == 503, path
        mirror.error = None
        mirror.commit([row(1, 11)])
        await until(lambda: hosts_of(json.loads(sink.content)) == [1])
        async with session.get(f"{base}/sd") as resp:
            assert resp.status == 200 and hosts_of(await resp.json()) == [1]
        # Once rendered, a failed render keeps serving the last good list: that is the state of the mirror.
        mirror.error = RuntimeError("database is locked")
        mirror.commit([])
        await until(lambda: mirror.calls >= 3)
        async with session.get(f"{base}/sd") as resp:
            assert resp.status == 200 and hosts_of(await resp.json()) == [1]
    await sink.close()


def test_fake_matches_the_protocol() -> None:
    source: TopologySource = FakeMirror()
    assert source is not None


def test_a_target_is_the_first_inner_ip_with_an_ipv6_address_in_brackets() -> None:
    assert _target_ip(" 10.0.0.1 ,10.0.0.2") == "10.0.0.1"
    assert _target_ip("fd00::1,10.0.0.2") == "[fd00::1]"  # host:port stays parseable
    assert _target_ip(None) is None and _target_ip(" , ") is None
