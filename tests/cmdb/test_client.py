"""The CMDB client against the simulator over real HTTP: both auth styles, error classes, clock, rate limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rwatch.cmdb import client as client_module
from rwatch.cmdb.client import CmdbClient, RateLimiter
from rwatch.cmdb.protocol import NO_EVENT_CURSOR
from rwatch.config import CmdbConfig
from rwatch.errors import (
    CmdbPermanentError,
    CmdbRateLimited,
    CmdbTransientError,
    CursorExpired,
    PermissionDenied,
    StartOutOfWindow,
)
from rwatch.sim.server import SimOptions, Simulator

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


async def test_rate_limit_spaces_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))

    monkeypatch.setattr(client_module.asyncio, "sleep", fake_sleep)
    limiter = RateLimiter(10, clock=lambda: now[0])
    for _ in range(4):
        await limiter.acquire()
    assert slept == [0.1, 0.2, 0.3]
    now[0] += 10  # idle for a while: no burst credit is kept beyond the next slot
    await limiter.acquire()
    assert slept == [0.1, 0.2, 0.3]
    await RateLimiter(0).acquire()  # 0 = off


async def test_rate_limit_applies_to_real_calls(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(client_module.asyncio, "sleep", recording_sleep)
    async with CmdbClient(config(sim, rate_limit=5)) as client:
        for _ in range(3):
            await client.watch("host", fields=FIELDS, event_types=[])
    assert len(waits) == 2 and all(w > 0.1 for w in waits)
