"""The Ansible inventory: the pure document from topology rows and host rows, and the sink on a real SQLite mirror."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from rwatch.config import Config
from rwatch.config.loading import load_config
from rwatch.errors import ConfigError
from rwatch.events import Event, iso_utc, watch_event_id
from rwatch.sinks.ansible import AnsibleInventorySink, InventoryOptions, alias, encode, host_vars, inventory
from rwatch.sinks.base import TopologyRow
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.registry import make_sink

DEFAULTS = InventoryOptions()
_N = iter(range(1, 1_000_000))


def event(resource: str, key: str, data: dict[str, object], action: str = "create") -> Event:
    """A watch event, each one newer than the last (this module's own: the prom_sd tests change on their own)."""
    n = next(_N)
    cursor = f"{resource}-{n}"
    return Event(id=watch_event_id(resource, cursor), resource=resource, action=action,  # type: ignore[arg-type]
                 key=key, version=(1_700_000_000, n), occurred_at=iso_utc(1_700_000_000),
                 observed_at=iso_utc(1_700_000_000), cursor=cursor, data=data)


def row(host: int, module: int, set_: int | None = 20, biz: int | None = 2, *, tenant: str = "0",
        ip: str | None = "10.0.0.{host}", names: bool = True, host_name: str | None = None) -> TopologyRow:
    return TopologyRow(tenant, biz, f"biz{biz}" if names and biz is not None else None,
                       set_, f"set{set_}" if names and set_ is not None else None,
                       module, f"mod{module}" if names else None, host,
                       ip.format(host=host) if ip else None, 0, host_name)


def hosts_of(rows: list[TopologyRow], **extra: Any) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r.tenant, r.bk_host_id): {"bk_host_id": r.bk_host_id, **extra} for r in rows}


def groups(document: dict[str, Any]) -> set[str]:
    return set(document) - {"_meta", "all"}


# --- the pure document ----------------------------------------------------------------------------------


def test_groups_nest_biz_set_module_with_ids_and_names_as_vars() -> None:
    rows = [row(7, 30), row(8, 30), row(9, 31, set_=21)]
    doc = inventory(rows, hosts_of(rows), DEFAULTS)
    assert doc["all"] == {"children": ["bk_biz_2"]}
    assert doc["bk_biz_2"] == {"children": ["bk_set_20", "bk_set_21"], "vars": {"bk_biz_id": 2, "bk_biz_name": "biz2"}}
    assert doc["bk_set_20"] == {"children": ["bk_module_30"], "vars": {"bk_set_id": 20, "bk_set_name": "set20"}}
    assert doc["bk_module_30"] == {"hosts": ["bk-7", "bk-8"], "vars": {"bk_module_id": 30, "bk_module_name": "mod30"}}
    assert doc["bk_module_31"]["hosts"] == ["bk-9"]
    assert doc["_meta"]["hostvars"]["bk-7"] == {"ansible_host": "10.0.0.7", "bk_host_id": 7, "bk_cloud_id": 0}
    assert groups(doc) == {"bk_biz_2", "bk_set_20", "bk_set_21", "bk_module_30", "bk_module_31"}


def test_a_host_in_two_modules_is_in_both_groups_and_named_once() -> None:
    rows = [row(7, 30), row(7, 40, set_=50, biz=3)]
    doc = inventory(rows, hosts_of(rows), DEFAULTS)
    assert doc["bk_module_30"]["hosts"] == doc["bk_module_40"]["hosts"] == ["bk-7"]
    assert list(doc["_meta"]["hostvars"]) == ["bk-7"]
    assert doc["all"]["children"] == ["bk_biz_2", "bk_biz_3"]


def test_only_hosts_whose_row_is_live_appear() -> None:
    rows = [row(7, 30), row(8, 30)]
    doc = inventory(rows, hosts_of(rows[:1]), DEFAULTS)  # host 8 deleted, its relation not yet
    assert doc["bk_module_30"]["hosts"] == ["bk-7"] and list(doc["_meta"]["hostvars"]) == ["bk-7"]
    empty = inventory(rows, {}, DEFAULTS)
    assert empty == {"_meta": {"hostvars": {}}, "all": {"children": []}}


