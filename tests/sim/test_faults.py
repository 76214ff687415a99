"""Fault injection: every kind, scripted and random, over real HTTP."""

from __future__ import annotations

import json

import aiohttp
import pytest

GW = "/api/bk-cmdb/prod/api/v3/event/watch/resource/{}"
BODY = {"bk_fields": ["bk_host_id", "bk_host_name"]}


async def post(http, sim, body=None, resource="host"):
    async with http.post(sim.url + GW.format(resource), json=BODY if body is None else body) as resp:
        return resp.status, resp.headers, await resp.read()


async def schedule(http, sim, spec):
    async with http.post(sim.url + "/admin/faults", json=spec) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_http_5xx_for_count_requests_then_normal(sim, http, status):
    await schedule(http, sim, {"kind": f"http_{status}", "count": 2})
    for _ in range(2):
        got, _, body = await post(http, sim)
        assert got == status
        assert b"<html>" in body
    got, _, body = await post(http, sim)
    assert got == 200
    assert json.loads(body)["result"] is True
    assert sim.stats.watch_count(outcome=f"fault:http_{status}") == 2


ESB = "/api/c/compapi/v2/cc/{}/"


async def post_esb(http, sim, name="resource_watch", body=None):
    async with http.post(sim.url + ESB.format(name), json={"bk_resource": "host", **(body or BODY)}) as resp:
        return resp.status, resp.headers, await resp.json()


async def test_http_429_is_the_gateways_rate_limit(sim, http):
    await schedule(http, sim, [{"kind": "http_429"}, {"kind": "http_429"}])
    status, headers, body = await post(http, sim)
    assert status == 429
    assert "Retry-After" not in headers  # the gateway never sends one (bk-rate-limit)
    reply = json.loads(body)
    assert (reply["code"], reply["code_name"], reply["result"], reply["data"]) == (
        1642903,
        "RATE_LIMIT_RESTRICTION",
        False,
        None,
    )
    assert headers["X-Bkapi-Error-Code"] == "1642903"
    assert headers["X-Bkapi-RateLimit-Plugin"] == "bk-resource-rate-limit"
    # ESB stages rewrite the status: the same body at HTTP 200.
    status, headers, reply = await post_esb(http, sim)
    assert (status, reply["code"]) == (200, 1642903)
    assert "Retry-After" not in headers


@pytest.mark.parametrize(
    ("code", "status"),
    [(1642901, 429), (1642902, 429), (1642904, 429), (1650200, 502), (1650201, 502), (1650300, 503), (1650401, 504)],
)
async def test_gateway_fault_real_status_on_gateway_and_200_on_esb(sim, http, code, status):
    await schedule(http, sim, {"kind": "gateway", "code": code, "count": 2, "scope": "any"})
    got, headers, body = await post(http, sim)
    reply = json.loads(body)
    assert (got, reply["code"], headers["X-Bkapi-Error-Code"]) == (status, code, str(code))
    assert set(reply) == {"code", "code_name", "message", "result", "data"}
    assert ("X-Bkapi-RateLimit-Limit" in headers) == (code in (1642901, 1642902, 1642903))
    got, headers, reply = await post_esb(http, sim, "search_cloud_area", {})
    assert (got, reply["code"], reply["result"]) == (200, code, False)
    assert sim.stats.watch_count(outcome="fault:gateway") == 1


async def test_esb_backend_failure_1306201(sim, http):
    await schedule(http, sim, {"kind": "gateway", "code": 1306201, "count": 2})
    status, _, reply = await post_esb(http, sim)
    assert status == 200
    assert set(reply) == {"result", "code", "message", "permission", "data", "request_id"}  # ESB's own envelope
    assert (reply["result"], reply["code"]) == (False, 1306201)
    status, _, body = await post(http, sim)  # no ESB on this path: the gateway's own timeout
    assert (status, json.loads(body)["code"]) == (504, 1650401)


async def test_drawn_gateway_errors_on_esb_include_1306201_and_arrive_at_200(make_sim, http):
    sim = await make_sim(gateway_error_rate=1.0, seed=3)
    codes = set()
    for _ in range(60):
        status, _, reply = await post_esb(http, sim)
        assert status == 200
        codes.add(reply["code"])
    assert 1306201 in codes
    assert {1642901, 1650401} <= codes
    statuses = {(await post(http, sim))[0] for _ in range(40)}
    assert statuses == {429, 502, 503, 504}


