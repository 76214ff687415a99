"""resource_watch over real HTTP: the three start modes, filters, cursors, retention (§2–5)."""

from __future__ import annotations

import asyncio

from rwatch.cmdb.protocol import NO_EVENT_CURSOR, RESOURCE_TYPES, decode_cursor

GW = "/api/bk-cmdb/prod/api/v3/event/watch/resource/{}"


def cursor_of(data):
    return data["bk_events"][-1]["bk_cursor"]


# --- from now ----------------------------------------------------------------------------------------


async def test_from_now_returns_newest_event_with_detail(sim, watch):
    newest = sim.state.chain("host")[-1]
    data = await watch.events("host")
    assert data["bk_watched"] is True
    [event] = data["bk_events"]
    assert event["bk_cursor"] == newest.cursor
    assert event["bk_event_type"] == "create"
    assert event["bk_resource"] == "host"
    assert event["bk_detail"]["bk_host_id"] == newest.detail["bk_host_id"]


async def test_from_now_not_matching_or_empty_gives_no_event_cursor(sim, watch):
    data = await watch.events("host", bk_event_types=["delete"])
    assert data == {
        "bk_watched": False,
        "bk_events": [
            {"bk_cursor": NO_EVENT_CURSOR, "bk_resource": "host", "bk_event_type": "", "bk_detail": {}}
        ],
    }
    sim.state.clock.jump(sim.options.retention + 10)  # the newest event leaves the window
    data = await watch.events("host")
    assert data["bk_watched"] is False
    assert data["bk_events"][0]["bk_cursor"] == NO_EVENT_CURSOR


# --- cursor mode -------------------------------------------------------------------------------------


async def test_cursor_resumes_after_the_cursor_oldest_first(sim, watch):
    first = await watch.events("host")
    sim.state.update("host", "1", {"bk_host_name": "a"})
    sim.state.update("host", "2", {"bk_host_name": "b"})
    data = await watch.events("host", bk_cursor=cursor_of(first))
    assert data["bk_watched"] is True
    assert [(e["bk_event_type"], e["bk_detail"]["bk_host_name"]) for e in data["bk_events"]] == [
        ("update", "a"),
        ("update", "b"),
    ]


async def test_cursor_mode_holds_and_wakes_on_a_new_event(make_sim, http):
    sim = await make_sim(hold=30)
    cursor = sim.state.chain("host")[-1].cursor
    body = {"bk_cursor": cursor, "bk_fields": ["bk_host_id", "bk_host_name"]}
    poll = asyncio.create_task(http.post(sim.url + GW.format("host"), json=body))
    await sim.stats.wait_for(lambda s: s.inflight["host"] == 1, timeout=5)
    sim.state.update("host", "3", {"bk_host_name": "woken"})
    async with asyncio.timeout(10):  # far below the 30 s hold: the change woke the long-poll
        async with await poll as resp:
            data = (await resp.json())["data"]
    assert data["bk_watched"] is True
    assert data["bk_events"][0]["bk_detail"] == {"bk_host_id": 3, "bk_host_name": "woken"}


async def test_cursor_timeout_returns_the_cursor_sent(sim, watch):
    cursor = sim.state.chain("host")[-1].cursor
    data = await watch.events("host", bk_cursor=cursor)
    assert data["bk_watched"] is False
    assert data["bk_events"] == [
        {"bk_cursor": cursor, "bk_resource": "host", "bk_event_type": "", "bk_detail": {}}
    ]


async def test_cursor_timeout_skips_past_non_matching_events(sim, watch):
    cursor = sim.state.chain("host")[-1].cursor
    sim.state.update("host", "1", {"bk_host_name": "x"})
    newest = sim.state.chain("host")[-1].cursor
    data = await watch.events("host", bk_cursor=cursor, bk_event_types=["delete"])
    assert data["bk_watched"] is False
    assert data["bk_events"][0]["bk_cursor"] == newest
    assert data["bk_events"][0]["bk_event_type"] == ""


