"""Paths, authentication, permission, envelope and counters of the watch endpoints (§1, §3.1, §7)."""

from __future__ import annotations

import asyncio
import json

import pytest

GW = "/api/bk-cmdb/prod/api/v3/event/watch/resource/{}"
DIRECT = "/api/v3/event/watch/resource/{}"
ESB = "/api/c/compapi/v2/cc/resource_watch/"
CREDS = {"bk_app_code": "rw", "bk_app_secret": "s3cret", "bk_username": "admin"}
AUTH = {"X-Bkapi-Authorization": json.dumps(CREDS)}


async def test_gateway_direct_and_esb_paths_answer(sim, watch):
    newest = sim.state.chain("plat")[-1].cursor
    for path in (
        GW.format("plat"),
        "/api/bk-cmdb/stag/api/v3/event/watch/resource/plat",
        DIRECT.format("plat"),
    ):
        reply = await watch("plat", path=path, bk_resource="host")  # the URL wins over the body
        assert reply["data"]["bk_events"][0]["bk_cursor"] == newest
        assert reply["data"]["bk_events"][0]["bk_resource"] == "plat"
        assert "request_id" not in reply
    reply = await watch("plat", path=ESB, bk_resource="plat")
    assert reply["data"]["bk_events"][0]["bk_cursor"] == newest
    assert set(reply) == {"result", "code", "message", "permission", "data", "request_id"}
    assert (reply["result"], reply["code"], reply["permission"]) == (True, 0, None)


async def test_esb_body_that_is_not_an_object(sim, http):
    async with http.post(sim.url + ESB, json=[1, 2]) as resp:
        assert resp.status == 200
        reply = await resp.json()
    assert (reply["result"], reply["code"]) == (False, 1199000)  # does not decode into the options


GW_BODY_KEYS = {"code", "code_name", "message", "result", "data"}


async def test_gateway_auth_uses_only_the_header(make_sim, http):
    sim = await make_sim(app_code="rw", app_secret="s3cret")
    url = sim.url + GW.format("plat")
    bad = [
        ({}, 1640101, "APP_VERIFY_FAILED"),  # no header
        ({"X-Bkapi-Authorization": "not json"}, 1640101, "APP_VERIFY_FAILED"),
        ({"X-Bkapi-Authorization": json.dumps({**CREDS, "bk_app_secret": "wrong"})}, 1640101, "APP_VERIFY_FAILED"),
        ({"X-Bkapi-Authorization": json.dumps({**CREDS, "bk_app_code": "other"})}, 1640101, "APP_VERIFY_FAILED"),
        (  # no user
            {"X-Bkapi-Authorization": json.dumps({"bk_app_code": "rw", "bk_app_secret": "s3cret"})},
            1640102,
            "USER_VERIFY_FAILED",
        ),
    ]
    for headers, code, code_name in bad:
        async with http.post(url, json=CREDS, headers=headers) as resp:  # body credentials do not count
            assert resp.status == 401
            body = await resp.json()
            # The gateway's own format (apisix errorx), not CMDB's envelope, with the code in a header too.
            assert set(body) == GW_BODY_KEYS
            assert (body["result"], body["code"], body["code_name"], body["data"]) == (False, code, code_name, None)
            assert resp.headers["X-Bkapi-Error-Code"] == str(code)
            assert resp.headers["X-Bkapi-Error-Message"] == body["message"]
    async with http.post(url, json={}, headers=AUTH) as resp:
        assert resp.status == 200
        assert (await resp.json())["result"] is True
    token = {"X-Bkapi-Authorization": json.dumps({**CREDS, "bk_username": None, "bk_token": "t"})}
    async with http.post(url, json={}, headers=token) as resp:
        assert resp.status == 200
    # Refused requests are counted as refused, never as watch requests served.
    assert sim.stats.refused_count("resource_watch", "auth") == len(bad)
    assert sim.stats.watch_requests() == 2
    assert (await (await http.get(sim.url + "/admin/stats")).json())["refused"] == {
        "resource_watch": {"auth": len(bad)}
    }


