"""The seeded load generator: exact counts, determinism, a topology that stays valid."""

from __future__ import annotations

import asyncio

import pytest

from rwatch.sim.load import DEFAULT_MIX, LoadGenerator, build_topology
from rwatch.sim.state import SimState


def fresh(seed: int = 0) -> tuple[SimState, LoadGenerator]:
    state = SimState(seed=seed)
    build_topology(state, bizs=2, sets_per_biz=2, modules_per_set=2, hosts=20)
    return state, LoadGenerator(state, seed=seed)


def assert_valid(state: SimState) -> None:
    modules, sets, bizs = state.objects("module"), state.objects("set"), state.objects("biz")
    hosts = state.objects("host")
    for module in modules.values():
        assert str(module["bk_set_id"]) in sets
        assert sets[str(module["bk_set_id"])]["bk_biz_id"] == module["bk_biz_id"]
    for s in sets.values():
        assert str(s["bk_biz_id"]) in bizs
    placed: dict[int, set[int]] = {}
    for row in state.objects("host_relation").values():
        assert str(row["bk_host_id"]) in hosts
        module = modules[str(row["bk_module_id"])]
        assert (row["bk_biz_id"], row["bk_set_id"]) == (module["bk_biz_id"], module["bk_set_id"])
        placed.setdefault(row["bk_host_id"], set()).add(row["bk_biz_id"])
    assert set(placed) == {h["bk_host_id"] for h in hosts.values()}  # every host sits in a module
    assert all(len(b) == 1 for b in placed.values())  # of exactly one business
    for host in hosts.values():
        assert str(host["bk_cloud_id"]) in state.objects("plat")
    for process in state.objects("process").values():
        assert str(process["bk_biz_id"]) in bizs
    members = {int(k): v["bk_biz_ids"] for k, v in state.objects("biz_set_relation").items()}
    for set_id, ids in members.items():
        assert str(set_id) in state.objects("biz_set")
        for biz_id in ids:
            assert bizs[str(biz_id)]["default"] == 0
            assert bizs[str(biz_id)]["bk_data_status"] != "disabled"


def test_run_applies_exactly_n_ops_and_keeps_the_topology_valid():
    state, load = fresh()
    applied = load.run(5000)
    assert sum(applied.values()) == 5000
    assert set(applied) <= set(DEFAULT_MIX)
    assert state.events_total > 5000
    assert_valid(state)


def test_same_seed_same_changes():
    a_state, a = fresh(seed=42)
    b_state, b = fresh(seed=42)
    assert a.run(800) == b.run(800)
    for resource in ("host", "host_relation", "module", "biz_set_relation", "object_instance"):
        assert a_state.objects(resource) == b_state.objects(resource)
        assert [n.event_type for n in a_state.chain(resource)] == [
            n.event_type for n in b_state.chain(resource)
        ]


def test_mix_selects_operations():
    state, load = fresh()
    load.set_mix({"host.move": 1, "biz.update": 1})
    applied = load.run(200)
    assert set(applied) == {"host.move", "biz.update"}
    assert_valid(state)


def test_bad_mix_is_refused():
    _, load = fresh()
    with pytest.raises(ValueError, match="unknown"):
        load.set_mix({"host.explode": 1})
    with pytest.raises(ValueError):
        load.set_mix({"host.update": 0})


async def test_background_rate_from_options(make_sim):
    sim = await make_sim(load_rate=500, load_mix={"project.update": 1, "project.create": 1})
    assert sim.load.running
    seen = sim.state.chain_of("project").end
    changed = asyncio.Event()
    sim.state.listeners.append(lambda resource: resource == "project" and changed.set())
    async with asyncio.timeout(5):
        await changed.wait()  # the background task applied a change without anyone asking
    assert sim.state.chain_of("project").end > seen
    await sim.load.aclose()
    assert not sim.load.running