async def test_at_most_200_events_and_following_cursors_replays_the_whole_chain(sim, watch):
    sim.load.run(1500)
    chain = sim.state.chain("host")
    cursor, seen = NO_EVENT_CURSOR, []
    while True:
        data = await watch.events("host", bk_cursor=cursor)
        assert len(data["bk_events"]) <= 200
        if not data["bk_watched"]:
            break
        seen.extend(e["bk_cursor"] for e in data["bk_events"])
        cursor = cursor_of(data)
    assert len(chain) > 400
    assert seen == [n.cursor for n in chain]


async def test_garbage_and_unknown_cursors_are_1103007(watch):
    for cursor in ("garbage!", "MQ0yDTAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMA1pbnNlcnQNMQ0xDQ=="):
        reply = await watch("host", bk_cursor=cursor)
        assert (reply["result"], reply["code"]) == (False, 1103007)
        assert reply["data"] is None


async def test_cursor_expires_after_retention_but_the_newest_never_does(sim, watch):
    old = sim.state.chain("host")[0].cursor
    newest = sim.state.chain("host")[-1].cursor
    sim.state.clock.jump(sim.options.retention + 60)
    reply = await watch("host", bk_cursor=old)
    assert reply["code"] == 1103007
    data = await watch.events("host", bk_cursor=newest)  # the watch token keeps it alive
    assert data["bk_watched"] is False
    assert data["bk_events"][0]["bk_cursor"] == newest


async def test_no_event_cursor_starts_at_the_earliest_retained_event(sim, watch):
    sim.state.clock.jump(100)
    sim.state.update("host", "5", {"bk_host_name": "after"})
    data = await watch.events("host", bk_cursor=NO_EVENT_CURSOR)
    assert data["bk_events"][0]["bk_cursor"] == sim.state.chain("host")[0].cursor  # inclusive
    sim.state.clock.jump(sim.options.retention - 50)  # only the last update is still in the window
    data = await watch.events("host", bk_cursor=NO_EVENT_CURSOR)
    assert [e["bk_detail"]["bk_host_name"] for e in data["bk_events"]] == ["after"]


async def test_no_event_cursor_with_nothing_retained_waits_for_new(sim, watch):
    sim.state.clock.jump(sim.options.retention + 60)
    data = await watch.events("host", bk_cursor=NO_EVENT_CURSOR)
    assert data["bk_watched"] is False
    assert data["bk_events"][0]["bk_cursor"] == NO_EVENT_CURSOR
    sim.state.update("host", "1", {"bk_host_name": "new"})
    data = await watch.events("host", bk_cursor=NO_EVENT_CURSOR)
    assert [e["bk_detail"]["bk_host_name"] for e in data["bk_events"]] == ["new"]


async def test_no_event_cursor_on_an_empty_chain_returns_no_event_cursor(make_sim, http):
    sim = await make_sim(hosts=0)
    body = {"bk_cursor": NO_EVENT_CURSOR, "bk_fields": ["bk_host_id"]}
    async with http.post(sim.url + GW.format("host"), json=body) as resp:
        data = (await resp.json())["data"]
    assert data["bk_watched"] is False
    assert data["bk_events"][0]["bk_cursor"] == NO_EVENT_CURSOR


async def test_no_event_cursor_with_only_non_matching_events_returns_the_newest(sim, watch):
    data = await watch.events("host", bk_cursor=NO_EVENT_CURSOR, bk_event_types=["delete"])
    assert data["bk_watched"] is False
    assert data["bk_events"][0]["bk_cursor"] == sim.state.chain("host")[-1].cursor


# --- start_from ---------------------------------------------------------------------------------------


async def test_start_from_outside_the_window_is_1199006(sim, watch):
    now = int(sim.state.clock.now())
    for start in (now + 100, now - int(sim.options.retention) - 100):
        reply = await watch("host", bk_start_from=start)
        assert (reply["result"], reply["code"]) == (False, 1199006)
        assert reply["message"] == "'bk_start_from' data parameter verification does not pass"


async def test_start_from_returns_events_strictly_after_the_second(sim, watch):
    t0 = int(sim.state.clock.now())
    sim.state.update("host", "1", {"bk_host_name": "same-second"})
    sim.state.clock.jump(10)
    sim.state.update("host", "2", {"bk_host_name": "later"})
    start = sim.state.chain("host")[-2].sec
    assert start >= t0
    data = await watch.events("host", bk_start_from=start)
    assert data["bk_watched"] is True
    assert [e["bk_detail"]["bk_host_name"] for e in data["bk_events"]] == ["later"]


