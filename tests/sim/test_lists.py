"""The list APIs for resync (§6): paths, paging limits, the search_business quirks, and that a full
list reproduces the simulator's truth."""

from __future__ import annotations

import json

import pytest

from rwatch.cmdb.protocol import CODE_PAGE_LIMIT
from rwatch.sim.query import match_condition

GW = "/api/bk-cmdb/prod"
ESB = "/api/c/compapi/v2/cc/{}/"
CREDS = {"bk_app_code": "a", "bk_app_secret": "b", "bk_username": "admin"}


async def call(http, sim, path, body=None, prefix=GW, **kwargs):
    async with http.post(sim.url + prefix + path, json=body or {}, **kwargs) as resp:
        assert resp.status == 200
        return await resp.json()


async def ok(http, sim, path, body=None, prefix=GW):
    reply = await call(http, sim, path, body, prefix)
    assert reply["result"] is True, reply
    return reply["data"]


async def list_all(http, sim, path, body, limit):
    """Page through an API with offset paging, as a resync would."""
    out, start = [], 0
    while True:
        data = await ok(http, sim, path, {**body, "page": {"start": start, "limit": limit}})
        out.extend(data["info"])
        start += limit
        if start >= data["count"]:
            return out


async def list_until_short(http, sim, path, body, limit):
    """Page through an API that answers count 0 on detail pages (§10.5): until a page comes back short."""
    out, start = [], 0
    while True:
        page = (await ok(http, sim, path, {**body, "page": {"start": start, "limit": limit}}))["info"]
        out.extend(page)
        start += limit
        if len(page) < limit:
            return out


async def test_search_business_hides_the_pool_and_archived(sim, http):
    sim.state.update("biz", "2", {"bk_data_status": "disabled"})
    data = await ok(http, sim, "/api/v3/biz/search/0", {"fields": ["bk_biz_id", "bk_biz_name"]})
    assert [b["bk_biz_id"] for b in data["info"]] == [3]
    assert set(data["info"][0]) == {"bk_biz_id", "bk_biz_name"}
    cond = {"condition": {"bk_data_status": "disabled"}}
    assert [b["bk_biz_id"] for b in (await ok(http, sim, "/api/v3/biz/search/0", cond))["info"]] == [2]
    cond = {"condition": {"default": 1}}  # the pool is never returned, whatever the caller asks
    assert (await ok(http, sim, "/api/v3/biz/search/0", cond))["count"] == 0
    flt = {
        "biz_property_filter": {
            "condition": "AND",
            "rules": [{"field": "bk_data_status", "operator": "not_equal", "value": "x"}],
        }
    }
    assert (await ok(http, sim, "/api/v3/biz/search/0", flt))["count"] == 2


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/api/v3/biz/search/0", 201),
        ("/api/v3/findmany/biz_set", 501),
        ("/api/v3/set/search/0/2", 501),
        ("/api/v3/module/search/0/2/2", 501),
        ("/api/v3/hosts/app/2/list_hosts", 501),
        ("/api/v3/hosts/app/2/list_hosts_topo", 501),
        ("/api/v3/host/topo/relation/read", 501),
        ("/api/v3/hosts/list_hosts_without_app", 501),
        ("/api/v3/findmany/cloudarea", 1001),
        ("/api/v3/search/instances/object/switch", 501),
        ("/api/v3/findmany/project", 501),
    ],
)
async def test_limit_above_the_maximum_is_refused(sim, http, path, limit):
    body = {
        "fields": ["bk_host_id"],
        "bk_biz_id": 2,
        "bk_biz_set_id": 1,
        "page": {"start": 0, "limit": limit},
    }
    reply = await call(http, sim, path, body)
    assert (reply["result"], reply["code"]) == (False, CODE_PAGE_LIMIT)
    assert str(limit) in reply["message"]
    body["page"]["limit"] = limit - 1
    assert (await call(http, sim, path, body))["result"] is True


async def test_module_limit_zero_means_20_and_cloud_area_1000(sim, http):
    for i in range(25):
        sim.state.create("module", {"bk_set_id": 2, "bk_module_name": f"m{i}"})
        sim.state.create("plat", {"bk_cloud_name": f"c{i}"})
    data = await ok(http, sim, "/api/v3/module/search/0/2/2", {"page": {"start": 0, "limit": 0}})
    assert (data["count"], len(data["info"])) == (27, 20)
    data = await ok(http, sim, "/api/v3/findmany/cloudarea", {"page": {"limit": 0}})
    assert len(data["info"]) == data["count"] == 27


