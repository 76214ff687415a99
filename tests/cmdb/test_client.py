"""The CMDB client against the simulator over real HTTP: both auth styles, error classes, clock, rate limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rwatch.cmdb.client import CmdbClient, rate_limiter
from rwatch.cmdb.protocol import NO_EVENT_CURSOR
from rwatch.config import CmdbConfig
from rwatch.errors import (
    AuthFailed,
    CmdbPermanentError,
    CmdbRateLimited,
    CmdbRefused,
    CmdbTransientError,
    CursorExpired,
    EndpointNotFound,
    GrantMissing,
    PermissionDenied,
    StartOutOfWindow,
    TenantRefused,
)
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator

FIELDS = ["bk_host_id", "bk_host_innerip"]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    opts = SimOptions(port=0, hold=0.5, error_delay=0.0, app_code="rw", app_secret="s3cret", hosts=5)
    async with Simulator(opts) as s:
        yield s


def config(sim: Simulator, **kw: Any) -> CmdbConfig:
    base = {"base_url": sim.url, "app_code": "rw", "app_secret": "s3cret", "rate_limit": 0}
    # model_copy for the timeout: tests want one below the 20 s production floor.
    timeout = kw.pop("timeout", None)
    cfg = CmdbConfig.model_validate({**base, **kw})
    return cfg.model_copy(update={"timeout": timeout}) if timeout else cfg


@pytest.mark.parametrize("api", ["apigw", "esb"])
async def test_both_auth_styles_watch_from_now_and_by_cursor(sim: Simulator, api: str) -> None:
    async with CmdbClient(config(sim, api=api)) as client:
        first = await client.watch("host", fields=FIELDS, event_types=[])
        assert first.watched and first.events[0].detail.keys() == set(FIELDS)
        key = first.events[0].detail["bk_host_id"]
        sim.state.update("host", str(key), {"bk_host_name": "changed"})
        nxt = await client.watch("host", fields=FIELDS, event_types=["update"], cursor=first.last_cursor)
        assert [e.event_type for e in nxt.events] == ["update"]
    # Each style put the credentials where the channel wants them: the simulator refuses them elsewhere.
    assert sim.stats.watch_requests("host") == 2


@pytest.mark.parametrize("api", ["apigw", "esb"])
async def test_wrong_credentials_are_a_permanent_error(sim: Simulator, api: str) -> None:
    async with CmdbClient(config(sim, api=api, app_secret="wrong")) as client:
        with pytest.raises(CmdbPermanentError):
            await client.watch("host", fields=FIELDS, event_types=[])


@pytest.mark.parametrize(("fault", "error", "reason"), [
    ({"kind": "http_500"}, CmdbTransientError, "http_5xx"),
    ({"kind": "http_503"}, CmdbTransientError, "http_5xx"),
    ({"kind": "http_429"}, CmdbRateLimited, None),
    ({"kind": "code", "code": 1199997}, CmdbRateLimited, None),
    ({"kind": "code", "code": 1199017}, CmdbTransientError, None),
    ({"kind": "code", "code": 9900403}, PermissionDenied, None),
    ({"kind": "detail_missing"}, CmdbTransientError, None),
    ({"kind": "malformed"}, CmdbTransientError, "malformed"),
    ({"kind": "truncated"}, CmdbTransientError, "malformed"),
    ({"kind": "drop"}, CmdbTransientError, "connection"),
    ({"kind": "slow", "delay": 2.0}, CmdbTransientError, "timeout"),
])
async def test_failures_are_classified(sim: Simulator, fault: dict[str, Any], error: type[Exception],
                                       reason: str | None) -> None:
    sim.faults.schedule(fault)
    async with CmdbClient(config(sim, timeout=1.0)) as client:
        with pytest.raises(error) as info:
            await client.watch("host", fields=FIELDS, event_types=[])
    if reason is not None:
        assert info.value.extra.get("reason") == reason  # type: ignore[attr-defined]
    assert info.value.resource == "host"  # type: ignore[attr-defined]


async def test_protocol_errors_are_classified(sim: Simulator) -> None:
    async with CmdbClient(config(sim)) as client:
        with pytest.raises(CursorExpired) as expired:
            await client.watch("host", fields=FIELDS, event_types=[], cursor="bm90IGEgY3Vyc29y")
        assert expired.value.code == 1103007
        with pytest.raises(StartOutOfWindow):
            await client.watch("host", fields=FIELDS, event_types=[], start_from=1)
        with pytest.raises(CmdbPermanentError) as bad:
            await client.watch("host", fields=[], event_types=[])
        assert bad.value.code == 1199998 and "must have fields" in bad.value.message
        # The NoEventCursor is a cursor the server accepts (it means "from the oldest retained event").
        reply = await client.watch("plat", fields=[], event_types=[], cursor=NO_EVENT_CURSOR)
        assert reply.watched


async def test_server_clock_is_read_from_the_date_header(sim: Simulator) -> None:
    sim.state.clock.jump(3600)
    async with CmdbClient(config(sim)) as client:
        await client.watch("host", fields=FIELDS, event_types=[])
        assert abs(client.server_now() - sim.state.clock.now()) < 3
        sim.state.clock.jump(-3600)
        await client.watch("host", fields=FIELDS, event_types=[])
        assert client.skew == 0.0


async def test_rate_limit_spaces_calls() -> None:
    loop = asyncio.get_running_loop()
    limiter = rate_limiter(20)
    assert limiter is not None
    start = loop.time()
    for _ in range(4):
        await limiter.acquire()
    assert 0.14 <= loop.time() - start < 0.5  # three pauses of 1/20 s
    await asyncio.sleep(0.2)  # idle for a while: no burst credit is kept beyond the next slot
    start = loop.time()
    await limiter.acquire()
    await limiter.acquire()
    assert loop.time() - start >= 0.04
    assert rate_limiter(0) is None  # 0 = off


async def test_rate_limit_applies_to_real_calls(sim: Simulator) -> None:
    loop = asyncio.get_running_loop()
    async with CmdbClient(config(sim, rate_limit=5)) as client:
        start = loop.time()
        for _ in range(3):
            await client.watch("host", fields=FIELDS, event_types=[])
    assert loop.time() - start >= 0.39  # two pauses of 1/5 s


# --- the gateway's and the ESB's codes (cmdb-watch-api §10.4): classified by code, whatever the HTTP status ---

@pytest.mark.parametrize("api", ["apigw", "esb"])
@pytest.mark.parametrize(("code", "error"), [
    (1642901, CmdbRateLimited), (1642904, CmdbRateLimited),  # the gateway's rate limits
    (1650201, CmdbTransientError), (1650301, CmdbTransientError), (1650401, CmdbTransientError),  # its backends
    (1306201, CmdbTransientError),  # ESB: CMDB unreachable or slower than 30 s
])
async def test_gateway_and_esb_transient_codes_at_http_200_are_transient(sim: Simulator, api: str, code: int,
                                                                        error: type[Exception]) -> None:
    # Behind the status-rewrite plugin they arrive with HTTP 200 and result: false; the old client called every
    # unknown code permanent, so one rate limit aborted a resync.
    sim.faults.schedule({"kind": "code", "code": code, "scope": "any"})
    async with CmdbClient(config(sim, api=api)) as client:
        with pytest.raises(error) as info:
            await client.watch("host", fields=FIELDS, event_types=[])
    assert not isinstance(info.value, CmdbPermanentError)
    assert info.value.code == code  # type: ignore[attr-defined]


@pytest.mark.parametrize(("code", "error", "reason", "fix"), [
    (9900403, PermissionDenied, "permission", "watch_host_event"),
    (1640301, GrantMissing, "grant", "grant app 'rw' the resource 'resource_watch'"),
    (1640302, TenantRefused, "tenant", "cmdb.tenant_id"),
    (1100005, TenantRefused, "tenant", "cmdb.tenant_id"),
    (1640101, AuthFailed, "auth", "cmdb.app_secret"),
    (1640102, AuthFailed, "auth", "cmdb.username"),
    (1640401, EndpointNotFound, "not_found", "cmdb.base_url"),
])
async def test_refusals_name_what_the_operator_must_do(sim: Simulator, code: int, error: type[CmdbRefused],
                                                       reason: str, fix: str) -> None:
    sim.faults.schedule({"kind": "code", "code": code})
    async with CmdbClient(config(sim)) as client:
        with pytest.raises(error) as info:
            await client.watch("host", fields=FIELDS, event_types=[])
    assert info.value.reason == reason and fix in info.value.fix
    assert info.value.fields()["fix"] == info.value.fix  # a JSON log line carries it as a key


async def test_an_html_page_where_the_api_should_be_is_endpoint_not_found(sim: Simulator) -> None:
    # A base URL that misses the gateway's /api/bk-cmdb/<stage>: aiohttp's 404 page, as any web server's.
    async with CmdbClient(config(sim, base_url=sim.url + "/api/bk-cmdb/prod/nowhere")) as client:
        with pytest.raises(EndpointNotFound) as info:
            await client.watch("host", fields=FIELDS, event_types=[])
    assert "cmdb.base_url" in info.value.fix and info.value.extra["status"] == 404


async def test_supplier_account_and_tenant_go_where_the_server_reads_them(sim: Simulator) -> None:
    seen: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append({"headers": dict(request.headers), "body": await request.json(), "path": request.path})
        return await handler(request)

    async def forward(request: web.Request) -> web.Response:
        return await sim_forward(sim, request)

    app = web.Application(middlewares=[record])
    app.router.add_post("/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        single = CmdbClient(config(sim, base_url=url, supplier_account="7"))
        multi = CmdbClient(config(sim, base_url=url, tenant_id="acme", api="esb"))
        async with single, multi:
            await single.watch("host", fields=FIELDS, event_types=[])
            await multi.watch("host", fields=FIELDS, event_types=[])
    finally:
        await runner.cleanup()
    gw, esb = seen
    assert gw["body"]["bk_supplier_account"] == "7" and gw["headers"]["X-Bkcmdb-Supplier-Account"] == "7"
    assert "X-Bk-Tenant-Id" not in gw["headers"]  # single-tenant: the gateway sets its own
    assert esb["headers"]["X-Bk-Tenant-Id"] == "acme" and esb["body"]["bk_supplier_account"] == "0"
    assert esb["body"]["bk_app_code"] == "rw"


async def sim_forward(sim: Simulator, request: web.Request) -> web.Response:
    """Pass a request on to the simulator and its answer back (the recording proxy of the test above)."""
    async with aiohttp.ClientSession() as session, session.post(
        sim.url + request.path, data=await request.read(),
        headers={k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")},
    ) as resp:
        return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
