"""A user who is not a CMDB administrator (§6, §10.5): businesses IAM hides are dropped or refused by the
list APIs, exactly as CMDB does, while their watch events still stream."""

from __future__ import annotations

import pytest

GW = "/api/bk-cmdb/prod"
ESB = "/api/c/compapi/v2/cc/{}/"
WATCH = "/api/v3/event/watch/resource/{}"


async def call(http, sim, path, body=None):
    async with http.post(sim.url + path, json=body or {}) as resp:
        assert resp.status == 200
        return await resp.json()


async def ok(http, sim, path, body=None):
    reply = await call(http, sim, path, body)
    assert reply["result"] is True, reply
    return reply["data"]


async def test_search_business_leaves_a_hidden_business_out_even_when_asked_by_id(make_sim, http):
    sim = await make_sim(hidden_bizs=frozenset({2}))
    data = await ok(http, sim, GW + "/api/v3/biz/search/0", {"fields": ["bk_biz_id"]})
    assert [b["bk_biz_id"] for b in data["info"]] == [3]
    by_id = {"condition": {"bk_biz_id": 2}}
    assert await ok(http, sim, GW + "/api/v3/biz/search/0", by_id) == {"count": 0, "info": []}  # like deleted
    rule = {"field": "bk_biz_id", "operator": "in", "value": [2, 3]}
    flt = {"biz_property_filter": {"condition": "AND", "rules": [rule]}}
    assert (await ok(http, sim, ESB.format("search_business"), flt))["count"] == 1
    # Businesses created later are visible unless hidden.
    new = sim.state.create("biz", {"bk_biz_name": "later"})["bk_biz_id"]
    data = await ok(http, sim, GW + "/api/v3/biz/search/0", {"fields": ["bk_biz_id"]})
    assert [b["bk_biz_id"] for b in data["info"]] == [3, new]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v3/set/search/0/2", {}),
        ("/api/v3/module/search/0/2/0", {}),
        ("/api/v3/hosts/app/2/list_hosts", {"fields": ["bk_host_id"]}),
        ("/api/v3/hosts/app/2/list_hosts_topo", {}),
        ("/api/v3/find/topoinst/biz/2", {}),
        ("/api/v3/host/topo/relation/read", {"bk_biz_id": 2}),
    ],
)
async def test_apis_naming_a_hidden_business_answer_9900403_view_business(make_sim, http, path, body):
    sim = await make_sim(hidden_bizs=frozenset({2}))
    reply = await call(http, sim, GW + path, body)
    assert (reply["result"], reply["code"], reply["data"]) == (False, 9900403, None)
    action = reply["permission"]["actions"][0]
    assert action["id"] == "view_business"
    instance = action["related_resource_types"][0]["instances"][0][0]
    name = sim.state.get("biz", "2")["bk_biz_name"]
    assert (instance["type"], instance["id"], instance["name"]) == ("biz", "2", name)
    other = path.replace("/2", "/3") if "/2" in path else path
    assert (await call(http, sim, GW + other, {**body, "bk_biz_id": 3}))["result"] is True


async def test_esb_search_set_for_a_hidden_business_is_9900403(make_sim, http):
    sim = await make_sim(hidden_bizs=frozenset({3}))
    reply = await call(http, sim, ESB.format("search_set"), {"bk_biz_id": 3})
    assert (reply["code"], reply["permission"]["actions"][0]["id"]) == (9900403, "view_business")


async def test_hosts_and_relations_of_hidden_businesses_are_left_out_but_their_events_stream(make_sim, http):
    sim = await make_sim(hidden_bizs=frozenset({2}))
    relations = sim.state.objects("host_relation").values()
    in_two = {r["bk_host_id"] for r in relations if r["bk_biz_id"] == 2}
    assert in_two
    data = await ok(http, sim, GW + "/api/v3/hosts/list_hosts_without_app", {"page": {"limit": 500}})
    listed = {h["bk_host_id"] for h in data["info"]}
    assert listed == {int(k) for k in sim.state.objects("host")} - in_two
    assert data["count"] == len(listed)
    every = sorted(int(k) for k in sim.state.objects("host"))
    rows = await ok(http, sim, GW + "/api/v3/hosts/modules/read", {"bk_host_id": every})
    assert rows and all(r["bk_biz_id"] != 2 for r in rows)
    assert {r["bk_host_id"] for r in rows} == set(every) - in_two

    # Watching is authorised per resource type: events of the hidden business still stream.
    since = int(sim.state.clock.now()) - 60
    host = min(in_two)
    set_id = next(s for s in sim.state.objects("set").values() if s["bk_biz_id"] == 2)["bk_set_id"]
    sim.state.update("set", str(set_id), {"bk_set_name": "renamed"})
    module = sim.state.create("module", {"bk_set_id": set_id})["bk_module_id"]
    sim.state.move_host(host, [module])
    data = await ok(
        http, sim, GW + WATCH.format("set"), {"bk_fields": ["bk_set_id", "bk_biz_id"], "bk_start_from": since}
    )
    assert {"bk_set_id": set_id, "bk_biz_id": 2} in [e["bk_detail"] for e in data["bk_events"]]
    data = await ok(http, sim, GW + WATCH.format("host_relation"), {"bk_start_from": since})
    details = [e["bk_detail"] for e in data["bk_events"]]
    assert any(d["bk_host_id"] == host and d["bk_module_id"] == module and d["bk_biz_id"] == 2 for d in details)


async def test_hide_bizs_at_runtime_through_the_admin_api(sim, http):
    async with http.post(sim.url + "/admin/permissions", json={"hide_bizs": [3]}) as resp:
        assert await resp.json() == {"deny": [], "deny_apis": [], "hide_bizs": [3]}
    reply = await call(http, sim, GW + "/api/v3/set/search/0/3")
    assert reply["code"] == 9900403
    async with http.post(sim.url + "/admin/permissions", json={"hide_bizs": ["3"]}) as resp:
        assert resp.status == 400
    async with http.post(sim.url + "/admin/permissions", json={"hide_bizs": []}) as resp:
        assert (await resp.json())["hide_bizs"] == []
    assert (await call(http, sim, GW + "/api/v3/set/search/0/3"))["result"] is True
