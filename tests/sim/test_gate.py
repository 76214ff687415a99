"""The gateway in front of the simulated CMDB (§10.1, §10.2, §10.4): grants and tenancy, on every path."""

from __future__ import annotations

import json

import pytest

GW = "/api/bk-cmdb/prod"
WATCH = "/api/v3/event/watch/resource/{}"
ESB = "/api/c/compapi/v2/cc/{}/"
CREDS = {"bk_app_code": "rw", "bk_app_secret": "s3cret", "bk_username": "admin"}
AUTH = {"X-Bkapi-Authorization": json.dumps(CREDS)}


async def post(http, sim, path, body=None, headers=None):
    async with http.post(sim.url + path, json=body or {}, headers={**AUTH, **(headers or {})}) as resp:
        return resp.status, resp.headers, await resp.json()


async def admin(http, sim, method, path, body=None, status=200):
    async with http.request(method, sim.url + path, json=body) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def test_an_api_the_app_is_not_granted_is_403_1640301_until_granted(make_sim, http):
    sim = await make_sim(denied_apis=frozenset({"resource_watch"}))
    status, headers, body = await post(http, sim, GW + WATCH.format("plat"))
    assert (status, body["code"], body["code_name"]) == (403, 1640301, "APP_NO_PERMISSION")
    assert body["message"].startswith("App has no permission to the resource")
    assert headers["X-Bkapi-Error-Code"] == "1640301"
    status, _, body = await post(http, sim, ESB.format("resource_watch"), {"bk_resource": "plat", **CREDS})
    assert (status, body["code"]) == (200, 1640301)  # ESB: the same refusal at HTTP 200
    status, _, body = await post(http, sim, GW + "/api/v3/findmany/project")
    assert (status, body["result"]) == (200, True)  # other APIs are granted
    assert sim.stats.refused_count("resource_watch", "grant") == 2
    assert sim.stats.watch_requests() == 0

    perms = await admin(http, sim, "POST", "/admin/permissions", {"deny_apis": []})
    assert perms["deny_apis"] == []
    status, _, body = await post(http, sim, GW + WATCH.format("plat"))
    assert (status, body["result"]) == (200, True)


async def test_deny_every_api_and_the_admin_api_replaces_only_given_keys(sim, http):
    perms = await admin(http, sim, "POST", "/admin/permissions", {"deny_apis": ["*"], "deny": ["host"]})
    assert (perms["deny_apis"], perms["deny"]) == (["*"], ["host"])
    for path in (GW + "/api/v3/findmany/project", "/api/v3/hosts/modules/read", GW + WATCH.format("plat")):
        status, _, body = await post(http, sim, path, {"bk_host_id": [1]})
        assert (status, body["code"]) == (403, 1640301), path
    perms = await admin(http, sim, "POST", "/admin/permissions", {"deny_apis": ["search_set"]})
    assert (perms["deny_apis"], perms["deny"]) == (["search_set"], ["host"])  # deny kept
    assert await admin(http, sim, "GET", "/admin/permissions") == perms
    status, _, body = await post(http, sim, ESB.format("search_set"), {**CREDS, "bk_biz_id": 2})
    assert (status, body["code"]) == (200, 1640301)
    await admin(http, sim, "POST", "/admin/permissions", {"deny_apis": ["no_such_api"]}, status=400)
    await admin(http, sim, "POST", "/admin/permissions", {"deny_apis": "search_set"}, status=400)
    assert (await admin(http, sim, "GET", "/admin/permissions")) == perms  # a bad request changed nothing


async def test_a_refused_request_uses_up_no_fault(make_sim, http):
    sim = await make_sim(denied_apis=frozenset({"resource_watch"}))
    sim.faults.schedule({"kind": "code", "code": 1199017, "scope": "any"})
    status, _, _ = await post(http, sim, GW + WATCH.format("plat"))
    assert status == 403
    _, _, body = await post(http, sim, GW + "/api/v3/findmany/project")
    assert body["code"] == 1199017  # the fault was still there for the next request served
    assert sim.stats.lists["list_project"] == 1


def test_unknown_api_names_are_refused_at_start():
    from rwatch.sim.parts import SimOptions
    from rwatch.sim.server import Simulator

    with pytest.raises(ValueError, match="deny_apis"):
        Simulator(SimOptions(port=0, denied_apis=frozenset({"watch"})))


