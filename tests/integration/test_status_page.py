"""The status page as a person sees it: loaded in headless Chromium, it shows every enabled resource with its lag.

Chromium prints the DOM after the page's script ran (``--dump-dom``); ``--virtual-time-budget`` lets the page
fetch /status and render before the dump. Locally a missing Chromium skips the test; with CI=true it fails it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from rwatch import __version__
from rwatch.app import run_async
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from tests.integration.harness import Setup

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RESOURCES = ["biz", "set", "module", "host", "host_relation"]


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if IN_CI:
            pytest.fail("chromium is not installed and CI=true: the status page test must run "
                        "(apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


class Rows(HTMLParser):
    """Each ``<tr data-resource>``: its cells' text and the lag cell's ``data-lag``; the text of each ``<span id>``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, object]] = {}
        self.spans: dict[str, str] = {}
        self._row: dict[str, object] | None = None
        self._cell: list[str] | None = None
        self._span: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "tr" and attr.get("data-resource"):
            self._row = self.rows[str(attr["data-resource"])] = {"cells": [], "lag": None, "class": attr.get("class")}
        elif tag == "td" and self._row is not None:
            self._cell = []
            if "data-lag" in attr:
                self._row["lag"] = attr["data-lag"]
        elif tag == "span" and attr.get("id"):
            self._span = str(attr["id"])
            self.spans[self._span] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            cells = self._row["cells"]
            assert isinstance(cells, list)
            cells.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "span":
            self._span = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._span is not None:
            self.spans[self._span] += data


async def dump_dom(chromium: str, url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out.decode()


async def test_status_page_shows_every_enabled_resource_with_its_lag(chromium: str, tmp_path: Path) -> None:
    async with Simulator(SimOptions(port=0, hold=0.5, seed=9, bizs=2, hosts=20)) as sim:
        setup = Setup(tmp_path, sim.url, "amqp://unused.invalid/", "page", RESOURCES, bus="memory")
        config = setup.config()
        stop = asyncio.Event()
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        daemon = asyncio.create_task(run_async(config, stop, role="all", http_port=port))
        try:
            base = f"http://127.0.0.1:{await asyncio.wait_for(port, 30)}"
            # The page shows what /status says: wait until every watcher holds its lease and has polled.
            deadline = time.monotonic() + 30
            async with aiohttp.ClientSession() as session:
                while True:
                    async with session.get(f"{base}/status") as resp:
                        doc = await resp.json()
                    if all(r["leader"] and r["polled_ago_s"] is not None for r in doc["resources"]):
                        break
                    assert time.monotonic() < deadline, doc
                    await asyncio.sleep(0.1)
            sim.load.run(30)  # some traffic, so the page is not only zeros

            dom = await dump_dom(chromium, f"{base}/", tmp_path / "chromium")
        finally:
            stop.set()
            await asyncio.wait_for(daemon, 30)

    page = Rows()
    page.feed(dom)
    assert sorted(page.rows) == sorted(config.watch.enabled) == sorted(RESOURCES)
    for resource, row in page.rows.items():
        lag = row["lag"]
        assert isinstance(lag, str) and lag, f"{resource}: no lag on the page: {row}"
        assert 0.0 <= float(lag) < 60.0, f"{resource}: lag {lag!r}"
        cells = row["cells"]
        assert isinstance(cells, list)
        # What a person reads: the name, the mode, that this process leads, the lag in seconds, no alarm.
        assert cells[0] == resource and cells[1] in ("now", "cursor", "start_from") and cells[2] == "yes"
        assert cells[3].endswith(" s") and row["class"] != "alarm" and cells[-1] == "ok"
    assert f"version {__version__}" in page.spans["meta"] and "role all" in page.spans["meta"]
    assert page.spans["state"] == ""  # no "status unavailable"
    assert '<tr data-sink="mirror">' in dom
