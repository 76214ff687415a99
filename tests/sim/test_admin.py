"""The admin API over HTTP: what a test or a user drives a simulator in another process with."""

from __future__ import annotations

import asyncio

from rwatch.sim.parts import SimOptions
from rwatch.sim.server import serve


async def call(http, sim, method, path, json=None, status=200):
    async with http.request(method, sim.url + path, json=json) as resp:
        body = await resp.json()
        assert resp.status == status, body
        return body


async def test_object_crud_and_truth(sim, http):
    host = await call(http, sim, "POST", "/admin/objects/host", {"bk_host_name": "web-1"}, status=201)
    key = str(host["bk_host_id"])
    assert (await call(http, sim, "GET", f"/admin/objects/host/{key}"))["bk_host_name"] == "web-1"
    updated = await call(http, sim, "PATCH", f"/admin/objects/host/{key}", {"operator": "bob"})
    assert (updated["operator"], updated["bk_host_name"]) == ("bob", "web-1")
    truth = await call(http, sim, "GET", "/admin/objects/host")
    assert truth[key] == updated
    assert truth == sim.state.objects("host")
    await call(http, sim, "DELETE", f"/admin/objects/host/{key}")
    assert key not in await call(http, sim, "GET", "/admin/objects/host")
    await call(http, sim, "GET", f"/admin/objects/host/{key}", status=404)
    await call(http, sim, "GET", "/admin/objects/nope", status=404)


async def test_object_instance_keys_in_paths(sim, http):
    inst = await call(
        http, sim, "POST", "/admin/objects/object_instance", {"bk_obj_id": "router"}, status=201
    )
    key = f"router:{inst['bk_inst_id']}"
    await call(http, sim, "PATCH", f"/admin/objects/object_instance/{key}", {"bk_inst_name": "r"})
    await call(http, sim, "DELETE", f"/admin/objects/object_instance/{key}")


async def test_move_and_refusals(sim, http):
    modules = [m for m in sim.state.objects("module").values() if m["bk_biz_id"] == 2][:2]
    ids = [m["bk_module_id"] for m in modules]
    rows = await call(http, sim, "POST", "/admin/hosts/1/move", {"module_ids": ids})
    assert sorted(r["bk_module_id"] for r in rows) == sorted(ids)
    body = await call(http, sim, "DELETE", f"/admin/objects/module/{ids[0]}", status=409)
    assert "hosts" in body["error"]
    await call(http, sim, "POST", "/admin/hosts/1/move", {"module_ids": "x"}, status=400)
    await call(http, sim, "PATCH", "/admin/objects/host_relation/1:2", {}, status=400)


async def test_chain_clock_and_stats(sim, http):
    chain = await call(http, sim, "GET", "/admin/chain/host?since=3&limit=2")
    assert [n["seq"] for n in chain["nodes"]] == [3, 4]
    assert chain["nodes"][0]["cursor"] == sim.state.chain("host")[3].cursor
    assert chain["end"] == len(sim.state.chain("host"))
    before = (await call(http, sim, "GET", "/admin/clock"))["now"]
    after = (await call(http, sim, "POST", "/admin/clock", {"jump": 3600}))["now"]
    assert after - before >= 3600
    stats = await call(http, sim, "GET", "/admin/stats")
    assert stats["events_total"] == sim.state.events_total
    assert stats["chains"]["host"]["end"] == chain["end"]


async def test_load_run_and_background_load(sim, http):
    body = await call(http, sim, "POST", "/admin/load/run", {"ops": 300, "seed": 3})
    assert sum(body["applied"].values()) == 300
    assert body["events"] >= 300
    changed = asyncio.Event()
    sim.state.listeners.append(lambda resource: changed.set())
    await call(http, sim, "POST", "/admin/load", {"rate": 200, "mix": {"host.update": 1}})
    async with asyncio.timeout(5):
        await changed.wait()
    status = await call(http, sim, "GET", "/admin/load")
    assert status["running"] is True
    await call(http, sim, "POST", "/admin/load", {"rate": 0})
    assert (await call(http, sim, "GET", "/admin/load"))["running"] is False
    await call(http, sim, "POST", "/admin/load/run", {"ops": 1, "mix": {"nope": 1}}, status=400)


async def test_permissions_endpoint(sim, http):
    await call(http, sim, "POST", "/admin/permissions", {"deny": ["project"]})
    async with http.post(sim.url + "/api/v3/event/watch/resource/project", json={}) as resp:
        assert (await resp.json())["code"] == 9900403
    await call(http, sim, "POST", "/admin/permissions", {"deny": []})
    async with http.post(sim.url + "/api/v3/event/watch/resource/project", json={}) as resp:
        assert (await resp.json())["result"] is True


async def test_serve_runs_until_stop(http):
    stop = asyncio.Event()
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(SimOptions(port=0, hold=0.2), stop, started.set_result))
    async with asyncio.timeout(5):
        sim = await started
    health = await call(http, sim, "GET", "/admin/health")
    assert health["ok"] is True
    assert health["url"] == sim.url
    stop.set()
    async with asyncio.timeout(5):
        await task


async def test_denied_is_the_live_set_of_the_permissions(sim, http):
    sim.denied.add("project")  # tests and embedders edit it in place
    async with http.post(sim.url + "/api/v3/event/watch/resource/project", json={}) as resp:
        assert (await resp.json())["code"] == 9900403
    await call(http, sim, "POST", "/admin/permissions", {"deny": ["plat"]})
    assert sim.denied == {"plat"}
    sim.denied.clear()
    assert (await call(http, sim, "GET", "/admin/permissions"))["deny"] == []