async def test_paging_is_sorted_by_id_and_reproduces_the_truth(sim, http):
    sim.load.run(2000)
    hosts = await list_all(http, sim, "/api/v3/hosts/list_hosts_without_app", {"fields": []}, 7)
    assert [h["bk_host_id"] for h in hosts] == sorted(int(k) for k in sim.state.objects("host"))
    assert {str(h["bk_host_id"]): h for h in hosts} == sim.state.objects("host")
    rows = []
    for biz in sim.state.objects("biz"):
        start = 0
        while True:
            data = await ok(
                http,
                sim,
                "/api/v3/host/topo/relation/read",
                {"bk_biz_id": int(biz), "page": {"start": start, "limit": 50}},
            )
            rows.extend(data["data"])
            start += 50
            if start >= data["count"]:
                break
    assert {f"{r['bk_host_id']}:{r['bk_module_id']}": r for r in rows} == sim.state.objects("host_relation")
    sets = []
    for biz in sim.state.objects("biz"):
        sets += await list_all(http, sim, f"/api/v3/set/search/0/{biz}", {}, 10)
    assert {str(s["bk_set_id"]): s for s in sets} == sim.state.objects("set")
    modules = []
    for biz in sim.state.objects("biz"):
        modules += await list_all(http, sim, f"/api/v3/module/search/0/{biz}/0", {}, 10)
    assert {str(m["bk_module_id"]): m for m in modules} == sim.state.objects("module")
    projects = await list_until_short(http, sim, "/api/v3/findmany/project", {}, 5)
    assert {str(p["id"]): p for p in projects} == sim.state.objects("project")
    plats = await list_all(http, sim, "/api/v3/findmany/cloudarea", {}, 5)
    assert {str(p["bk_cloud_id"]): p for p in plats} == sim.state.objects("plat")


async def test_sort_descending_and_sort_field(sim, http):
    data = await ok(http, sim, "/api/v3/findmany/cloudarea", {"page": {"sort": "-bk_cloud_id", "limit": 10}})
    ids = [p["bk_cloud_id"] for p in data["info"]]
    assert ids == sorted(ids, reverse=True)


async def test_biz_hosts_and_topo(sim, http):
    reply = await call(http, sim, "/api/v3/hosts/app/2/list_hosts", {"page": {"limit": 10}})
    assert reply["result"] is False  # fields is required
    data = await ok(
        http, sim, "/api/v3/hosts/app/2/list_hosts", {"fields": ["bk_host_id"], "page": {"limit": 500}}
    )
    in_biz = {r["bk_host_id"] for r in sim.state.objects("host_relation").values() if r["bk_biz_id"] == 2}
    assert {h["bk_host_id"] for h in data["info"]} == in_biz
    assert all(set(h) == {"bk_host_id"} for h in data["info"])
    module = next(iter(sim.state.objects("host_relation").values()))["bk_module_id"]
    data = await ok(
        http, sim, "/api/v3/hosts/app/2/list_hosts", {"fields": ["bk_host_id"], "bk_module_ids": [module]}
    )
    assert {h["bk_host_id"] for h in data["info"]} == sim.state.module_hosts(module)
    data = await ok(
        http, sim, "/api/v3/hosts/app/2/list_hosts_topo", {"page": {"limit": 500, "sort": "-bk_host_id"}}
    )
    ids = [i["host"]["bk_host_id"] for i in data["info"]]
    assert ids == sorted(in_biz)  # always sorted by bk_host_id
    topo = data["info"][0]["topo"][0]
    assert set(topo) == {"bk_set_id", "bk_set_name", "module"}
    prop = {
        "host_property_filter": {
            "condition": "AND",
            "rules": [{"field": "bk_host_id", "operator": "equal", "value": ids[0]}],
        },
        "fields": ["bk_host_id"],
    }
    assert (await ok(http, sim, "/api/v3/hosts/app/2/list_hosts", prop))["count"] == 1


async def test_biz_sets_topo_and_instances(sim, http):
    data = await ok(http, sim, "/api/v3/findmany/biz_set", {"page": {"enable_count": True}})
    assert data == {"count": 1, "info": []}
    data = await ok(http, sim, "/api/v3/findmany/biz_set", {"page": {"limit": 10}})
    assert data["info"][0]["bk_biz_set_name"] == "all"
    data = await ok(http, sim, "/api/v3/find/biz_set/biz_list", {"bk_biz_set_id": 1, "page": {"limit": 10}})
    assert sorted(b["bk_biz_id"] for b in data["info"]) == [2, 3]
    [tree] = await ok(http, sim, "/api/v3/find/topoinst/biz/2")
    assert (tree["bk_obj_id"], tree["bk_inst_id"]) == ("biz", 2)
    assert len(tree["child"]) == 2
    assert len(tree["child"][0]["child"]) == 2
    data = await ok(http, sim, "/api/v3/search/instances/object/switch", {"page": {"limit": 10}})
    assert [i["bk_obj_id"] for i in data["info"]] == ["switch"]