async def test_start_from_at_or_after_the_newest_returns_the_newest(sim, watch):
    newest = sim.state.chain("host")[-1]
    sim.state.clock.jump(30)
    data = await watch.events("host", bk_start_from=int(sim.state.clock.now()) - 5)
    assert data["bk_watched"] is True
    assert [e["bk_cursor"] for e in data["bk_events"]] == [newest.cursor]
    data = await watch.events("host", bk_start_from=int(sim.state.clock.now()) - 5, bk_event_types=["delete"])
    assert data["bk_events"][0]["bk_cursor"] == NO_EVENT_CURSOR


async def test_start_from_with_no_match_returns_the_newest_cursor(sim, watch):
    start = int(sim.state.clock.now()) - 5
    data = await watch.events("host", bk_start_from=start, bk_event_types=["delete"])
    assert data["bk_watched"] is False
    assert data["bk_events"][0]["bk_cursor"] == sim.state.chain("host")[-1].cursor


async def test_start_from_caps_at_200(sim, watch):
    sim.state.clock.jump(5)
    start = int(sim.state.clock.now()) - 1
    sim.state.clock.jump(5)
    for i in range(250):
        sim.state.update("host", "1", {"bk_host_name": f"n{i}"})
    data = await watch.events("host", bk_start_from=start)
    assert len(data["bk_events"]) == 200
    assert data["bk_events"][0]["bk_detail"]["bk_host_name"] == "n0"


async def test_start_from_with_an_empty_window_is_no_event_cursor(sim, watch):
    sim.state.clock.jump(sim.options.retention + 60)
    data = await watch.events("host", bk_start_from=int(sim.state.clock.now()) - 10)
    assert data["bk_events"][0]["bk_cursor"] == NO_EVENT_CURSOR


# --- filters and fields -------------------------------------------------------------------------------


async def test_fields_project_with_null_for_absent_including_delete(sim, watch):
    cursor = sim.state.chain("host")[-1].cursor
    sim.state.delete("host", "7")
    data = await watch.events("host", bk_cursor=cursor, bk_fields=["bk_host_id", "no_such_field"])
    assert data["bk_events"][-1]["bk_event_type"] == "delete"
    assert data["bk_events"][-1]["bk_detail"] == {"bk_host_id": 7, "no_such_field": None}


async def test_empty_fields_give_the_whole_document_and_biz_set_relation_ignores_fields(sim, watch):
    data = await watch.events("process")
    assert set(data["bk_events"][0]["bk_detail"]) >= {"bk_process_id", "bk_process_name", "bk_biz_id"}
    data = await watch.events("biz_set_relation", bk_fields=["bk_biz_set_id"])
    assert set(data["bk_events"][0]["bk_detail"]) == {"bk_biz_set_id", "bk_biz_ids"}


async def test_event_type_and_sub_resource_filters(sim, watch):
    cursor = sim.state.chain("object_instance")[-1].cursor
    sim.state.create("object_instance", {"bk_obj_id": "router"})
    sim.state.create("object_instance", {"bk_obj_id": "switch"})
    data = await watch.events("object_instance", bk_cursor=cursor, bk_filter={"bk_sub_resource": "switch"})
    assert [e["bk_detail"]["bk_obj_id"] for e in data["bk_events"]] == ["switch"]
    sim.state.delete("object_instance", "switch:" + str(data["bk_events"][0]["bk_detail"]["bk_inst_id"]))
    data = await watch.events("object_instance", bk_cursor=cursor, bk_event_types=["delete"])
    assert [e["bk_event_type"] for e in data["bk_events"]] == ["delete"]


# --- validation ---------------------------------------------------------------------------------------


