"""The ESB components' own forwarding (§10.3): what reaches CMDB is the component's form, not the body."""

from __future__ import annotations

ESB = "/api/c/compapi/v2/cc/{}/"
GW = "/api/bk-cmdb/prod"
CREDS = {"bk_app_code": "a", "bk_app_secret": "b", "bk_username": "admin"}
ENVELOPE = {"result", "code", "message", "permission", "data", "request_id"}


async def esb(http, sim, name, body):
    async with http.post(sim.url + ESB.format(name), json={**CREDS, **body}) as resp:
        assert resp.status == 200  # ESB answers everything with HTTP 200
        reply = await resp.json()
    assert set(reply) == ENVELOPE, reply
    return reply


async def ok(http, sim, name, body):
    reply = await esb(http, sim, name, body)
    assert reply["result"] is True, reply
    return reply["data"]


def greater(field, value):
    return {"condition": "AND", "rules": [{"field": field, "operator": "greater", "value": value}]}


async def test_search_set_drops_filter_so_keyset_paging_by_filter_repeats_the_first_page(sim, http):
    for i in range(10):
        sim.state.create("set", {"bk_biz_id": 2, "bk_set_name": f"s{i}"})
    page = {"start": 0, "limit": 5, "sort": "bk_set_id"}
    first = await ok(http, sim, "search_set", {"bk_biz_id": 2, "page": page})
    last = first["info"][-1]["bk_set_id"]
    second = await ok(http, sim, "search_set", {"bk_biz_id": 2, "page": page, "filter": greater("bk_set_id", last)})
    assert second == first  # the same page, the same count: the form has no filter
    assert first["count"] == 12
    # The gateway path does honour it, so the difference is the ESB's alone.
    async with http.post(
        sim.url + GW + "/api/v3/set/search/0/2", json={"page": page, "filter": greater("bk_set_id", last)}
    ) as resp:
        gw = (await resp.json())["data"]
    assert gw["info"][0]["bk_set_id"] > last
    # condition is in the form: keyset paging by condition works through ESB.
    ids, last = [], 0
    while True:
        data = await ok(
            http, sim, "search_set", {"bk_biz_id": 2, "page": page, "condition": {"bk_set_id": {"$gt": last}}}
        )
        if not data["info"]:
            break
        ids += [s["bk_set_id"] for s in data["info"]]
        last = ids[-1]
    assert ids == sorted(s["bk_set_id"] for s in sim.state.objects("set").values() if s["bk_biz_id"] == 2)


async def test_search_module_is_the_findmany_form_set_zero_means_every_set(sim, http):
    want = sorted(m["bk_module_id"] for m in sim.state.objects("module").values() if m["bk_biz_id"] == 2)
    one = want[0]
    only_one = {"condition": "AND", "rules": [{"field": "bk_module_id", "operator": "equal", "value": one}]}
    for body in ({"bk_set_id": 0}, {}):
        data = await ok(http, sim, "search_module", {"bk_biz_id": 2, "filter": only_one, **body})
        assert sorted(m["bk_module_id"] for m in data["info"]) == want  # every set; the filter never arrived
        assert data["count"] == len(want)
    set_id = sim.state.objects("module")[str(one)]["bk_set_id"]
    data = await ok(http, sim, "search_module", {"bk_biz_id": 2, "bk_set_id": set_id})
    assert {m["bk_set_id"] for m in data["info"]} == {set_id}


async def test_search_business_forwards_biz_property_filter(sim, http):
    flt = {"condition": "AND", "rules": [{"field": "bk_biz_id", "operator": "equal", "value": 3}]}
    data = await ok(http, sim, "search_business", {"biz_property_filter": flt, "bk_supplier_account": "0"})
    assert [b["bk_biz_id"] for b in data["info"]] == [3]


async def test_generic_components_forward_the_body_as_is(sim, http):
    first = min(int(k) for k in sim.state.objects("host"))
    data = await ok(
        http, sim, "list_hosts_without_biz", {"host_property_filter": greater("bk_host_id", first), "fields": []}
    )
    assert first not in {h["bk_host_id"] for h in data["info"]}
    assert data["count"] == len(sim.state.objects("host")) - 1
    reply = await esb(http, sim, "search_cloud_area", {"page": {"limit": 1001}})
    assert (reply["result"], reply["code"], reply["data"]) == (False, 1199055, None)  # errors: HTTP 200 too