async def test_esb_names_and_direct_paths(sim, http):
    creds = {"bk_app_code": "a", "bk_app_secret": "b", "bk_username": "admin"}
    data = await ok(http, sim, "", {**creds, "bk_biz_id": 2, "page": {"limit": 10}}, ESB.format("search_set"))
    assert {s["bk_biz_id"] for s in data["info"]} == {2}
    data = await ok(http, sim, "/api/v3/findmany/project", {}, prefix="")
    assert (data["count"], len(data["info"])) == (0, 1)  # a detail page carries no count (§10.5)
    assert sim.stats.lists["search_set"] == 1
    assert sim.stats.lists["list_project"] == 1


async def test_list_auth_and_bad_input(make_sim, http):
    sim = await make_sim(app_code="a", app_secret="b")
    async with http.post(sim.url + GW + "/api/v3/findmany/project", json={}) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == 1640101
    assert (sim.stats.lists["list_project"], sim.stats.refused_count("list_project", "auth")) == (0, 1)
    headers = {
        "X-Bkapi-Authorization": json.dumps({"bk_app_code": "a", "bk_app_secret": "b", "bk_username": "u"})
    }
    reply = await call(http, sim, "/api/v3/set/search/0/999", {}, headers=headers)
    assert reply["data"] == {"count": 0, "info": []}  # as CMDB: an unknown business has no sets
    reply = await call(http, sim, "/api/v3/set/search/0/abc", {}, headers=headers)
    assert (reply["result"], reply["code"]) == (False, 1199006)
    reply = await call(
        http,
        sim,
        "/api/v3/findmany/project",
        {"filter": {"field": "x", "operator": "regex"}},
        headers=headers,
    )
    assert reply["result"] is False  # an unsupported operator is refused, never ignored


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        ({"n": {"$gt": 4}}, True),
        ({"n": {"$gt": 5}}, False),
        ({"n": {"$gte": 5}}, True),
        ({"n": {"$gte": 6}}, False),
        ({"n": {"$lt": 6}}, True),
        ({"n": {"$lt": 5}}, False),
        ({"n": {"$lte": 5}}, True),
        ({"n": {"$lte": 4}}, False),
        ({"n": {"$gt": 1, "$lt": 9}}, True),
        ({"n": {"$gt": 1, "$lt": 5}}, False),
        ({"s": {"$gt": "a"}}, True),
        ({"n": {"$gt": "a"}}, False),  # another type never matches (and never raises)
        ({"none": {"$lt": 99}}, False),  # null never matches a comparison
        ({"missing": {"$gt": -1}}, False),
        ({"missing": {"$gte": 0}}, False),
        ({"missing": {"$lt": 99}}, False),
        ({"missing": {"$lte": 99}}, False),
    ],
)
def test_condition_comparison_operators(cond, expected):
    assert match_condition(cond, {"n": 5, "s": "b", "none": None}) is expected


async def test_condition_comparison_through_the_api(sim, http):
    for i in range(3):
        sim.state.create("plat", {"bk_cloud_name": f"c{i}"})
    body = {"condition": {"bk_cloud_id": {"$gt": 0, "$lte": 2}}}
    data = await ok(http, sim, "/api/v3/findmany/cloudarea", body)
    assert [p["bk_cloud_id"] for p in data["info"]] == [1, 2]
    assert data["count"] == 2


async def keyset(http, sim, path, id_field, limit, *, legacy):
    """Page through an API by the last id seen, as the resync does: always start 0, sorted by the id."""
    ids, last = [], -1
    for _ in range(1000):
        if legacy:
            flt = {"condition": {id_field: {"$gt": last}}}
        else:
            rule = {"field": id_field, "operator": "greater", "value": last}
            flt = {"host_property_filter": {"condition": "AND", "rules": [rule]}, "fields": [id_field]}
        data = await ok(http, sim, path, {**flt, "page": {"start": 0, "limit": limit, "sort": id_field}})
        page = [d[id_field] for d in data["info"]]
        assert len(page) <= limit
        if not page:
            return ids
        assert page == sorted(page) and page[0] > last
        ids += page
        last = page[-1]
    raise AssertionError("keyset paging never ended")


async def test_keyset_paging_returns_everything_once(sim, http):
    for i in range(23):
        sim.state.create("module", {"bk_set_id": 2 + i % 2, "bk_module_name": f"m{i}"})
        sim.state.create("plat", {"bk_cloud_name": f"c{i}"})
    sim.load.run(500)
    modules = await keyset(http, sim, "/api/v3/module/search/0/2/0", "bk_module_id", 4, legacy=True)
    want = sorted(m["bk_module_id"] for m in sim.state.objects("module").values() if m["bk_biz_id"] == 2)
    assert len(want) > 20
    assert modules == want  # sorted, so every module exactly once
    plats = await keyset(http, sim, "/api/v3/findmany/cloudarea", "bk_cloud_id", 5, legacy=True)
    assert plats == sorted(p["bk_cloud_id"] for p in sim.state.objects("plat").values())
    hosts = await keyset(http, sim, "/api/v3/hosts/list_hosts_without_app", "bk_host_id", 7, legacy=False)
    assert hosts == sorted(h["bk_host_id"] for h in sim.state.objects("host").values())


