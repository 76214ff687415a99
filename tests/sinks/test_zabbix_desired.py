"""The Zabbix sink's desired state: a pure function of topology rows and options (no Zabbix needed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rwatch.sinks.base import TopologyRow, first_ip
from rwatch.sinks.zabbix.desired import TemplateRule, ZabbixOptions, desired_state, segment


def row(host: int, module: int = 111, *, biz: int | None = 1, set_: int | None = 11, biz_name: str | None = "shop",
        set_name: str | None = "prod", module_name: str | None = "web", ip: str | None = "auto", cloud: int | None = 0,
        host_name: str | None = "auto") -> TopologyRow:
    return TopologyRow(
        tenant="0", bk_biz_id=biz, bk_biz_name=biz_name, bk_set_id=set_, bk_set_name=set_name,
        bk_module_id=module, bk_module_name=module_name, bk_host_id=host,
        bk_host_innerip=f"10.0.0.{host}" if ip == "auto" else ip, bk_cloud_id=cloud,
        bk_host_name=f"h{host}" if host_name == "auto" else host_name,
    )


def test_groups_are_biz_set_module_under_the_prefix_with_every_parent_keyed_by_ids() -> None:
    state = desired_state([row(1), row(2, 112, module_name="db")], ZabbixOptions())
    assert state.groups == {
        (): "BK", (1,): "BK/shop", (1, 11): "BK/shop/prod", (1, 11, 111): "BK/shop/prod/web",
        (1, 11, 112): "BK/shop/prod/db",
    }
    assert state.hosts[1].groups == {"BK/shop/prod/web"}
    assert state.held == frozenset()
    assert desired_state([], ZabbixOptions()).groups == {}


def test_a_host_has_its_ids_names_and_the_managed_tag_and_exactly_its_modules_groups() -> None:
    state = desired_state([row(7), row(7, 112, module_name="db")], ZabbixOptions(group_prefix="CMDB"))
    host = state.hosts[7]
    assert (host.host, host.name, host.ip, host.disabled) == ("bk-7", "h7 (bk-7)", "10.0.0.7", False)
    assert host.groups == {"CMDB/shop/prod/web", "CMDB/shop/prod/db"}
    assert host.tags == {
        ("rwatch", "CMDB"), ("bk_host_id", "7"), ("bk_cloud_id", "0"), ("bk_biz_id", "1"), ("bk_biz", "shop"),
        ("bk_set_id", "11"), ("bk_set", "prod"), ("bk_module_id", "111"), ("bk_module", "web"),
        ("bk_module_id", "112"), ("bk_module", "db"),
    }


def test_default_names_stay_unique_when_two_control_areas_reuse_an_ip() -> None:
    state = desired_state([row(1, ip="10.1.1.1", cloud=0, host_name=None),
                           row(2, ip="10.1.1.1", cloud=5, host_name=None)], ZabbixOptions())
    assert {(h.host, h.name) for h in state.hosts.values()} == {("bk-1", "10.1.1.1 (bk-1)"),
                                                                ("bk-2", "10.1.1.1 (bk-2)")}


def test_name_templates_are_checked_sanitised_and_made_unique_when_they_collide() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        ZabbixOptions(technical_name="{hostname}")
    options = ZabbixOptions(technical_name="{bk_host_name}", visible_name="{ip} in {bk_cloud_id}")
    state = desired_state([row(1, host_name="web/01 (a)", ip="10.9.9.9"), row(2, host_name="web/01 (a)",
                                                                                ip="10.9.9.9")], options)
    assert (state.hosts[1].host, state.hosts[2].host) == ("web_01 _a_", "web_01 _a_-2")
    assert (state.hosts[1].name, state.hosts[2].name) == ("10.9.9.9 in 0", "10.9.9.9 in 0 2")


def test_the_agent_listens_on_the_first_of_several_ips_and_no_ip_means_no_interface() -> None:
    assert first_ip(" 10.0.0.1 ,10.0.0.2") == "10.0.0.1"
    assert first_ip(None) is None and first_ip(" , ") is None
    state = desired_state([row(1, ip="10.0.0.1,10.0.0.2"), row(2, ip=None, host_name=None)], ZabbixOptions())
    assert (state.hosts[1].ip, state.hosts[2].ip, state.hosts[2].name) == ("10.0.0.1", None, "host 2 (bk-2)")


def test_a_name_not_known_yet_is_written_as_its_id_and_a_relation_without_ids_holds_its_host() -> None:
    state = desired_state([row(1, biz_name=None, module_name=None), row(2, set_=None), row(3, biz=None)],
                          ZabbixOptions())
    assert state.hosts[1].groups == {"BK/#1/prod/#111"}
    assert ("bk_biz", "#1") in state.hosts[1].tags
    assert set(state.hosts) == {1}
    assert state.held == {2, 3}
    assert desired_state([row(1)], ZabbixOptions(), pending=[9]).held == {9}


def test_a_slash_in_a_cmdb_name_does_not_nest_groups() -> None:
    assert segment("a/b", 1) == "a／b"
    assert segment("  ", 4) == "#4"
    state = desired_state([row(1, set_name="prod/eu")], ZabbixOptions())
    assert state.hosts[1].groups == {"BK/shop/prod／eu/web"}


def test_templates_by_module_rule_and_proxy_by_control_area() -> None:
    options = ZabbixOptions(
        template_rules=(TemplateRule(("Nginx by HTTP",), module="WEB*"), TemplateRule(("Linux by Zabbix agent",)),
                        TemplateRule(("Windows",), os_type="windows")),
        proxies={5: "proxy-eu"},
    )
    state = desired_state([row(1), row(2, 112, module_name="db", cloud=5)], options)
    assert state.hosts[1].templates == {"Nginx by HTTP", "Linux by Zabbix agent"}
    assert state.hosts[2].templates == {"Linux by Zabbix agent"}
    assert (state.hosts[1].proxy, state.hosts[2].proxy) == (None, "proxy-eu")
    assert TemplateRule(("W",), os_type="windows").matches(["x"], "2")
    assert not TemplateRule(("W",), os_type="windows").matches(["x"], None)


def test_hosts_only_in_idle_fault_or_recycle_modules_are_disabled_on_request() -> None:
    rows = [row(1, 1, module_name="空闲机"), row(2, 2, module_name="故障机"), row(2, 3, module_name="web"),
            row(3, 4, module_name="待回收")]
    assert not any(h.disabled for h in desired_state(rows, ZabbixOptions()).hosts.values())
    state = desired_state(rows, ZabbixOptions(disable_idle=True))
    assert {i: h.disabled for i, h in state.hosts.items()} == {1: True, 2: False, 3: True}
    assert ("rwatch_disabled", "idle") in state.hosts[1].tags


def test_options_refuse_a_prefix_or_on_delete_they_cannot_keep() -> None:
    for prefix in ("", "/BK", "BK/", " BK"):
        with pytest.raises(ValueError, match="group_prefix"):
            ZabbixOptions(group_prefix=prefix)
    with pytest.raises(ValueError, match="on_delete"):
        ZabbixOptions(on_delete="drop")  # type: ignore[arg-type]
    options = ZabbixOptions(group_prefix="Ops/BK")
    assert options.deleted_group == "Ops/BK/_deleted"
    assert replace(options, on_delete="move").on_delete == "move"
    assert options.owns_tag("bk_module") and options.owns_tag("rwatch") and not options.owns_tag("owner")


def test_the_same_rows_in_any_order_give_the_same_state() -> None:
    rows = [row(i, 100 + i % 3, module_name=f"m{i % 3}") for i in range(1, 30)]
    assert desired_state(rows, ZabbixOptions()) == desired_state(list(reversed(rows)), ZabbixOptions())
