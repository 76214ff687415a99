"""/metrics and the README agree: every documented name is exposed, every exposed rwatch_ name is documented,
and the exposition parses with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from rwatch import app as _app  # noqa: F401  (imports every module that registers metrics)
from rwatch.http import serve_http

README = Path(__file__).resolve().parents[1] / "README.md"


def documented() -> set[str]:
    """The names in the first column of the README's metrics table."""
    text = README.read_text()
    table = text[text.index("| metric | labels | meaning |"):]
    table = table[: table.index("\n\n")]
    names: set[str] = set()
    for line in table.splitlines()[2:]:
        first = line.split("|")[1]
        names.update(re.findall(r"`(rwatch_[a-z_]+)`", first))
    return names


def family(name: str) -> str:
    # prometheus-client names a counter's family without its _total suffix.
    return name.removesuffix("_total")


async def test_metrics_parse_and_match_the_readme() -> None:
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve_http("127.0.0.1:0", lambda: True, stop, bound))
    try:
        port = await asyncio.wait_for(bound, 10)
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            exposition = await resp.text()
    finally:
        stop.set()
        await server
    families = {f.name for f in text_string_to_metric_families(exposition) if f.name.startswith("rwatch_")}
    docs = documented()
    assert len(docs) > 40
    assert not {n for n in docs if family(n) not in families}, "documented but not exposed"
    # prometheus-client adds a <name>_created family beside each unlabelled counter: not ours to document.
    ours = {f for f in families if not (f.endswith("_created") and f.removesuffix("_created") in families)}
    assert not ours - {family(n) for n in docs}, "exposed but not documented in the README"