async def test_esb_auth_uses_the_body(make_sim, http):
    sim = await make_sim(app_code="rw", app_secret="s3cret")
    url = sim.url + ESB
    for creds, code in (({**CREDS, "bk_app_secret": "no"}, 1640101), ({**CREDS, "bk_username": ""}, 1640102)):
        async with http.post(url, json={"bk_resource": "plat", **creds}, headers=AUTH) as resp:
            # ESB stages run bk-status-rewrite: the gateway's refusal, at HTTP 200.
            assert resp.status == 200
            assert resp.headers["X-Bkapi-Error-Code"] == str(code)
            reply = await resp.json()
            assert set(reply) == GW_BODY_KEYS
            assert (reply["result"], reply["code"]) == (False, code)
    async with http.post(url, json={"bk_resource": "plat", **CREDS}) as resp:
        assert (await resp.json())["result"] is True
    assert sim.stats.refused_count("resource_watch", "auth") == 2
    assert sim.stats.watch_requests() == 1


async def test_denied_resource_is_9900403_with_permission(make_sim, http):
    sim = await make_sim(denied_resources=frozenset({"host"}))
    async with http.post(sim.url + GW.format("host"), json={"bk_fields": ["bk_host_id"]}) as resp:
        reply = await resp.json()
    assert (reply["result"], reply["code"]) == (False, 9900403)
    action = reply["permission"]["actions"][0]
    assert action["id"] == "watch_host_event"
    assert action["related_resource_types"][0]["instances"][0][0]["id"] == "host"
    async with http.post(sim.url + GW.format("plat"), json={}) as resp:
        assert (await resp.json())["result"] is True


async def test_counters_by_resource_mode_and_outcome(sim, watch):
    await watch("host")
    await watch("host", bk_cursor=sim.state.chain("host")[-1].cursor)
    await watch("host", bk_cursor="nope")
    await watch("plat", bk_start_from=int(sim.state.clock.now()) - 5)
    stats = sim.stats.snapshot()
    assert stats["watch"]["host"] == {
        "now": {"events": 1},
        "cursor": {"placeholder": 1, "error:1103007": 1},
    }
    assert stats["watch"]["plat"] == {"start_from": {"events": 1}}
    assert stats["inflight"]["host"] == {"current": 0, "max": 1}
    assert sim.stats.watch_requests("host") == 3
    assert sim.stats.watch_requests("host", "cursor") == 2
    assert sim.stats.in_flight("host") == 0


async def test_inflight_long_polls_counted_per_resource(sim, http):
    cursor = sim.state.chain("host")[-1].cursor
    body = {"bk_cursor": cursor, "bk_fields": ["bk_host_id"]}

    async def poll() -> None:
        async with http.post(sim.url + GW.format("host"), json=body) as resp:
            await resp.read()

    tasks = [asyncio.create_task(poll()) for _ in range(2)]
    await sim.stats.wait_for(lambda s: s.inflight["host"] == 2, timeout=5)
    await asyncio.gather(*tasks)
    assert sim.stats.snapshot()["inflight"]["host"] == {"current": 0, "max": 2}


@pytest.mark.parametrize("path", [GW.format("host"), ESB])
async def test_shutdown_answers_parked_long_polls(make_sim, http, path):
    sim = await make_sim(hold=60)
    body = {
        "bk_resource": "host",
        "bk_cursor": sim.state.chain("host")[-1].cursor,
        "bk_fields": ["bk_host_id"],
    }
    poll = asyncio.create_task(http.post(sim.url + path, json=body))
    await sim.stats.wait_for(lambda s: s.inflight["host"] == 1, timeout=5)
    async with asyncio.timeout(10):
        await sim.__aexit__(None, None, None)
        async with await poll as resp:
            assert (await resp.json())["data"]["bk_watched"] is False