def test_unknown_parents_hang_the_module_under_the_nearest_known_one() -> None:
    rows = [row(7, 30, set_=None), row(8, 31, set_=None, biz=None), row(9, 32, names=False)]
    doc = inventory(rows, hosts_of(rows), DEFAULTS)
    assert doc["bk_biz_2"]["children"] == ["bk_module_30", "bk_set_20"]
    assert doc["all"]["children"] == ["bk_biz_2", "bk_module_31"]
    # Names not mirrored yet: the ids are still vars, the names are left out rather than null.
    assert doc["bk_module_32"]["vars"] == {"bk_module_id": 32}


def test_hostvars_copy_configured_fields_and_keep_their_own() -> None:
    rows = [row(7, 30, ip=" 10.0.0.7 ,10.0.1.7"), row(8, 30, ip=None)]
    data = {("0", 7): {"bk_os_type": "1", "ansible_host": "spoof", "bk_host_id": 7},
            ("0", 8): {"bk_host_id": 8}}
    doc = inventory(rows, data, InventoryOptions(hostvars=("bk_os_type", "ansible_host", "missing")))
    assert doc["_meta"]["hostvars"] == {
        "bk-7": {"bk_os_type": "1", "ansible_host": "10.0.0.7", "bk_host_id": 7, "bk_cloud_id": 0},
        "bk-8": {"bk_host_id": 8, "bk_cloud_id": 0},  # no inner IP: no ansible_host
    }
    assert host_vars(doc, "bk-7")["ansible_host"] == "10.0.0.7" and host_vars(doc, "nope") == {}


def test_host_names_follow_the_template_and_stay_unique() -> None:
    rows = [row(7, 30, host_name="web"), row(8, 30, host_name="web"), row(9, 30, host_name=None),
            row(7, 30, tenant="t2", host_name="db")]
    doc = inventory(rows, hosts_of(rows), InventoryOptions(host_name="{bk_host_name}"))
    assert doc["bk_module_30"]["hosts"] == ["web", "bk-8", "bk-9", "db"]
    ip = inventory(rows, hosts_of(rows), InventoryOptions(host_name="{ip}"))
    # Host 7 of tenant t2 has the same IP as host 7 of tenant "0", and then the same fallback name.
    assert ip["bk_module_30"]["hosts"] == ["10.0.0.7", "10.0.0.8", "10.0.0.9", "bk-7"]


def test_alias_groups_are_sanitised_and_never_merge_different_names() -> None:
    assert alias("module_", "web-1.a b") == "module_web_1_a_b"
    assert alias("biz_", "空闲机池") == "biz_空闲机池"  # Unicode letters are valid in Ansible group names
    rows = [
        TopologyRow("0", 2, "shop", 20, "prod", 30, "web-1", 7, "10.0.0.7", 0, None),
        TopologyRow("0", 3, "blog", 21, "prod", 31, "web_1", 8, "10.0.0.8", 0, None),
        TopologyRow("0", 3, "blog", 21, "prod", 32, "web 1", 9, "10.0.0.9", 0, None),
    ]
    off = inventory(rows, hosts_of(rows), DEFAULTS)
    assert not any(g.startswith(("biz_", "set_", "module_")) for g in groups(off))
    doc = inventory(rows, hosts_of(rows), InventoryOptions(alias_groups=True))
    assert doc["biz_shop"] == {"children": ["bk_biz_2"]}
    assert doc["set_prod"] == {"children": ["bk_set_20", "bk_set_21"]}  # every set of that name
    assert doc["module_web_1"] == {"children": ["bk_module_31"]}  # the name that needed no change keeps it
    hashed = sorted(g for g in groups(doc) if g.startswith("module_web_1_"))
    assert len(hashed) == 2 and all(len(g) == len("module_web_1_") + 8 for g in hashed)
    assert {c for g in hashed for c in doc[g]["children"]} == {"bk_module_30", "bk_module_32"}
    assert {"biz_shop", "biz_blog", "set_prod", "module_web_1", *hashed} <= set(doc["all"]["children"])
    assert doc == inventory(list(reversed(rows)), hosts_of(rows), InventoryOptions(alias_groups=True))


def test_the_document_is_the_same_whatever_the_row_order() -> None:
    rows = [row(h, 30 + h % 3, set_=20 + h % 2) for h in range(1, 40)]
    a = encode(inventory(rows, hosts_of(rows), DEFAULTS))
    b = encode(inventory(list(reversed(rows)), hosts_of(rows), DEFAULTS))
    assert a == b and a.endswith(b"\n")
    assert json.loads(a)["bk_set_21"]["children"] == ["bk_module_30", "bk_module_31", "bk_module_32"]