async def test_validation_errors_are_1199998_with_the_server_text(sim, watch):
    cases = [
        (
            "host",
            {"bk_cursor": "x", "bk_start_from": 5},
            "bk_start_from and bk_cursor can not use at the same time",
        ),
        ("biz", {"bk_fields": []}, "biz event must have fields"),
        ("host", {"bk_event_types": ["replace"]}, "unsupported event type: replace"),
        ("host", {"bk_filter": {"bk_sub_resource": "switch"}}, "host event cannot have sub resource"),
        ("kube_pod", {}, "unsupported resource type: kube_pod"),
    ]
    for resource, body, message in cases:
        reply = await watch(resource, **body)
        assert reply == {
            "result": False,
            "code": 1199998,
            "message": message,
            "permission": None,
            "data": None,
        }


async def test_body_not_json_is_1199000(sim, http):
    async with http.post(sim.url + GW.format("host"), data=b"{not json") as resp:
        assert resp.status == 200
        reply = await resp.json()
    assert (reply["result"], reply["code"]) == (False, 1199000)


async def test_error_replies_wait_error_delay(make_sim, http):
    sim = await make_sim(error_delay=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(sim.url + GW.format("host"), json={"bk_cursor": "nope", "bk_fields": ["a"]}) as resp:
        assert (await resp.json())["code"] == 1103007
    assert loop.time() - started >= 0.3  # a lower bound: the server throttles bad callers


# --- cursors and cluster time -------------------------------------------------------------------------


async def test_cursors_use_the_server_encoding(sim, watch):
    key = next(iter(sim.state.objects("object_instance")))
    sim.state.update("object_instance", key, {"bk_inst_name": "renamed"})
    sim.state.delete("object_instance", key)
    for resource in RESOURCE_TYPES:
        for node in sim.state.chain(resource):
            decoded = decode_cursor(node.cursor)
            assert decoded is not None
            assert decoded.type == RESOURCE_TYPES[resource]
            assert len(decoded.oid) == 24
            assert int(decoded.oid, 16) >= 0
            assert decoded.op == {"create": "insert", "update": "update", "delete": "delete"}[node.event_type]
            assert (decoded.sec, decoded.inc) == node.cluster_time
            expect = (
                str(node.detail["bk_inst_id"]) if resource in ("object_instance", "mainline_instance") else ""
            )
            assert decoded.uniq == expect


async def test_cluster_time_is_globally_monotonic(sim):
    sim.load.run(500)
    sim.state.clock.jump(-100)  # the clock going back does not make cluster time go back
    sim.load.run(50)
    times = sorted((n.cluster_time, r) for r in RESOURCE_TYPES for n in sim.state.chain(r))
    assert len({t for t, _ in times}) == len(times)  # all distinct
    for resource in RESOURCE_TYPES:
        chain = [n.cluster_time for n in sim.state.chain(resource)]
        assert chain == sorted(chain)


async def test_date_header_follows_the_simulated_clock(sim, http):
    from email.utils import parsedate_to_datetime

    sim.state.clock.jump(86400 * 3)
    async with http.post(sim.url + GW.format("plat"), json={}) as resp:
        served = parsedate_to_datetime(resp.headers["Date"]).timestamp()
    assert abs(served - sim.state.clock.now()) < 5


async def test_detail_mode_latest_serves_the_current_document(make_sim, http):
    sim = await make_sim(detail_mode="latest")
    cursor = sim.state.chain("host")[-1].cursor
    sim.state.update("host", "1", {"bk_host_name": "first"})
    sim.state.update("host", "1", {"bk_host_name": "second"})
    sim.state.update("host", "2", {"bk_host_name": "gone-soon"})
    sim.state.delete("host", "2")
    body = {"bk_cursor": cursor, "bk_fields": ["bk_host_id", "bk_host_name"]}
    async with http.post(sim.url + GW.format("host"), json=body) as resp:
        events = (await resp.json())["data"]["bk_events"]
    details = [(e["bk_event_type"], e["bk_detail"]) for e in events]
    assert details[:2] == [("update", {"bk_host_id": 1, "bk_host_name": "second"})] * 2
    assert details[2] == ("update", {"bk_host_id": None, "bk_host_name": None})  # object gone, no cache
    assert details[-1] == ("delete", {"bk_host_id": 2, "bk_host_name": "gone-soon"})
