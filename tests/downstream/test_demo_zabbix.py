"""``rwatch demo --zabbix`` against the real Zabbix 6.0: the simulated CMDB's topology as host groups and hosts, seen
through the API and through Zabbix's own UI, the demo's prefix cleared and removed, and a Zabbix it cannot use
refused in one line before anything starts."""

from __future__ import annotations

import asyncio
import html
import http.cookiejar
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from rwatch.cli.demo.zabbix import DemoZabbix
from rwatch.config import MirrorSinkConfig, SecretUrl, ZabbixSinkConfig
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.zabbix.desired import DesiredState, ZabbixOptions, desired_state
from rwatch.sinks.zabbix.sink import options_of
from tests.downstream.instances import ZABBIX_ADMIN, Zabbix, free_port
from tests.downstream.side import Side
from tests.entrypoint import RWATCH
from tests.integration.test_demo import DemoProcess, clean_env

RUN_SECONDS = 6  # --seconds: long enough for changes to flow after the first, full, reconcile
EXIT_WITHIN = 120.0  # start-up, the run, the stop and the removal, on a slow machine


@pytest.fixture
def prefix(unique: str) -> str:
    return f"BK-demo-{unique}"


@pytest.fixture
def options(zabbix: Zabbix, prefix: str) -> ZabbixOptions:
    """What the demo's own sink makes of the topology (its table, as the demo embeds it)."""
    table = DemoZabbix(zabbix.url, prefix).sink("mirror")
    return options_of(ZabbixSinkConfig.model_validate(table))


def run_demo(tmp: Path, zabbix: Zabbix, prefix: str, *extra: str) -> DemoProcess:
    """The demo for RUN_SECONDS, to its exit 0; its output checked for the zabbix sink's line."""
    demo = DemoProcess([RWATCH, "demo", "--port", "0", "--dir", str(tmp), "--rate", "5",
                        "--seconds", str(RUN_SECONDS), "--zabbix", zabbix.url.removesuffix("api_jsonrpc.php"),
                        "--zabbix-prefix", prefix, *extra], cwd=tmp.parent, env=clean_env())
    try:
        demo.expect(rf"zabbix\s+{re.escape(zabbix.url)}\s+\(Zabbix 6\.0", timeout=60)
        hosts = demo.expect(r"zabbix hosts=([1-9]\d*) ", timeout=60)  # the view's line: the sink keeps hosts
        assert int(hosts.group(1)) > 0
        assert demo.wait(EXIT_WITHIN) == 0, demo.output()
    finally:
        demo.kill()
    assert "Traceback" not in demo.output()
    return demo


async def mirror_desired(mirror_file: Path, options: ZabbixOptions) -> DesiredState:
    """What the demo's mirror calls for, read the way the sink reads it."""
    async with MirrorSink("mirror", MirrorSinkConfig(kind="mirror", url=SecretUrl(f"sqlite:///{mirror_file}"))) as m:
        rows = await m.topology()
        facts = await m.host_facts()
    live = [i for i, f in facts.items() if not f.deleted]
    return desired_state(rows, options, live, {i: f.os_type for i, f in facts.items()})