# --- configuration --------------------------------------------------------------------------------------


def write_config(tmp_path: Path, sink: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[sinks.mirror]\nkind = "mirror"\nurl = "sqlite:///{tmp_path}/m.db"\n'
                    f'[sinks.inv]\nkind = "ansible_inventory"\nfile = "{tmp_path}/inv.json"\n{sink}\n')
    return path


@pytest.mark.parametrize(("line", "key"), [
    ('host_name = "{nope}"', "sinks.inv.host_name"),
    ('host_name = "static"', "sinks.inv.host_name"),
    ('hostvars = [" x"]', "sinks.inv.hostvars"),
    ('alias_groups = "maybe"', "sinks.inv.alias_groups"),
    ('source = "inv"', "sinks.inv.source"),
])
def test_bad_options_name_their_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, line))
    assert key in str(caught.value)


# --- the sink on a real mirror --------------------------------------------------------------------------


def sample(name: str, sink: str) -> float:
    return REGISTRY.get_sample_value(name, {"sink": sink}) or 0.0


async def test_the_sink_writes_the_file_atomically_and_follows_the_mirror(tmp_path: Path) -> None:
    config = Config.model_validate({"sinks": {
        "mirror": {"kind": "mirror", "url": f"sqlite:///{tmp_path}/m.db"},
        "inv": {"kind": "ansible_inventory", "file": str(tmp_path / "out" / "inventory.json"),
                "hostvars": ["bk_os_type"]},
    }})
    mirror = make_sink("mirror", config)
    sink = make_sink("inv", config, {"mirror": mirror})
    assert isinstance(mirror, MirrorSink) and isinstance(sink, AnsibleInventorySink)
    path = tmp_path / "out" / "inventory.json"
    await mirror.open()
    await sink.open()
    try:
        assert json.loads(path.read_bytes()) == {"_meta": {"hostvars": {}}, "all": {"children": []}}
        await mirror.apply([event("host_relation", "7:30", {"bk_biz_id": 2, "bk_set_id": 20, "bk_module_id": 30,
                                                            "bk_host_id": 7})])
        await mirror.apply([event("host", "7", {"bk_host_id": 7, "bk_host_innerip": "10.0.0.7", "bk_cloud_id": 0,
                                                "bk_os_type": "1"})])
        await mirror.apply([event("module", "30", {"bk_module_id": 30, "bk_module_name": "nginx"})])
        await mirror.apply([event("set", "20", {"bk_set_id": 20, "bk_set_name": "prod"})])
        await mirror.apply([event("biz", "2", {"bk_biz_id": 2, "bk_biz_name": "shop"})])
        await sink.render_once()  # what the debouncer does after a commit, done now: the file is what matters here
        doc = json.loads(path.read_bytes())
        assert doc["bk_module_30"] == {"hosts": ["bk-7"], "vars": {"bk_module_id": 30, "bk_module_name": "nginx"}}
        assert doc["bk_biz_2"]["vars"] == {"bk_biz_id": 2, "bk_biz_name": "shop"}
        assert doc["_meta"]["hostvars"] == {"bk-7": {"bk_os_type": "1", "ansible_host": "10.0.0.7",
                                                     "bk_host_id": 7, "bk_cloud_id": 0}}
        assert sample("rwatch_ansible_inventory_hosts", "inv") == 1
        assert os.stat(path).st_mode & 0o777 == 0o644
        # Unchanged topology: the file is not touched (same inode, no temp file left).
        inode = path.stat().st_ino
        await mirror.apply([event("set", "21", {"bk_set_id": 21, "bk_set_name": "empty"})])
        await sink.render_once()
        assert path.stat().st_ino == inode and os.listdir(path.parent) == ["inventory.json"]
        # A rename keeps the group (ids), changes its var; the file is replaced, not rewritten in place.
        with path.open("rb") as held:
            await mirror.apply([event("module", "30", {"bk_module_id": 30, "bk_module_name": "nginx-2"},
                                      action="update")])
            await sink.render_once()
            assert json.loads(held.read())["bk_module_30"]["vars"]["bk_module_name"] == "nginx"
        assert json.loads(path.read_bytes())["bk_module_30"]["vars"]["bk_module_name"] == "nginx-2"
        assert path.stat().st_ino != inode
        # The host is deleted before its relation: it leaves at once.
        await mirror.apply([event("host", "7", {"bk_host_id": 7}, action="delete")])
        await sink.render_once()
        assert json.loads(path.read_bytes()) == {"_meta": {"hostvars": {}}, "all": {"children": []}}
        assert sample("rwatch_ansible_inventory_hosts", "inv") == 0
    finally:
        await sink.close()
        await mirror.close()


