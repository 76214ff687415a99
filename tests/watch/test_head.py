"""The resync head never runs ahead of CMDB (issue 12): asked without filters, and a clock fallback that
subtracts the skew allowance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from rwatch.bus.memory import MemoryBus
from rwatch.cmdb.client import SKEW_ALLOWANCE, CmdbClient
from rwatch.cmdb.protocol import decode_cursor
from rwatch.config import Config
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.watch.resync import Resyncer


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=0.5, error_delay=0.0, retention=3600)) as s:
        yield s


def resyncer(sim: Simulator, client: CmdbClient, **resource: object) -> Resyncer:
    config = Config.model_validate({"cmdb": {"base_url": sim.url, "rate_limit": 0},
                                    "watch": {"resources": {"host": resource}}})
    return Resyncer(config, client, MemoryBus(), asyncio.Event())


async def test_the_head_is_the_newest_event_whatever_the_resources_filter(sim: Simulator) -> None:
    # The host stream's newest event is an update; this installation follows deletes only. A filtered from-now
    # request answers the NoEventCursor, and the old head then fell back to the local clock.
    key = next(iter(sim.state.objects("host")))
    sim.state.update("host", key, {"bk_host_name": "newest"})
    newest = decode_cursor(sim.state.chain("host")[-1].cursor)
    assert newest is not None
    async with CmdbClient(Config.model_validate({"cmdb": {"base_url": sim.url}}).cmdb) as client:
        head = await resyncer(sim, client, event_types=["delete"]).head("host")
    assert head == (newest.sec, newest.inc)


async def test_with_no_event_in_the_window_the_head_is_cmdbs_clock_less_the_allowance(sim: Simulator) -> None:
    sim.state.clock.jump(2 * 3600)  # every event fell out of the window: from now answers the NoEventCursor
    async with CmdbClient(Config.model_validate({"cmdb": {"base_url": sim.url}}).cmdb) as client:
        head = await resyncer(sim, client).head("host")
    # Never ahead of CMDB's clock (its Date header has one-second resolution): at least the allowance behind.
    assert head[1] == 0
    assert head[0] <= sim.state.clock.now() - SKEW_ALLOWANCE + 1
    assert head[0] >= sim.state.clock.now() - SKEW_ALLOWANCE - 2