PATHS = [GW + WATCH.format("plat"), WATCH.format("plat"), ESB.format("resource_watch")]


@pytest.mark.parametrize("path", PATHS)
async def test_app_of_one_tenant_must_name_it(make_sim, http, path):
    sim = await make_sim(tenant_mode="multi", tenant="acme", app_tenant="acme")
    body = {"bk_resource": "plat", **CREDS}
    esb = path.startswith("/api/c/")
    status, _, reply = await post(http, sim, path, body, {"X-Bk-Tenant-Id": "acme"})
    assert (status, reply["result"]) == (200, True)
    # No header: apisix's bk-tenant-validate fills in the app's one tenant.
    for headers in ({}, {"X-Bk-Tenant-Id": ""}):
        status, _, reply = await post(http, sim, path, body, headers)
        assert (status, reply["result"]) == (200, True), headers
    status, resp_headers, reply = await post(http, sim, path, body, {"X-Bk-Tenant-Id": "other"})
    assert status == (200 if esb else 403)
    assert (reply["code"], reply["code_name"]) == (1640302, "CROSS_TENANT_FORBIDDEN")
    assert resp_headers["X-Bkapi-Error-Code"] == "1640302"
    assert sim.stats.refused_count("resource_watch", "tenant") == 1
    assert sim.stats.watch_requests() == 3


@pytest.mark.parametrize("path", PATHS)
async def test_app_of_every_tenant_must_name_one_and_cmdb_checks_it(make_sim, http, path):
    sim = await make_sim(tenant_mode="multi", tenant="default")
    body = {"bk_resource": "plat", **CREDS}
    esb = path.startswith("/api/c/")
    status, _, reply = await post(http, sim, path, body)
    assert (status, reply["code"]) == (200 if esb else 403, 1640302)  # no header: refused by the gateway
    status, _, reply = await post(http, sim, path, body, {"X-Bk-Tenant-Id": "default"})
    assert (status, reply["result"]) == (200, True)
    # Any other tenant passes the gateway, and CMDB refuses it in its own envelope at HTTP 200.
    status, _, reply = await post(http, sim, path, body, {"X-Bk-Tenant-Id": "nope"})
    assert (status, reply["result"], reply["code"], reply["data"]) == (200, False, 1100005, None)
    assert "invalid tenant" in reply["message"]
    assert ("request_id" in reply) == esb
    assert sim.stats.refused_count(reason="tenant") == 2
    assert sim.stats.watch_requests() == 1


async def test_tenant_refusals_hold_for_list_apis_too(make_sim, http):
    sim = await make_sim(tenant_mode="multi", tenant="acme", app_tenant="acme")
    status, _, reply = await post(http, sim, GW + "/api/v3/findmany/cloudarea", headers={"X-Bk-Tenant-Id": "x"})
    assert (status, reply["code"]) == (403, 1640302)
    status, _, reply = await post(http, sim, ESB.format("search_cloud_area"), CREDS, {"X-Bk-Tenant-Id": "x"})
    assert (status, reply["code"]) == (200, 1640302)
    _, _, reply = await post(http, sim, GW + "/api/v3/findmany/cloudarea", headers={"X-Bk-Tenant-Id": "acme"})
    assert reply["result"] is True
    assert sim.stats.lists["search_cloud_area"] == 1
    assert sim.stats.refused_count("search_cloud_area", "tenant") == 2


async def test_single_tenant_ignores_the_header(sim, http):
    # The gateway overwrites X-Bk-Tenant-Id with "default" (bk-default-tenant): whatever a client sends is harmless.
    for headers in ({}, {"X-Bk-Tenant-Id": "0"}, {"X-Bk-Tenant-Id": "whatever"}):
        status, _, reply = await post(http, sim, GW + WATCH.format("plat"), headers=headers)
        assert (status, reply["result"]) == (200, True)


def test_bad_tenant_options_are_refused():
    from rwatch.sim.parts import SimOptions
    from rwatch.sim.server import Simulator

    with pytest.raises(ValueError, match="tenant_mode"):
        Simulator(SimOptions(port=0, tenant_mode="mixed"))
    with pytest.raises(ValueError, match="empty"):
        Simulator(SimOptions(port=0, tenant_mode="multi", app_tenant=""))