async def test_gateway_error_rate_hits_list_and_watch_requests_at_about_the_rate(make_sim, http):
    outcomes = []
    for _ in range(2):
        sim = await make_sim(gateway_error_rate=0.2, seed=11)
        failed = []
        for i in range(300):
            async with http.post(sim.url + "/api/bk-cmdb/prod/api/v3/findmany/cloudarea", json={}) as resp:
                failed.append(resp.status != 200)
            if i % 10 == 0:
                status, _, _ = await post(http, sim)
                failed.append(status != 200)
        assert 0.12 < sum(failed) / len(failed) < 0.28
        assert sim.faults.fired["gateway"] == sum(failed)
        outcomes.append(failed)
    assert outcomes[0] == outcomes[1]  # seeded


async def test_random_faults_with_list_scope_and_gateway_rate_at_runtime(sim, http):
    await schedule(http, sim, {"random": {"seed": 1, "rates": {"gateway": 0.5}, "scope": "list"}})
    watch = [(await post(http, sim))[0] for _ in range(20)]
    assert watch == [200] * 20  # watch requests are out of scope
    lists = []
    for _ in range(40):
        async with http.post(sim.url + "/api/v3/findmany/cloudarea", json={}) as resp:
            lists.append(resp.status)
    assert 200 in lists and {429, 502, 503, 504} & set(lists)
    plan = await schedule(http, sim, {"gateway_error_rate": 1.0})
    assert (plan["gateway_error_rate"], plan["random_scope"]) == (1.0, "list")
    assert (await post(http, sim))[0] != 200
    async with http.delete(sim.url + "/admin/faults") as resp:
        assert (await resp.json())["gateway_error_rate"] == 0.0
    assert (await post(http, sim))[0] == 200


@pytest.mark.parametrize("code", [1199997, 1103008, 1199017, 1199036, 9900403])
async def test_code_fault_is_a_result_false_reply(sim, http, code):
    await schedule(http, sim, {"kind": "code", "code": code})
    status, _, body = await post(http, sim)
    reply = json.loads(body)
    assert status == 200
    assert (reply["result"], reply["code"], reply["data"]) == (False, code, None)
    assert reply["message"]
    assert (reply["permission"] is not None) == (code == 9900403)


async def test_fault_for_one_resource_leaves_others_alone(sim, http):
    await schedule(http, sim, {"kind": "code", "code": 1199997, "resource": "plat"})
    _, _, body = await post(http, sim)
    assert json.loads(body)["result"] is True
    _, _, body = await post(http, sim, {}, resource="plat")
    assert json.loads(body)["code"] == 1199997


async def test_slow_answers_normally_after_the_delay(sim, http):
    await schedule(http, sim, {"kind": "slow", "delay": 0.2})
    status, _, body = await post(http, sim)
    assert status == 200
    assert json.loads(body)["data"]["bk_watched"] is True
    assert sim.faults.fired["slow"] == 1


async def test_malformed_and_truncated_are_200_but_not_json(sim, http):
    await schedule(http, sim, [{"kind": "malformed"}, {"kind": "truncated"}])
    for _ in range(2):
        status, headers, body = await post(http, sim)
        assert status == 200
        assert headers["Content-Type"].startswith("application/json")
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)


async def test_drop_closes_the_connection_without_a_response(sim, http):
    await schedule(http, sim, {"kind": "drop"})
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, sim)
    status, _, _ = await post(http, sim)  # the next request is served
    assert status == 200


async def test_expire_cursors_spares_only_the_newest(sim, http):
    old = sim.state.chain("host")[0].cursor
    newest = sim.state.chain("host")[-1].cursor
    await schedule(http, sim, {"kind": "expire_cursors", "count": 2})
    _, _, body = await post(http, sim, {**BODY, "bk_cursor": old})
    assert json.loads(body)["code"] == 1103007
    _, _, body = await post(http, sim, {**BODY, "bk_cursor": newest})
    assert json.loads(body)["data"]["bk_watched"] is False  # the watch token never expires
    _, _, body = await post(http, sim, BODY)  # from-now requests do not consume it
    assert json.loads(body)["result"] is True
    _, _, body = await post(http, sim, {**BODY, "bk_cursor": old})
    assert json.loads(body)["code"] == 1103007
    _, _, body = await post(http, sim, {**BODY, "bk_cursor": old})  # used up
    assert json.loads(body)["result"] is True