async def test_find_host_biz_relations(sim, http):
    sim.load.run(300)
    hosts = sorted(int(k) for k in sim.state.objects("host"))
    set_id = sim.state.create("set", {"bk_biz_id": 3})["bk_set_id"]
    two = [sim.state.create("module", {"bk_set_id": set_id})["bk_module_id"] for _ in range(2)]
    sim.state.move_host(hosts[1], list(reversed(two)))  # one host in two modules, the larger id first
    asked = [hosts[-1], hosts[1], hosts[0], 10**9, hosts[1]]  # unordered, a duplicate, an unknown host
    relations = sim.state.objects("host_relation").values()
    want = sorted(
        (r for r in relations if r["bk_host_id"] in asked), key=lambda r: (r["bk_host_id"], r["bk_module_id"])
    )
    assert len(want) >= 4
    path = "/api/v3/hosts/modules/read"
    assert await ok(http, sim, path, {"bk_host_id": asked}) == want
    data = await ok(http, sim, path, {"bk_host_id": asked, "bk_biz_id": 3})
    assert data == [r for r in want if r["bk_biz_id"] == 3]
    assert [r["bk_module_id"] for r in data if r["bk_host_id"] == hosts[1]] == sorted(two)
    assert await ok(http, sim, path, {"bk_host_id": [10**9]}) == []
    # direct path and ESB name
    assert await ok(http, sim, path, {"bk_host_id": asked}, prefix="") == want
    body = {**CREDS, "bk_host_id": asked}
    assert await ok(http, sim, "", body, ESB.format("find_host_biz_relations")) == want
    assert sim.stats.lists["find_host_biz_relations"] == 5


@pytest.mark.parametrize(
    "body",
    [{}, {"bk_host_id": []}, {"bk_host_id": 5}, {"bk_host_id": ["x"]}, {"bk_host_id": [1], "bk_biz_id": "y"}],
)
async def test_find_host_biz_relations_needs_host_ids(sim, http, body):
    reply = await call(http, sim, "/api/v3/hosts/modules/read", body)
    assert (reply["result"], reply["code"]) == (False, 1199006)


async def test_find_host_biz_relations_takes_at_most_500_hosts(sim, http):
    reply = await call(http, sim, "/api/v3/hosts/modules/read", {"bk_host_id": list(range(1, 502))})
    assert (reply["result"], reply["code"]) == (False, 1199006)
    assert "bk_host_id" in reply["message"] and "500" in reply["message"]
    data = await ok(http, sim, "/api/v3/hosts/modules/read", {"bk_host_id": list(range(1, 501))})
    assert {r["bk_host_id"] for r in data} == {int(k) for k in sim.state.objects("host")}


COUNT_ONLY = {"enable_count": True, "start": 0, "limit": 0, "sort": ""}


@pytest.mark.parametrize(
    ("resource", "path", "id_field"),
    [("project", "/api/v3/findmany/project", "id"), ("biz_set", "/api/v3/findmany/biz_set", "bk_biz_set_id")],
)
async def test_countless_apis_count_only_on_an_enable_count_request(sim, http, resource, path, id_field):
    for _ in range(6):
        sim.state.create(resource, {})
    total = len(sim.state.objects(resource))
    assert total == 7
    data = await ok(http, sim, path, {"page": {"start": 0, "limit": 3}})
    assert data["count"] == 0  # a detail page never carries the count (§10.5)
    assert len(data["info"]) == 3
    assert await ok(http, sim, path, {"page": COUNT_ONLY}) == {"count": total, "info": []}
    # So paging "while listed < count" stops after one page; page until a short page instead.
    assert len(await list_all(http, sim, path, {}, 3)) == 3
    ids = [d[id_field] for d in await list_until_short(http, sim, path, {}, 3)]
    assert ids == sorted(int(k) for k in sim.state.objects(resource))
    for bad in ({**COUNT_ONLY, "limit": 10}, {**COUNT_ONLY, "start": 1}, {**COUNT_ONLY, "sort": id_field}):
        reply = await call(http, sim, path, {"page": bad})
        assert (reply["result"], reply["code"]) == (False, 1199006)
    esb_name = "list_project" if resource == "project" else "list_business_set"
    reply = await call(http, sim, "", {**CREDS, "page": COUNT_ONLY}, ESB.format(esb_name))
    assert reply["data"] == {"count": total, "info": []}