async def test_a_restart_leaves_an_equal_file_alone_and_a_write_failure_is_counted(tmp_path: Path) -> None:
    config = Config.model_validate({"sinks": {
        "mirror": {"kind": "mirror", "url": f"sqlite:///{tmp_path}/m.db"},
        "inv": {"kind": "ansible_inventory", "file": str(tmp_path / "inventory.json")},
        "bad": {"kind": "ansible_inventory", "file": str(tmp_path / "not-a-dir" / "inventory.json")},
    }})
    (tmp_path / "not-a-dir").write_text("")
    mirror = make_sink("mirror", config)
    assert isinstance(mirror, MirrorSink)
    await mirror.open()
    try:
        first = make_sink("inv", config, {"mirror": mirror})
        await first.open()
        await first.close()
        inode = (tmp_path / "inventory.json").stat().st_ino
        again = make_sink("inv", config, {"mirror": mirror})
        await again.open()
        await again.close()
        assert (tmp_path / "inventory.json").stat().st_ino == inode
        before = sample("rwatch_ansible_inventory_render_errors_total", "bad")
        bad = make_sink("bad", config, {"mirror": mirror})
        await bad.open()
        await bad.close()
        assert sample("rwatch_ansible_inventory_render_errors_total", "bad") == before + 1
    finally:
        await mirror.close()


# --- a mirror to read, shared with the command's and real Ansible's tests -------------------------------


async def fill_mirror(url: str) -> dict[str, set[int]]:
    """A mirror with two businesses, a host in two modules, a deleted host and a removed relation; the live
    hosts' inventory names -> the modules they are in (what ``ansible-inventory`` must show, and nothing else)."""
    config = Config.model_validate({"sinks": {"mirror": {"kind": "mirror", "url": url}}})
    mirror = make_sink("mirror", config)
    assert isinstance(mirror, MirrorSink)
    await mirror.open()
    try:
        await mirror.apply([event("biz", str(b), {"bk_biz_id": b, "bk_biz_name": n})
                            for b, n in ((2, "shop"), (3, "blog team"))])
        await mirror.apply([event("set", str(s), {"bk_set_id": s, "bk_set_name": "prod"}) for s in (20, 30)])
        await mirror.apply([event("module", str(m), {"bk_module_id": m, "bk_module_name": n})
                            for m, n in ((21, "nginx"), (22, "mysql"), (31, "nginx"))])
        await mirror.apply([event("host", str(h), {"bk_host_id": h, "bk_host_innerip": f"10.0.0.{h}",
                                                   "bk_cloud_id": 0, "bk_host_name": f"h{h}", "bk_os_type": "1"})
                            for h in range(1, 7)])
        placed = {1: (2, 20, 21), 2: (2, 20, 21), 3: (2, 20, 22), 4: (3, 30, 31), 5: (3, 30, 31), 6: (2, 20, 22)}
        relations = [(h, *where) for h, where in placed.items()] + [(3, 3, 30, 31)]  # host 3 in two modules
        await mirror.apply([event("host_relation", f"{h}:{m}", {"bk_host_id": h, "bk_biz_id": b, "bk_set_id": s,
                                                                "bk_module_id": m}) for h, b, s, m in relations])
        await mirror.apply([event("host", "5", {"bk_host_id": 5}, action="delete")])  # its relation lingers
        await mirror.apply([event("host_relation", "6:22", {"bk_host_id": 6, "bk_biz_id": 2, "bk_set_id": 20,
                                                            "bk_module_id": 22}, action="delete")])  # host 6: idle
    finally:
        await mirror.close()
    return {"bk-1": {21}, "bk-2": {21}, "bk-3": {22, 31}, "bk-4": {31}}