async def test_detail_missing_hits_from_now_and_start_from(sim, http):
    await schedule(http, sim, {"kind": "detail_missing", "count": 2})
    _, _, body = await post(http, sim, {**BODY, "bk_cursor": sim.state.chain("host")[-1].cursor})
    assert json.loads(body)["result"] is True  # cursor mode is not affected
    _, _, body = await post(http, sim, BODY)
    assert json.loads(body)["code"] == 1103008
    _, _, body = await post(http, sim, {**BODY, "bk_start_from": int(sim.state.clock.now()) - 5})
    assert json.loads(body)["code"] == 1103008


async def test_drop_event_loses_the_event_but_changes_the_object(sim, http):
    before = len(sim.state.chain("host"))
    await schedule(http, sim, {"kind": "drop_event", "count": 1, "resource": "host"})
    sim.state.update("host", "1", {"bk_host_name": "lost"})
    sim.state.update("host", "1", {"bk_host_name": "seen"})
    chain = sim.state.chain("host")
    assert len(chain) == before + 1
    assert chain[-1].detail["bk_host_name"] == "seen"
    assert sim.state.events_dropped == 1
    await schedule(http, sim, {"kind": "drop_event", "count": 1})
    sim.state.update("host", "2", {"bk_host_name": "silently"})
    assert sim.state.objects("host")["2"]["bk_host_name"] == "silently"
    assert len(sim.state.chain("host")) == before + 1


async def test_drop_event_probability(sim, http):
    await schedule(http, sim, {"kind": "drop_event", "probability": 0.5, "resource": "host"})
    before = len(sim.state.chain("host"))
    for i in range(200):
        sim.state.update("host", "1", {"bk_host_name": f"n{i}"})
    kept = len(sim.state.chain("host")) - before
    assert 0 < kept < 200
    assert sim.state.events_dropped == 200 - kept


async def test_collapse_keeps_only_the_last_of_two_same_cursor_changes(sim, http):
    await schedule(http, sim, {"kind": "collapse", "count": 1, "resource": "host"})
    sim.state.update("host", "1", {"bk_host_name": "first"})
    cursor = sim.state.chain("host")[-1].cursor
    sim.state.update("host", "1", {"bk_host_name": "second"})
    chain = sim.state.chain("host")
    assert chain[-1].cursor == cursor
    assert chain[-1].detail["bk_host_name"] == "second"
    assert [n.cursor for n in chain].count(cursor) == 1
    sim.state.update("host", "1", {"bk_host_name": "third"})  # used up: a new cursor again
    assert sim.state.chain("host")[-1].cursor != cursor


async def test_random_faults_are_seeded(make_sim, http):
    outcomes = []
    for _ in range(2):
        sim = await make_sim()
        await schedule(
            http, sim, {"random": {"seed": 7, "rates": {"http_503": 0.3, "code": 0.2}, "code": 1199017}}
        )
        statuses = []
        for _ in range(30):
            status, _, body = await post(http, sim)
            statuses.append(json.loads(body)["code"] if status == 200 else status)
        outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert {503, 1199017, 0} <= set(outcomes[0])


async def test_list_scope_faults_and_clearing(sim, http):
    await schedule(http, sim, {"kind": "http_503", "scope": "list", "count": 5})
    status, _, _ = await post(http, sim)  # a watch request is not affected
    assert status == 200
    async with http.post(sim.url + "/api/v3/findmany/cloudarea", json={}) as resp:
        assert resp.status == 503
    async with http.delete(sim.url + "/admin/faults") as resp:
        assert (await resp.json())["script"] == []
    async with http.post(sim.url + "/api/v3/findmany/cloudarea", json={}) as resp:
        assert resp.status == 200


async def test_bad_fault_specs_are_refused(sim, http):
    specs = (
        {"kind": "nope"},
        {"kind": "code", "count": 0},
        {"kind": "code", "bogus": 1},
        "x",
        {"kind": "slow", "delay": "1"},
        {"kind": "code", "code": "x"},
        {"kind": "gateway", "code": 1199997},  # not a gateway error
        {"random": {"rates": {"gateway": 0.1}, "scope": "lists"}},
        {"random": {"rates": {"gateway": 1.5}}},
        {"gateway_error_rate": -0.1},
        {"gateway_error_rate": "often"},
    )
    for spec in specs:
        async with http.post(sim.url + "/admin/faults", json=spec) as resp:
            assert resp.status == 400, spec
