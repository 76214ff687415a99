"""The list APIs as they really page (cmdb-watch-api §10.3, §10.5), against the simulator over real HTTP: a short
page ends a listing, a page that does not advance is an error naming the API, counts are proof only where the API
gives them."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rwatch.bus.memory import MemoryBus
from rwatch.cmdb.client import CmdbClient
from rwatch.cmdb.listing import ListApi, Proof
from rwatch.config import CmdbConfig, Config
from rwatch.errors import ListingBroken
from rwatch.events import ResyncMark
from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from rwatch.watch.resync import Resyncer


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(port=0, hold=0.5, error_delay=0.0, sets_per_biz=7)) as s:
        for _ in range(505):
            s.state.create("project")
        yield s


def client(sim: Simulator, api: str = "apigw") -> CmdbClient:
    base = sim.url if api == "esb" else sim.url + "/api/bk-cmdb/prod"
    return CmdbClient(CmdbConfig(base_url=base, api=api, rate_limit=0))


async def listing(lists: ListApi, api: str, id_field: str, proof: Proof, **kw: Any) -> list[Any]:
    got: list[Any] = []
    async for page, _ in lists.pages(api, id_field, Counter(), proof, **kw):
        got.extend(d[id_field] for d in page)
    return got


@pytest.mark.parametrize("api", ["apigw", "esb"])
async def test_a_countless_api_is_paged_to_its_short_page_and_proved_by_enable_count(sim: Simulator, api: str) -> None:
    # list_project says count 0 on every detail page: paging "while listed < count" stopped after 500.
    async with client(sim, api) as c:
        proof = Proof()
        ids = await listing(ListApi(c, asyncio.Event(), 2), "list_project", "id", proof, body={"fields": ["id"]})
    assert len(ids) == len(set(ids)) == len(sim.state.objects("project")) == 506
    assert proof.complete
    assert sim.stats.lists["list_project"] == 3  # 500, then 6 (short: the end), then the enable_count request


async def test_esb_search_set_drops_a_filter_and_paging_by_it_is_an_error_not_a_loop(sim: Simulator) -> None:
    biz = next(b["bk_biz_id"] for b in sim.state.objects("biz").values() if b["default"] == 0)
    async with client(sim, "esb") as c:
        lists = ListApi(c, asyncio.Event(), 2)
        with pytest.raises(ListingBroken) as info:
            await listing(lists, "search_set", "bk_set_id", Proof(), body={"fields": ["bk_set_id"]}, limit=2,
                          bk_biz_id=biz)
        assert info.value.extra["api"] == "search_set" and "do not advance" in info.value.message
        # By a legacy condition, as the resync pages it, the ESB forwards it and paging works.
        ids = await listing(lists, "search_set", "bk_set_id", Proof(), body={"fields": ["bk_set_id"]}, limit=2,
                            style="condition", param="condition", bk_biz_id=biz)
    assert ids == sorted(int(k) for k, s in sim.state.objects("set").items() if s["bk_biz_id"] == biz)


async def test_a_count_that_disagrees_leaves_the_listing_unproved_and_nothing_is_swept(
        sim: Simulator, tmp_path: Any) -> None:
    """A project created between the last page and the count: the totals differ, so the resync publishes its rows
    but no mark (no sweep), and says why."""
    config = Config.model_validate({"cmdb": {"base_url": sim.url, "rate_limit": 0},
                                    "store": {"url": f"sqlite:///{tmp_path}/state.db"}})
    published: list[Any] = []
    stop = asyncio.Event()
    bus = MemoryBus(stop=stop)

    async with client(sim) as c, open_store(config.store.url.get_secret_value()) as store:
        resyncer = Resyncer(config, c, bus, stop, store=store)
        original = resyncer.lists.call

        async def call(api: str, body: dict[str, Any], requests: Counter[str], **path: Any) -> Any:
            if (body.get("page") or {}).get("enable_count"):
                sim.state.create("project")
            return await original(api, body, requests, **path)

        resyncer.lists.call = call  # type: ignore[method-assign]

        async def publish(events: list[Any]) -> None:
            published.extend(events)

        bus.publish = publish  # type: ignore[method-assign]
        result = await resyncer.run("project")
    assert not result.complete and "list_project" in result.reasons[0] and "enable_count" in result.reasons[0]
    assert len(published) == 506 and not any(isinstance(e, ResyncMark) for e in published)
