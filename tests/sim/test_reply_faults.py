"""Faults that answer *successfully* but wrongly: malformed watch replies and misbehaving list pages (issue 12).

Each is scheduled through the admin API and observed over real HTTP, the way rwatch (or anyone's client) meets it.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from rwatch.cmdb.protocol import NO_EVENT_CURSOR
from rwatch.sim.faults import LIST_API_RESOURCES
from rwatch.sim.lists import APIS
from rwatch.sim.server import Simulator

GW = "/api/bk-cmdb/prod"
WATCH = GW + "/api/v3/event/watch/resource/{}"
HOST_BODY = {"bk_fields": ["bk_host_id", "bk_host_name"]}


async def schedule(http: aiohttp.ClientSession, sim: Simulator, spec: Any) -> dict[str, Any]:
    async with http.post(sim.url + "/admin/faults", json=spec) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def watch(http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any] | None = None,
                resource: str = "host") -> dict[str, Any]:
    async with http.post(sim.url + WATCH.format(resource), json=body or HOST_BODY) as resp:
        assert resp.status == 200
        reply: dict[str, Any] = await resp.json()
        assert reply["result"] is True and reply["code"] == 0, reply  # a *successful* reply, every time
        return reply


async def listing(http: aiohttp.ClientSession, sim: Simulator, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(sim.url + GW + path, json=body) as resp:
        assert resp.status == 200
        reply: dict[str, Any] = await resp.json()
        assert reply["result"] is True, reply
        data: dict[str, Any] = reply["data"]
        return data


async def fired(http: aiohttp.ClientSession, sim: Simulator) -> dict[str, int]:
    async with http.get(sim.url + "/admin/faults") as resp:
        result: dict[str, int] = (await resp.json())["fired"]
        return result


# --- watch replies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "data"), [
    ("empty_events", {"bk_watched": True, "bk_events": []}),
    ("missing_events", {"bk_watched": True}),
])
async def test_watch_replies_without_events(sim: Simulator, http: aiohttp.ClientSession, kind: str,
                                            data: dict[str, Any]) -> None:
    newest = sim.state.chain("host")[-1].cursor
    await schedule(http, sim, {"kind": kind, "resource": "host", "count": 2})
    for body in (HOST_BODY, {**HOST_BODY, "bk_cursor": newest}):  # any mode, at once (no hold)
        assert (await watch(http, sim, body))["data"] == data
    assert (await watch(http, sim))["data"]["bk_events"]  # used up
    assert (await fired(http, sim))[kind] == 2
    assert sim.stats.watch_count(outcome=f"fault:{kind}") == 2


async def test_events_not_list(sim: Simulator, http: aiohttp.ClientSession) -> None:
    await schedule(http, sim, {"kind": "events_not_list"})
    data = (await watch(http, sim))["data"]
    assert isinstance(data["bk_events"], dict) and data["bk_events"]["bk_cursor"] == NO_EVENT_CURSOR


async def test_unwatched_with_events_waits_for_real_events(sim: Simulator, http: aiohttp.ClientSession) -> None:
    newest = sim.state.chain("host")[-1].cursor
    await schedule(http, sim, {"kind": "unwatched_with_events", "resource": "host", "mode": "cursor"})
    # Nothing after the newest cursor: the hold ends in a genuine placeholder, and the fault stays.
    placeholder = (await watch(http, sim, {**HOST_BODY, "bk_cursor": newest}))["data"]
    assert placeholder["bk_watched"] is False and placeholder["bk_events"][0]["bk_event_type"] == ""
    assert (await schedule(http, sim, []))["script"][0]["kind"] == "unwatched_with_events"
    # From now is not cursor mode (``mode``): answered normally.
    assert (await watch(http, sim))["data"]["bk_watched"] is True
    sim.state.update("host", "1", {"bk_host_name": "a"})
    sim.state.update("host", "2", {"bk_host_name": "b"})
    data = (await watch(http, sim, {**HOST_BODY, "bk_cursor": newest}))["data"]
    assert data["bk_watched"] is False
    assert [(e["bk_event_type"], e["bk_detail"]["bk_host_name"]) for e in data["bk_events"]] == [
        ("update", "a"), ("update", "b")]
    assert [e["bk_cursor"] for e in data["bk_events"]] == [n.cursor for n in sim.state.chain("host")[-2:]]
    assert (await fired(http, sim)) == {"unwatched_with_events": 1}
    assert (await watch(http, sim, {**HOST_BODY, "bk_cursor": newest}))["data"]["bk_watched"] is True


async def test_mode_narrows_a_fault_to_one_start_mode(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """A scripted 1199006 for start_from requests only: what a server that keeps less than expected answers."""
    await schedule(http, sim, {"kind": "code", "code": 1199006, "mode": "start_from", "count": 1})
    assert (await watch(http, sim))["result"] is True  # from now: not this fault
    start = int(sim.state.clock.now()) - 60
    async with http.post(sim.url + WATCH.format("host"), json={**HOST_BODY, "bk_start_from": start}) as resp:
        assert (await resp.json())["code"] == 1199006
    assert (await watch(http, sim, {**HOST_BODY, "bk_start_from": start}))["result"] is True


# --- list pages ---------------------------------------------------------------------------------------------

HOSTS = "/api/v3/hosts/list_hosts_without_app"


async def test_empty_page_keeps_the_count(sim: Simulator, http: aiohttp.ClientSession) -> None:
    total = len(sim.state.objects("host"))
    await schedule(http, sim, {"kind": "empty_page", "api": "list_hosts_without_biz"})
    # Another list API is not this fault's: answered normally, the fault stays.
    assert (await listing(http, sim, "/api/v3/findmany/cloudarea", {}))["info"]
    data = await listing(http, sim, HOSTS, {"page": {"start": 0, "limit": 10}})
    assert data == {"count": total, "info": []}
    assert len((await listing(http, sim, HOSTS, {"page": {"start": 0, "limit": 10}}))["info"]) == 10


async def test_truncated_page_holds_fewer_than_the_page_but_keeps_the_count(
        sim: Simulator, http: aiohttp.ClientSession) -> None:
    total = len(sim.state.objects("host"))
    await schedule(http, sim, {"kind": "truncated_page", "resource": "host", "count": 2})
    full = sorted(int(k) for k in sim.state.objects("host"))
    data = await listing(http, sim, HOSTS, {"page": {"start": 0, "limit": 10, "sort": "bk_host_id"}})
    assert data["count"] == total and [h["bk_host_id"] for h in data["info"]] == full[:5]
    # A page with nothing on it cannot be truncated: answered as it is, and the fault waits.
    none = await listing(http, sim, HOSTS, {"page": {"start": total, "limit": 10}})
    assert none == {"count": total, "info": []}
    one = await listing(http, sim, HOSTS, {"page": {"start": total - 1, "limit": 10}})
    assert one == {"count": total, "info": []}  # one object, one fewer
    assert (await fired(http, sim)) == {"truncated_page": 2}


@pytest.mark.parametrize(("path", "keyset", "id_field"), [
    # The lead's listing pages by a query filter (``greater``), as on the gateway...
    ("/api/v3/set/search/0/2", lambda last: {"filter": {"condition": "AND", "rules": [
        {"field": "bk_set_id", "operator": "greater", "value": last}]}}, "bk_set_id"),
    # ...and by a legacy condition (``$gt``) where the API has no filter.
    ("/api/v3/module/search/0/2/0", lambda last: {"condition": {"bk_biz_id": 2, "bk_module_id": {"$gt": last}}},
     "bk_module_id"),
])
async def test_ignore_keyset_answers_the_first_page_again(sim: Simulator, http: aiohttp.ClientSession, path: str,
                                                          keyset: Any, id_field: str) -> None:
    page = {"page": {"start": 0, "limit": 1, "sort": id_field}}
    await schedule(http, sim, {"kind": "ignore_keyset", "count": 1})
    first = await listing(http, sim, path, page)  # no keyset rule yet: answered normally, the fault waits
    [obj] = first["info"]
    assert (await fired(http, sim)) == {}
    again = await listing(http, sim, path, {**page, **keyset(obj[id_field])})
    assert again == first  # same first page, same count, as ESB's search_set does with a filter
    assert (await fired(http, sim)) == {"ignore_keyset": 1}
    honest = await listing(http, sim, path, {**page, **keyset(obj[id_field])})
    assert honest["info"][0][id_field] > obj[id_field]


def test_every_list_api_names_the_resource_it_lists() -> None:
    assert set(LIST_API_RESOURCES) == set(APIS)


async def test_bad_reply_fault_specs_are_refused(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for spec in (
        {"kind": "empty_page", "scope": "watch"},
        {"kind": "empty_events", "scope": "list"},
        {"kind": "empty_page", "api": "search_everything"},
        {"kind": "http_500", "api": "search_set"},  # api needs scope list or any
        {"kind": "code", "mode": "sometimes"},
    ):
        async with http.post(sim.url + "/admin/faults", json=spec) as resp:
            assert resp.status == 400, spec
    # A list kind defaults to the list scope.
    plan = await schedule(http, sim, {"kind": "ignore_keyset", "api": "search_set"})
    assert plan["script"][0]["scope"] == "list" and plan["script"][0]["api"] == "search_set"
