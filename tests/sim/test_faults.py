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


async def test_http_429_is_gateway_rate_limit(sim, http):
    await schedule(http, sim, [{"kind": "http_429"}])
    status, headers, body = await post(http, sim)
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert json.loads(body)["code_name"] == "RATE_LIMIT_RESTRICTION"


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
    )
    for spec in specs:
        async with http.post(sim.url + "/admin/faults", json=spec) as resp:
            assert resp.status == 400, spec
