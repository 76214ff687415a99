"""The simulated CMDB's objects and event production: topology, relations, biz sets, chains."""

from __future__ import annotations

import pytest

from rwatch.cmdb.protocol import RESOURCES, object_key
from rwatch.sim.chain import SimClock
from rwatch.sim.load import build_topology
from rwatch.sim.state import SimError, SimState


@pytest.fixture
def state() -> SimState:
    s = SimState()
    build_topology(s, bizs=2, sets_per_biz=2, modules_per_set=2, hosts=10)
    return s


def kinds(state: SimState, resource: str) -> list[tuple[str, str]]:
    return [(n.event_type, n.key) for n in state.chain(resource)]


def test_initial_topology_and_its_create_events(state):
    pool = state.objects("biz")[str(state.pool_biz_id)]
    assert (pool["default"], pool["bk_biz_name"]) == (1, "资源池")
    assert state.objects("module")[str(state.idle_module_id)]["default"] == 1
    assert len(state.objects("biz")) == 3
    assert len(state.objects("set")) == 1 + 4
    assert len(state.objects("module")) == 1 + 8
    assert len(state.objects("host")) == 10
    rows = state.objects("host_relation")
    assert len(rows) == 10
    for key, row in rows.items():
        assert key == f"{row['bk_host_id']}:{row['bk_module_id']}"
        assert set(row) == {"bk_biz_id", "bk_set_id", "bk_module_id", "bk_host_id", "bk_supplier_account"}
        assert row["bk_biz_id"] != state.pool_biz_id
    for resource in RESOURCES:
        chain = state.chain(resource)
        assert chain, resource
        assert chain[0].event_type in ("create", "update")
        for key, doc in state.objects(resource).items():
            assert object_key(resource, doc) == key


def test_move_host_deletes_old_rows_then_creates_new(state):
    host = 1
    [old] = state.host_modules(host)
    targets = [m for m in (int(k) for k in state.objects("module")) if m != old][:2]
    biz = state.objects("module")[str(targets[0])]["bk_biz_id"]
    targets = [m for m in targets if state.objects("module")[str(m)]["bk_biz_id"] == biz]
    before = len(state.chain("host_relation"))
    rows = state.move_host(host, targets)
    assert {r["bk_module_id"] for r in rows} == set(targets)
    new = kinds(state, "host_relation")[before:]
    assert new[0] == ("delete", f"{host}:{old}")
    assert [k for k, _ in new[1:]] == ["create"] * len(targets)
    assert all(n.event_type != "update" for n in state.chain("host_relation"))  # create/delete only


def test_move_host_refuses_modules_of_two_businesses(state):
    by_biz: dict[int, int] = {}
    for m in state.objects("module").values():
        by_biz.setdefault(m["bk_biz_id"], m["bk_module_id"])
    with pytest.raises(SimError):
        state.move_host(1, list(by_biz.values()))


def test_delete_host_deletes_its_relations_first(state):
    state.move_host(2, [m for m in state.host_modules(2)] + [state.host_modules(3)[0]])
    rel_before, host_before = len(state.chain("host_relation")), len(state.chain("host"))
    state.delete("host", "2")
    assert all(k == "delete" for k, _ in kinds(state, "host_relation")[rel_before:])
    assert not [r for r in state.objects("host_relation").values() if r["bk_host_id"] == 2]
    assert kinds(state, "host")[host_before:] == [("delete", "2")]
    last_rel = state.chain("host_relation")[-1].cluster_time
    assert state.chain("host")[-1].cluster_time > last_rel


def test_new_hosts_land_in_the_idle_module(state):
    host = state.create("host")
    assert state.host_modules(host["bk_host_id"]) == [state.idle_module_id]


def test_topology_is_protected(state):
    module_with_hosts = state.host_modules(1)[0]
    with pytest.raises(SimError) as err:
        state.delete("module", str(module_with_hosts))
    assert err.value.status == 409
    with pytest.raises(SimError):
        state.delete("biz", str(state.pool_biz_id))
    with pytest.raises(SimError):
        state.update("host_relation", "1:1", {})
    with pytest.raises(SimError):
        state.update("set", "2", {"bk_biz_id": 99})
    with pytest.raises(SimError):
        state.delete("plat", "0")


def test_delete_empty_set_cascades_modules(state):
    set_id = state.create("set", {"bk_biz_id": 2})["bk_set_id"]
    module_id = state.create("module", {"bk_set_id": set_id})["bk_module_id"]
    state.delete("set", str(set_id))
    assert str(module_id) not in state.objects("module")
    assert kinds(state, "module")[-1] == ("delete", str(module_id))


def test_biz_set_relation_follows_membership(state):
    bizs = sorted(int(k) for k, b in state.objects("biz").items() if not b["default"])
    relation = state.objects("biz_set_relation")
    assert list(relation.values()) == [{"bk_biz_set_id": 1, "bk_biz_ids": bizs}]  # no resource pool
    before = len(state.chain("biz_set_relation"))
    state.update("biz", str(bizs[0]), {"bk_data_status": "disabled"})  # archived: leaves every set
    state.update("biz", str(bizs[1]), {"bk_biz_maintainer": "x"})  # no membership change, no event
    new = state.chain("biz_set_relation")[before:]
    assert [(n.event_type, n.detail) for n in new] == [
        ("update", {"bk_biz_set_id": 1, "bk_biz_ids": bizs[1:]})
    ]
    rule = {"field": "bk_biz_id", "operator": "in", "value": [bizs[1]]}
    bs = state.create(
        "biz_set", {"bk_scope": {"match_all": False, "filter": {"condition": "AND", "rules": [rule]}}}
    )
    key = str(bs["bk_biz_set_id"])
    assert state.chain("biz_set_relation")[-1].detail == {
        "bk_biz_set_id": bs["bk_biz_set_id"],
        "bk_biz_ids": [bizs[1]],
    }
    state.delete("biz_set", key)
    assert state.chain("biz_set_relation")[-1].detail == {
        "bk_biz_set_id": bs["bk_biz_set_id"],
        "bk_biz_ids": [],
    }
    assert key not in state.objects("biz_set_relation")


def test_object_instance_keys_and_sub_resource(state):
    doc = state.create("object_instance", {"bk_obj_id": "router", "bk_inst_name": "r1"})
    key = f"router:{doc['bk_inst_id']}"
    assert state.objects("object_instance")[key]["bk_inst_name"] == "r1"
    assert state.chain("object_instance")[-1].sub_resource == "router"


def test_project_and_plat_keys(state):
    project = state.create("project", {"bk_project_name": "p"})
    assert str(project["id"]) in state.objects("project")
    plat = state.create("plat", {"bk_cloud_name": "c"})
    host = state.create("host", {"bk_cloud_id": plat["bk_cloud_id"]})
    assert host["bk_cloud_id"] == plat["bk_cloud_id"]
    with pytest.raises(SimError):
        state.delete("plat", str(plat["bk_cloud_id"]))  # a host still uses it


def test_expired_nodes_are_trimmed_lazily_keeping_the_newest():
    clock = SimClock()
    state = SimState(clock=clock, retention=100, keep_expired=50)
    for i in range(200):
        state.create("project", {"bk_project_name": f"p{i}"})
    clock.jump(1000)
    for i in range(1100):  # trimming runs every 1024 events
        state.update("plat", "0", {"bk_cloud_name": f"n{i}"})
    chain = state.chain_of("project")
    assert len(chain) == 1  # everything expired, only the newest (the watch token) is kept
    assert chain.newest is not None
    assert chain.newest.detail["bk_project_name"] == "p199"
    assert chain.end == 200
