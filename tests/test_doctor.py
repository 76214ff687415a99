"""``rwatch doctor`` against the simulator in each deployment mode: the right verdict and fix on every line, a test
per refusal kind (cmdb-watch-api §10, issue 11)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from rwatch.cli.doctor import render
from rwatch.config import Config, load_config
from rwatch.doctor.checks import diagnose
from rwatch.doctor.report import Report
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from rwatch.store.records import BizSighting
from tests.entrypoint import RWATCH

SECRET = "s3cret-not-to-print"
RESOURCES = ("host", "host_relation", "biz", "set", "module", "project", "biz_set")


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Any]]:
    sims: list[Simulator] = []

    async def make(**options: Any) -> Simulator:
        opts = SimOptions(port=0, hold=0.5, error_delay=0.0, app_code="rw", app_secret=SECRET, hosts=6, **options)
        sim = Simulator(opts)
        await sim.__aenter__()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.__aexit__(None, None, None)


def config(tmp_path: Path, base_url: str, *, cmdb: str = "", resources: tuple[str, ...] = RESOURCES) -> Config:
    tables = "".join(f"[watch.resources.{r}]\nenabled = true\n" for r in resources)
    path = tmp_path / "rwatch.toml"
    path.write_text(f"""
[cmdb]
base_url = "{base_url}"
app_code = "rw"
app_secret = "{SECRET}"
rate_limit = 0
{cmdb}
{tables}
[store]
url = "sqlite:///{tmp_path}/state.db"
""")
    return load_config(path, environ={})


def lines(report: Report) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(check, subject) -> (verdict, detail, fix)."""
    return {(c.check, c.subject): (c.verdict, c.detail, c.fix) for c in report.checks}


def verdicts(report: Report, check: str) -> dict[str, str]:
    return {c.subject: c.verdict for c in report.checks if c.check == check}


def assert_healthy(report: Report) -> None:
    bad = [c for c in report.checks if c.verdict not in ("ok",)]
    assert report.ok and not bad, bad
    assert not any(SECRET in str(c) for c in report.checks)