def ui_page(frontend: str, page: str) -> str:
    """A page of Zabbix's UI as a person sees it: signed in through the login form, signed out after."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    user, password = ZABBIX_ADMIN
    form = urllib.parse.urlencode({"name": user, "password": password, "enter": "Sign in"}).encode()
    opener.open(frontend + "index.php", data=form, timeout=30).close()
    try:
        with opener.open(frontend + page, timeout=30) as response:
            return str(response.read().decode("utf-8"))
    finally:
        opener.open(frontend + "index.php", data=b"reconnect=1", timeout=30).close()  # the session ends


def test_the_demo_puts_the_simulated_topology_into_zabbix_and_its_ui(
        tmp_path: Path, zabbix: Zabbix, prefix: str, options: ZabbixOptions, side: Side) -> None:
    demo = run_demo(tmp_path / "demo", zabbix, prefix, "--zabbix-keep")
    assert f"stay in Zabbix under {prefix}" in demo.output()

    desired = asyncio.run(mirror_desired(tmp_path / "demo" / "demo-mirror.db", options))
    assert desired.hosts, "the demo's mirror holds hosts"
    side.assert_equal(desired)  # groups (parents included, no others) and hosts equal to the mirror's topology
    modules = [name for key, name in desired.groups.items() if len(key) == 3]
    assert modules and all(re.fullmatch(rf"{re.escape(prefix)}/[^/]+/[^/]+/[^/]+", name) for name in modules)
    assert {h["host"] for h in side.hosts().values()} == {f"{prefix}-{i}" for i in desired.hosts}

    # Zabbix's own UI lists them: Configuration -> Host groups, filtered by the prefix, as the banner says.
    page = re.search(r"in its UI: (http://\S+)", demo.output())
    assert page, demo.output()
    frontend = zabbix.url.removesuffix("api_jsonrpc.php")
    assert page.group(1).startswith(frontend + "hostgroups.php?")
    listed = ui_page(frontend, page.group(1).removeprefix(frontend))
    for name in desired.groups.values():
        assert html.escape(name, quote=False) in listed, f"{name} not in the UI's host group list"

    # A second demo under the prefix starts from nothing and, without --zabbix-keep, leaves nothing.
    kept = len(side.hosts())
    again = run_demo(tmp_path / "again", zabbix, prefix)
    assert f"removed {kept} hosts an earlier demo left in Zabbix under {prefix}" in again.output()
    assert side.hosts() == {} and side.groups() == {}, "the demo removed its hosts and groups at exit"


def demo_refused(tmp_path: Path, *argv: str, **env: str) -> str:
    out = subprocess.run([RWATCH, "demo", "--port", "0", "--dir", str(tmp_path), "--seconds", "5", *argv],
                         capture_output=True, text=True, timeout=120, env=clean_env(**env))
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr and "rwatch demo: a simulated CMDB" not in out.stdout, out
    [line] = out.stderr.strip().splitlines()  # one line
    return line


def test_a_zabbix_that_cannot_be_reached_or_refuses_the_login_stops_the_demo_in_one_line(
        tmp_path: Path, zabbix: Zabbix) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/"
    line = demo_refused(tmp_path / "a", "--zabbix", nowhere)
    assert line.startswith(f"rwatch demo: --zabbix: cannot reach Zabbix's API at {nowhere}api_jsonrpc.php: ")

    # A user that does not exist: a wrong password for Admin would block the account the other tests use.
    line = demo_refused(tmp_path / "b", "--zabbix", zabbix.url, "--zabbix-user", "rwatch-nobody",
                        "--zabbix-password", "wrong")
    assert line.startswith(f"rwatch demo: --zabbix: Zabbix at {zabbix.url} refused the login as rwatch-nobody: ")

    # The secret from the environment (kept out of ps and the shell's history): the token is the one refused.
    line = demo_refused(tmp_path / "d", "--zabbix", zabbix.url, RWATCH_DEMO_ZABBIX_TOKEN="0" * 64)
    assert line.startswith(f"rwatch demo: --zabbix: Zabbix at {zabbix.url} refused the API token: "), line

    line = demo_refused(tmp_path / "c", "--zabbix", zabbix.url.removesuffix("api_jsonrpc.php") + "no/such/")
    assert "is not Zabbix's API: apiinfo.version: HTTP 404" in line


@pytest.mark.parametrize(("given", "endpoint"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/api_jsonrpc.php"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/api_jsonrpc.php"),
    ("https://zbx.example.com/zabbix/", "https://zbx.example.com/zabbix/api_jsonrpc.php"),
    ("https://zbx.example.com/zabbix/index.php?x=1", "https://zbx.example.com/zabbix/api_jsonrpc.php"),
    ("http://h/zabbix/api_jsonrpc.php", "http://h/zabbix/api_jsonrpc.php"),
])
def test_the_zabbix_url_may_be_the_frontend_or_the_endpoint(given: str, endpoint: str) -> None:
    from rwatch.cli.demo.zabbix import api_url

    assert api_url(given) == endpoint
    with pytest.raises(ValueError, match="not an http"):
        api_url("zbx.example.com/zabbix")


@pytest.mark.parametrize(("version", "page"), [
    ("6.0.14", "hostgroups.php?filter_name=BK-demo&filter_set=1"),
    ("6.2.9", "hostgroups.php?filter_name=BK-demo&filter_set=1"),
    ("6.4.0", "zabbix.php?action=hostgroup.list&filter_name=BK-demo&filter_set=1"),
    ("7.0.5", "zabbix.php?action=hostgroup.list&filter_name=BK-demo&filter_set=1"),
])
def test_the_banners_ui_link_follows_the_host_group_page_to_where_the_version_has_it(version: str, page: str) -> None:
    """6.0 is checked in the UI above; 6.4 moved the page (only this table checks that link)."""
    from rwatch.cli.demo.zabbix import DemoZabbix
    from rwatch.sinks.zabbix.api import ApiVersion

    assert DemoZabbix("http://z/api_jsonrpc.php").groups_page(ApiVersion.parse(version)) == f"http://z/{page}"
