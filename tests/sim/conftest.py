"""Fixtures for the simulator tests: a running Simulator on a free port and an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator

FAST = {"port": 0, "hold": 0.5, "error_delay": 0.01}
GW = "/api/bk-cmdb/prod/api/v3/event/watch/resource/{}"
ESB = "/api/c/compapi/v2/cc/resource_watch/"
HOST_FIELDS = ["bk_host_id", "bk_host_innerip", "bk_cloud_id", "bk_host_name"]

MakeSim = Callable[..., Awaitable[Simulator]]


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    """Start simulators with fast timings plus any SimOptions overrides; all stop at the end of the test."""
    stack: list[Simulator] = []

    async def make(**overrides: Any) -> Simulator:
        sim = Simulator(SimOptions(**{**FAST, **overrides}))
        await sim.__aenter__()
        stack.append(sim)
        return sim

    yield make
    for sim in reversed(stack):
        await sim.__aexit__(None, None, None)


@pytest.fixture
async def sim(make_sim: MakeSim) -> Simulator:
    return await make_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


class Watch:
    """Posts watch requests to a simulator and returns the decoded envelope."""

    def __init__(self, http: aiohttp.ClientSession, sim: Simulator) -> None:
        self.http = http
        self.sim = sim

    async def __call__(
        self, resource: str, path: str | None = None, headers: dict[str, str] | None = None, **body: Any
    ) -> dict[str, Any]:
        if resource in ("host", "biz", "set", "module"):
            body.setdefault("bk_fields", HOST_FIELDS if resource == "host" else [f"bk_{resource}_id"])
        url = self.sim.url + (path or GW.format(resource))
        async with self.http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
            return result

    async def events(self, resource: str, **body: Any) -> dict[str, Any]:
        """The data of a successful reply (asserts success)."""
        reply = await self(resource, **body)
        assert reply["result"] is True, reply
        data: dict[str, Any] = reply["data"]
        return data


@pytest.fixture
def watch(http: aiohttp.ClientSession, sim: Simulator) -> Watch:
    return Watch(http, sim)