async def test_a_healthy_gateway_passes_every_line(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(sets_per_biz=3)
    report = await diagnose(config(tmp_path, sim.url + "/api/bk-cmdb/prod"))
    assert_healthy(report)
    assert set(verdicts(report, "watch")) == set(RESOURCES)
    lists = verdicts(report, "list")
    assert {s.split(" ")[0] for s in lists} == {"search_business", "list_hosts_without_biz", "search_set",
                                                 "find_host_biz_relations", "search_module", "list_project",
                                                 "list_business_set"}
    hosts = next(c for c in report.checks if c.subject.startswith("list_hosts_without_biz"))
    assert "ids advance" in hosts.detail  # 6 hosts in pages of 2: paging was exercised
    table = render(report)
    assert "rwatch can run" in table and SECRET not in table


async def test_esb_with_gateway_errors_at_http_200_still_passes(make_sim: Any, tmp_path: Path) -> None:
    # One in five CMDB requests answers a gateway error (HTTP 200 on ESB): doctor retries, as rwatch does.
    sim = await make_sim(gateway_error_rate=0.2, seed=3)
    report = await diagnose(config(tmp_path, sim.url, cmdb='api = "esb"'))
    assert_healthy(report)
    assert sim.faults.fired["gateway"] > 0


async def test_multi_tenant_with_the_tenant_configured_passes(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(tenant_mode="multi", tenant="acme")
    report = await diagnose(config(tmp_path, sim.url, cmdb='tenant_id = "acme"'))
    assert_healthy(report)
    assert lines(report)[("tenant", "X-Bk-Tenant-Id 'acme'")][0] == "ok"


async def test_multi_tenant_with_the_old_default_names_the_tenant_setting(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(tenant_mode="multi", tenant="acme")  # an app valid in every tenant: it must name one
    report = await diagnose(config(tmp_path, sim.url))
    assert not report.ok
    verdict, _, fix = lines(report)[("tenant", "X-Bk-Tenant-Id (not sent)")]
    assert verdict == "fail" and "cmdb.tenant_id" in fix
    assert all(v == "skip" for v in verdicts(report, "watch").values())  # one clear failure, not twelve


async def test_an_unknown_tenant_is_cmdbs_1100005(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(tenant_mode="multi", tenant="acme")
    report = await diagnose(config(tmp_path, sim.url, cmdb='tenant_id = "acne"'))
    got = {c.check: c for c in report.checks}
    assert got["tenant"].verdict == "fail" and got["tenant"].code == 1100005 and "cmdb.tenant_id" in got["tenant"].fix
    assert got["credentials"].verdict == "ok"  # CMDB answered: the gateway had accepted the app


async def test_wrong_credentials(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim()
    cfg = config(tmp_path, sim.url)
    cfg.cmdb = cfg.cmdb.model_copy(update={"app_secret": type(cfg.cmdb.app_secret)("wrong")})
    report = await diagnose(cfg)
    got = {c.check: c for c in report.checks}
    assert got["credentials"].verdict == "fail" and got["credentials"].code == 1640101
    assert "cmdb.app_secret" in got["credentials"].fix and not report.ok


async def test_missing_gateway_grant_for_the_watch_api(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(denied_apis=frozenset({"resource_watch"}))
    report = await diagnose(config(tmp_path, sim.url))
    watch = [c for c in report.checks if c.check == "watch"]
    assert watch and all(c.verdict == "fail" and c.code == 1640301 for c in watch)
    assert "grant app 'rw' the resource 'resource_watch'" in watch[0].fix
    assert {c.check: c.verdict for c in report.checks}["credentials"] == "ok"


async def test_missing_gateway_grant_for_a_list_api(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(denied_apis=frozenset({"search_set"}))
    report = await diagnose(config(tmp_path, sim.url))
    failed = [c for c in report.checks if c.verdict == "fail"]
    assert [c.subject for c in failed] == ["search_set (set)"]
    assert "'search_set'" in failed[0].fix and not report.ok


async def test_missing_iam_watch_action_names_it(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(denied_resources=frozenset({"host_relation", "biz_set"}))
    report = await diagnose(config(tmp_path, sim.url))
    failed = {c.subject: c for c in report.checks if c.verdict == "fail"}
    assert set(failed) == {"host_relation", "biz_set"}
    assert "watch_host_relation_event" in failed["host_relation"].fix
    assert "watch_biz_set_event" in failed["biz_set"].fix


@pytest.mark.parametrize("where", ["404", "html"])
async def test_a_wrong_base_url_is_detected(make_sim: Any, tmp_path: Path, where: str) -> None:
    if where == "404":
        sim = await make_sim()
        report = await diagnose(config(tmp_path, sim.url + "/api/bk-cmdb"))  # the stage is missing
    else:
        async with web_page() as url:  # the PaaS portal's login page, say
            report = await diagnose(config(tmp_path, url))
    got = {c.check: c for c in report.checks}
    assert got["reach"].verdict == "ok" and got["channel"].verdict == "fail"
    assert "/api/bk-cmdb/<stage>" in got["channel"].fix and not report.ok


async def test_an_unreachable_cmdb(tmp_path: Path) -> None:
    report = await diagnose(config(tmp_path, "http://127.0.0.1:9"))
    got = {c.check: c for c in report.checks}
    assert got["reach"].verdict == "fail" and "cmdb.base_url" in got["reach"].fix
    assert {c.verdict for c in report.checks if c.check != "reach"} == {"skip"}


async def test_clock_skew_is_a_warning(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim()
    sim.state.clock.jump(300)
    report = await diagnose(config(tmp_path, sim.url))
    clock = next(c for c in report.checks if c.check == "clock")
    skew = int(re.search(r"clock is ([+-]\d+) s", clock.detail).group(1))  # type: ignore[union-attr]
    assert clock.verdict == "warn" and 298 <= skew <= 301 and "NTP" in clock.fix
    assert report.ok


async def test_hidden_businesses_are_named_from_the_stream(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(bizs=4)
    hidden = sorted(b["bk_biz_id"] for b in sim.state.objects("biz").values() if b["default"] == 0)[:2]
    sim.permissions.update({"hide_bizs": hidden})
    report = await diagnose(config(tmp_path, sim.url))
    check = next(c for c in report.checks if c.check == "businesses")
    assert check.verdict == "warn" and report.ok  # rwatch can run; its resyncs delete nothing there
    assert f"{hidden[0]}, {hidden[1]}" in check.detail and "view rights" in check.fix
    assert "the biz stream's window" in check.detail


async def test_hidden_businesses_from_rwatchs_record(make_sim: Any, tmp_path: Path) -> None:
    """A business created before the stream's window: only what a running rwatch recorded shows it."""
    sim = await make_sim(bizs=2, retention=120)
    old = max(b["bk_biz_id"] for b in sim.state.objects("biz").values())
    sim.state.clock.jump(600)  # its create event fell out of the window
    sim.permissions.update({"hide_bizs": [old]})
    cfg = config(tmp_path, sim.url)
    cfg.watch = cfg.watch.model_copy(update={"retention": 120.0})
    report = await diagnose(cfg)
    assert next(c for c in report.checks if c.check == "businesses").verdict == "ok"  # nothing to compare with
    async with open_store(cfg.store.url.get_secret_value()) as store:
        await store.note_businesses("0", [BizSighting(old, True, (1, 0), False)])
    report = await diagnose(cfg)
    check = next(c for c in report.checks if c.check == "businesses")
    assert check.verdict == "warn" and str(old) in check.detail and "rwatch's record" in check.detail


async def test_the_command_prints_a_table_or_json_and_exits_by_the_verdict(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim()
    config(tmp_path, sim.url)
    code, out = await cli(tmp_path / "rwatch.toml")
    assert code == 0 and "rwatch can run" in out and SECRET not in out
    sim.permissions.update({"deny": ["host"]})
    code, out = await cli(tmp_path / "rwatch.toml", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and SECRET not in out
    failed = [c for c in doc["checks"] if c["verdict"] == "fail"]
    assert [c["subject"] for c in failed] == ["host"] and "watch_host_event" in failed[0]["fix"]


async def cli(path: Path, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
    proc = await asyncio.create_subprocess_exec(RWATCH, "doctor", "--config", str(path), *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class web_page:
    """A web UI where the API should be: an HTML page at HTTP 200 for any path."""

    async def __aenter__(self) -> str:
        async def page(_: web.Request) -> web.Response:
            return web.Response(text="<!doctype html><html><body>Log in to BlueKing</body></html>",
                                content_type="text/html")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", page)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
