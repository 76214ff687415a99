"""prom_sd on a real mirror: events applied to SQLite become Prometheus targets in the file and at /sd."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from rwatch.config import Config
from rwatch.events import Event, iso_utc, watch_event_id
from rwatch.http import serve_http
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.prom_sd import PromSdSink, sd_routes
from rwatch.sinks.registry import make_sink

N = 0


def event(resource: str, key: str, data: dict[str, object], action: str = "create") -> Event:
    global N
    N += 1
    cursor = f"{resource}-{N}"
    return Event(id=watch_event_id(resource, cursor), resource=resource, action=action,  # type: ignore[arg-type]
                 key=key, version=(1_700_000_000, N), occurred_at=iso_utc(1_700_000_000),
                 observed_at=iso_utc(1_700_000_000), cursor=cursor, data=data)


async def test_targets_follow_the_mirror(tmp_path: Path) -> None:
    config = Config.model_validate({"sinks": {
        "mirror": {"kind": "mirror", "url": f"sqlite:///{tmp_path}/m.db"},
        "sd": {"kind": "prom_sd", "source": "mirror", "file": str(tmp_path / "sd" / "targets.json"),
               "jobs": [{"name": "node", "port": 9100}, {"name": "web", "port": 80, "module": ["nginx"]}]},
    }})
    mirror = make_sink("mirror", config)
    sd = make_sink("sd", config, {"mirror": mirror})
    assert isinstance(mirror, MirrorSink) and isinstance(sd, PromSdSink)
    await mirror.open()
    await sd.open()
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve_http("127.0.0.1:0", lambda: True, stop, bound, routes=sd_routes([sd])))
    port = await bound
    try:
        # Across resources there is no order: the relation comes before its host and module.
        await mirror.apply([event("host_relation", "7:30", {"bk_biz_id": 2, "bk_set_id": 20, "bk_module_id": 30,
                                                            "bk_host_id": 7})])
        await mirror.apply([event("host", "7", {"bk_host_id": 7, "bk_host_innerip": "10.0.0.7,10.0.1.7",
                                                "bk_cloud_id": 0, "bk_host_name": "web-7"})])
        await mirror.apply([event("module", "30", {"bk_module_id": 30, "bk_module_name": "nginx"})])
        await mirror.apply([event("set", "20", {"bk_set_id": 20, "bk_set_name": "prod"})])
        await mirror.apply([event("biz", "2", {"bk_biz_id": 2, "bk_biz_name": "shop"})])
        path = tmp_path / "sd" / "targets.json"
        expected_node = {"targets": ["10.0.0.7:9100"], "labels": {
            "job": "node", "bk_biz_id": "2", "bk_biz_name": "shop", "bk_set_id": "20", "bk_set_name": "prod",
            "bk_module_id": "30", "bk_module_name": "nginx", "bk_host_id": "7", "bk_host_name": "web-7",
            "bk_cloud_id": "0", "tenant": "0"}}
        expected_web = {**expected_node, "targets": ["10.0.0.7:80"],
                        "labels": {**expected_node["labels"], "job": "web"}}
        await sd.render_once()  # what the debouncer does after a commit, done now: the file is what matters here
        assert json.loads(path.read_bytes()) == [expected_node, expected_web]
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/sd") as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.json() == [expected_node, expected_web]
        # The host leaves the module: its targets go.
        await mirror.apply([event("host_relation", "7:30", {"bk_biz_id": 2, "bk_set_id": 20, "bk_module_id": 30,
                                                            "bk_host_id": 7}, action="delete")])
        await sd.render_once()
        assert json.loads(path.read_bytes()) == []
    finally:
        stop.set()
        await server
        await sd.close()
        await mirror.close()
