"""The Zabbix sink's reconcile against the real Zabbix 6.0: it creates, renames, moves, removes and adopts as the
topology says, leaves alone what is not its own, finishes a reconcile cut short, and repeats itself for free.

Each test works under a prefix and name templates of its own (``unique``), and deletes what it made."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from rwatch.errors import TransientError
from rwatch.sinks.base import TopologyRow
from rwatch.sinks.zabbix.api import ZabbixApi, ZabbixUnavailable
from rwatch.sinks.zabbix.desired import TemplateRule, ZabbixOptions, desired_state
from rwatch.sinks.zabbix.reconcile import Summary, reconcile
from rwatch.sinks.zabbix.writes import ReconcileConflict
from tests.downstream.instances import Zabbix
from tests.downstream.side import Side

TEMPLATE = "Linux by Zabbix agent"  # shipped in Zabbix's data.sql


def row(host: int, biz: int, set_: int, module: int, *, biz_name: str | None = "auto",
        set_name: str | None = "auto", module_name: str | None = "auto", ip: str | None = "auto",
        cloud: int = 0) -> TopologyRow:
    return TopologyRow(
        tenant="0", bk_biz_id=biz, bk_biz_name=f"biz{biz}" if biz_name == "auto" else biz_name,
        bk_set_id=set_, bk_set_name=f"set{set_}" if set_name == "auto" else set_name,
        bk_module_id=module, bk_module_name=f"mod{module}" if module_name == "auto" else module_name,
        bk_host_id=host, bk_host_innerip=f"10.{cloud}.{host // 250}.{host % 250 + 1}" if ip == "auto" else ip,
        bk_cloud_id=cloud, bk_host_name=f"h{host}",
    )


def topology() -> list[TopologyRow]:
    """2 bizs x 2 sets x 2 modules, 2 hosts in each module, host 100 in two modules of biz 1."""
    rows = []
    host = 1
    for biz in (1, 2):
        for s in (1, 2):
            set_ = biz * 10 + s
            for m in (1, 2):
                module = set_ * 10 + m
                for _ in range(2):
                    rows.append(row(host, biz, set_, module))
                    host += 1
    rows += [row(100, 1, 11, 111), row(100, 1, 12, 121)]
    return rows


@pytest.fixture
def options(unique: str) -> ZabbixOptions:
    prefix = f"t{unique}"
    return ZabbixOptions(group_prefix=prefix, technical_name=f"{prefix}-{{bk_host_id}}",
                         visible_name=f"{{label}} ({prefix}-{{bk_host_id}})", on_delete="delete")


@pytest.fixture
async def api(zabbix: Zabbix) -> AsyncIterator[ZabbixApi]:
    # The fixture's session as a token: logged in once for the session, logged out by the fixture.
    async with ZabbixApi(zabbix.url, token=zabbix.token) as client:
        yield client


async def sync(api: ZabbixApi, rows: list[TopologyRow], options: ZabbixOptions, **kw: Any) -> Summary:
    return await reconcile(api, desired_state(rows, options), options, **kw)


async def test_a_full_reconcile_creates_every_group_with_its_parents_and_every_host(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = topology()
    summary = await sync(api, rows, options)
    desired = desired_state(rows, options)
    side.assert_equal(desired)
    prefix = options.group_prefix
    assert {f"{prefix}", f"{prefix}/biz1", f"{prefix}/biz1/set11", f"{prefix}/biz1/set11/mod111"} <= set(side.groups())
    assert (summary.groups_created, summary.hosts_created) == (1 + 2 + 4 + 8, 17)
    # Reads: groups, managed hosts, hosts to adopt. Writes: one hostgroup.create per level, one host.create.
    assert (summary.api_calls, summary.write_calls) == (3 + 4 + 1, 4 + 1)
    host = side.hosts()[100]
    assert host["groups"] == {f"{prefix}/biz1/set11/mod111", f"{prefix}/biz1/set12/mod121"}
    assert {("bk_module", "mod111"), ("bk_module", "mod121"), ("bk_module_id", "111"), ("bk_biz", "biz1"),
            ("bk_host_id", "100"), (options.managed_tag, prefix)} <= host["tags"]

    again = await sync(api, rows, options)
    assert again.write_calls == 0, again
    assert again.api_calls == 2  # every desired host has its managed host: nothing to look up for adoption


async def test_renaming_a_module_then_a_biz_renames_the_groups_below_in_place(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = topology()
    await sync(api, rows, options)
    before = side.groups()
    prefix = options.group_prefix

    rows = [replace(r, bk_module_name="nginx") if r.bk_module_id == 111 else r for r in rows]
    summary = await sync(api, rows, options)
    assert (summary.groups_renamed, summary.groups_created, summary.groups_removed) == (1, 0, 0)
    assert side.groups()[f"{prefix}/biz1/set11/nginx"] == before[f"{prefix}/biz1/set11/mod111"]
    side.assert_equal(desired_state(rows, options))

    rows = [replace(r, bk_biz_name="shop") if r.bk_biz_id == 1 else r for r in rows]
    summary = await sync(api, rows, options)
    # biz1, its 2 sets and 4 modules: 7 groups in one hostgroup.update; the hosts' tags follow in one host.update.
    assert (summary.groups_renamed, summary.groups_created, summary.groups_removed) == (7, 0, 0)
    assert summary.write_calls == 2
    after = side.groups()
    assert after[f"{prefix}/shop"] == before[f"{prefix}/biz1"]
    assert after[f"{prefix}/shop/set12/mod122"] == before[f"{prefix}/biz1/set12/mod122"]
    assert after[f"{prefix}/shop/set11/nginx"] == before[f"{prefix}/biz1/set11/mod111"]
    side.assert_equal(desired_state(rows, options))


async def test_a_name_not_known_yet_is_written_as_its_id_then_renamed_in_place(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = [row(1, 1, 11, 111, set_name=None), row(2, 1, 11, 111, set_name=None)]
    await sync(api, rows, options)
    groups = side.groups()
    assert f"{options.group_prefix}/biz1/#11/mod111" in groups
    rows = [replace(r, bk_set_name="set11") for r in rows]
    summary = await sync(api, rows, options)
    assert (summary.groups_renamed, summary.groups_created) == (2, 0)
    assert side.groups()[f"{options.group_prefix}/biz1/set11"] == groups[f"{options.group_prefix}/biz1/#11"]
    side.assert_equal(desired_state(rows, options))


async def test_a_host_moved_between_modules_changes_groups_and_the_emptied_group_goes(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = [row(1, 1, 11, 111), row(2, 1, 11, 112)]
    await sync(api, rows, options)
    rows = [row(1, 1, 11, 112), row(2, 1, 11, 112)]
    summary = await sync(api, rows, options)
    assert (summary.hosts_updated, summary.groups_removed) == (1, 1)
    assert f"{options.group_prefix}/biz1/set11/mod111" not in side.groups()
    side.assert_equal(desired_state(rows, options))
    assert (await sync(api, rows, options)).write_calls == 0


@pytest.mark.parametrize("on_delete", ["delete", "disable", "move"])
async def test_a_host_cmdb_deleted_is_removed_disabled_or_moved_as_configured(
        api: ZabbixApi, side: Side, options: ZabbixOptions, on_delete: str) -> None:
    options = replace(options, on_delete=on_delete)  # type: ignore[arg-type]
    side.options = options
    rows = [row(1, 1, 11, 111), row(2, 1, 11, 111), row(3, 1, 12, 121)]
    await sync(api, rows, options)
    kept = [r for r in rows if r.bk_host_id == 1]
    summary = await sync(api, kept, options)
    assert summary.hosts_removed == 2
    side.assert_equal(desired_state(kept, options))
    hosts = side.hosts()
    prefix = options.group_prefix
    assert f"{prefix}/biz1/set12" not in side.groups()  # its module's group emptied: removed, parents too
    if on_delete == "delete":
        assert set(hosts) == {1}
    else:
        assert {i: (h["groups"], h["status"]) for i, h in hosts.items() if i != 1} == {
            i: ({options.deleted_group}, 1 if on_delete == "disable" else 0) for i in (2, 3)}
    assert (await sync(api, kept, options)).write_calls == 0

    # CMDB has it again (a restore): back in its module, enabled; _deleted goes once empty.
    summary = await sync(api, rows, options)
    side.assert_equal(desired_state(rows, options))
    assert options.deleted_group not in side.groups()
    if on_delete != "delete":
        assert summary.hosts_created == 0
        assert {h["hostid"] for h in side.hosts().values()} == {h["hostid"] for h in hosts.values()}


async def test_a_host_made_by_hand_with_the_technical_name_is_adopted_keeping_its_own_groups_and_tags(
        api: ZabbixApi, zabbix: Zabbix, side: Side, options: ZabbixOptions, unique: str) -> None:
    hand_group = zabbix.call("hostgroup.create", {"name": f"hand-{unique}"})["groupids"][0]
    try:
        hostid = zabbix.call("host.create", {
            "host": f"{options.group_prefix}-1", "groups": [{"groupid": hand_group}],
            "tags": [{"tag": "owner", "value": "ops"}],
            "interfaces": [{"type": 1, "main": 1, "useip": 1, "ip": "192.0.2.1", "dns": "", "port": "10050"}],
        })["hostids"][0]
        rows = [row(1, 1, 11, 111), row(2, 1, 11, 111)]
        summary = await sync(api, rows, options)
        assert (summary.hosts_adopted, summary.hosts_created) == (1, 1)
        side.assert_equal(desired_state(rows, options))
        host = side.hosts()[1]
        assert host["hostid"] == hostid
        assert f"hand-{unique}" in host["groups"] and ("owner", "ops") in host["tags"]
        assert (await sync(api, rows, options)).write_calls == 0
    finally:
        side.cleanup()
        zabbix.call("hostgroup.delete", [hand_group])


async def test_groups_and_hosts_outside_the_prefix_or_the_managed_tag_are_never_touched(
        api: ZabbixApi, zabbix: Zabbix, side: Side, options: ZabbixOptions) -> None:
    prefix = options.group_prefix
    await sync(api, [row(1, 1, 11, 111), row(2, 1, 11, 112)], options)
    groups = side.groups()
    # A group whose name starts like the prefix but is not under it, and a host of no rwatch in it and in a
    # managed group; another rwatch's host (other prefix) in the same technical-name space.
    outside = zabbix.call("hostgroup.create", {"name": f"{prefix}x/hand"})["groupids"][0]
    hand = zabbix.call("host.create", {
        "host": f"{prefix}x-hand", "tags": [{"tag": "owner", "value": "ops"}],
        "groups": [{"groupid": outside}, {"groupid": groups[f"{prefix}/biz1/set11/mod112"]}],
    })["hostids"][0]
    other = zabbix.call("host.create", {
        "host": f"{prefix}-2x", "groups": [{"groupid": outside}],
        "tags": [{"tag": options.managed_tag, "value": f"{prefix}x"}, {"tag": "bk_host_id", "value": "2"}],
    })["hostids"][0]
    try:
        summary = await sync(api, [row(1, 1, 11, 111)], options)
        assert summary.hosts_removed == 1 and summary.groups_removed == 0  # mod112 holds the hand host: it stays
        assert set(side.groups()) == {prefix, f"{prefix}/biz1", f"{prefix}/biz1/set11",
                                      f"{prefix}/biz1/set11/mod111", f"{prefix}/biz1/set11/mod112"}
        await sync(api, [], options)
        # mod112 stays for the hand host, and its parents with it
        assert set(side.groups()) == {prefix, f"{prefix}/biz1", f"{prefix}/biz1/set11", f"{prefix}/biz1/set11/mod112"}
        [h] = zabbix.call("host.get", {"hostids": [hand], "selectGroups": ["name"], "selectTags": ["tag", "value"],
                                       "output": ["host"]})
        assert {g["name"] for g in h["groups"]} == {f"{prefix}x/hand", f"{prefix}/biz1/set11/mod112"}
        assert h["tags"] == [{"tag": "owner", "value": "ops"}]
        assert zabbix.call("host.get", {"hostids": [other], "output": ["hostid"]}) == [{"hostid": other}]
        assert zabbix.call("hostgroup.get", {"groupids": [outside], "output": ["name"]})[0]["name"] == f"{prefix}x/hand"
    finally:
        zabbix.call("host.delete", [hand, other])
        zabbix.call("hostgroup.delete", [outside])


class Crashing(ZabbixApi):
    """The real client, made to fail (as a lost connection would) on its n-th write call, or to run a hook
    (someone else's change) before a given method."""

    def __init__(self, *args: Any, fail_at: int | None = None,
                 before: dict[str, Callable[[], None]] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fail_at, self.before = fail_at, dict(before or {})

    async def call(self, method: str, params: Any = None) -> Any:
        if hook := self.before.pop(method, None):
            hook()
        if self.fail_at is not None and not method.endswith(".get") and self.write_calls + 1 == self.fail_at:
            self.calls[method] += 1
            raise ZabbixUnavailable(f"{method}: connection lost (test)", method=method)
        return await super().call(method, params)


@pytest.mark.parametrize("fail_at", [2, 4, 5, 6, 7])
async def test_a_reconcile_cut_short_is_finished_by_the_next(
        zabbix: Zabbix, side: Side, options: ZabbixOptions, fail_at: int) -> None:
    """Cut after the first group level, mid-creation, before the hosts, mid-update, mid-removal."""
    rows = topology()
    async with ZabbixApi(zabbix.url, token=zabbix.token) as api:
        await sync(api, rows[:8], options)  # biz 1 only
    changed = [replace(r, bk_set_name="renamed") if r.bk_set_id == 11 else r for r in rows[4:]]
    async with Crashing(zabbix.url, token=zabbix.token, fail_at=fail_at) as crashing:
        with pytest.raises(ZabbixUnavailable):
            await sync(api=crashing, rows=changed, options=options)
    async with ZabbixApi(zabbix.url, token=zabbix.token) as api:
        await sync(api, changed, options)
        side.assert_equal(desired_state(changed, options))
        assert (await sync(api, changed, options)).write_calls == 0


async def test_already_exists_and_does_not_exist_from_a_concurrent_change_are_outcomes(
        zabbix: Zabbix, side: Side, options: ZabbixOptions) -> None:
    prefix = options.group_prefix
    async with ZabbixApi(zabbix.url, token=zabbix.token) as api:
        await sync(api, [row(1, 1, 11, 111), row(2, 1, 11, 111), row(3, 1, 11, 111)], options)
    hosts = side.hosts()
    rows = [row(1, 1, 11, 111), row(4, 1, 12, 121)]
    # Between its reads and its writes: someone makes one of its new groups, deletes a host it is about to delete.
    before = {
        "hostgroup.create": lambda: zabbix.call("hostgroup.create", {"name": f"{prefix}/biz1/set12"}),
        "host.delete": lambda: zabbix.call("host.delete", [hosts[2]["hostid"]]),
    }
    async with Crashing(zabbix.url, token=zabbix.token, before=before) as api:
        summary = await sync(api, rows, options)
    assert (summary.existing, summary.gone, summary.hosts_removed) == (1, 1, 1)
    side.assert_equal(desired_state(rows, options))


async def test_idle_hosts_disabled_templates_by_rule_and_a_proxy_per_control_area(
        api: ZabbixApi, zabbix: Zabbix, side: Side, options: ZabbixOptions, unique: str) -> None:
    proxy = zabbix.call("proxy.create", {"host": f"proxy-{unique}", "status": 5})["proxyids"][0]
    try:
        options = replace(options, disable_idle=True, proxies={1: f"proxy-{unique}"},
                          template_rules=(TemplateRule((TEMPLATE,), module="web*"),))
        rows = [row(1, 1, 11, 111, module_name="空闲机"), row(2, 1, 11, 112, module_name="web-a", cloud=1),
                row(3, 1, 11, 113, module_name="db")]
        await sync(api, rows, options)
        side.assert_equal(desired_state(rows, options))
        got = zabbix.call("host.get", {"output": ["host", "proxy_hostid", "status"], "selectParentTemplates": ["host"],
                                       "tags": [{"tag": "bk_host_id", "value": "2", "operator": 1},
                                                {"tag": options.managed_tag, "value": options.group_prefix,
                                                 "operator": 1}]})
        assert [(h["proxy_hostid"], [t["host"] for t in h["parentTemplates"]]) for h in got] == [(proxy, [TEMPLATE])]
        assert side.hosts()[1]["status"] == 1
        # Out of the idle module: enabled again; out of web*: the template is unlinked; to cloud 0: no proxy.
        rows = [row(1, 1, 11, 113, module_name="db"), row(2, 1, 11, 113, module_name="db"),
                row(3, 1, 11, 113, module_name="db")]
        await sync(api, rows, options)
        side.assert_equal(desired_state(rows, options))
        assert all(not h["templates"] for h in side.hosts().values())
        assert (await sync(api, rows, options)).write_calls == 0
    finally:
        side.cleanup()
        zabbix.call("proxy.delete", [proxy])


async def test_a_new_ip_and_name_update_the_host_and_its_interface_in_place(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = [row(1, 1, 11, 111), row(2, 1, 11, 111)]
    await sync(api, rows, options)
    hostid = side.hosts()[1]["hostid"]
    rows = [replace(rows[0], bk_host_innerip="192.0.2.7,192.0.2.8", bk_host_name="renamed"), rows[1]]
    summary = await sync(api, rows, options)
    assert (summary.hosts_updated, summary.hosts_created, summary.write_calls) == (1, 0, 2)
    assert side.hosts()[1]["hostid"] == hostid
    side.assert_equal(desired_state(rows, options))


async def test_a_host_the_topology_cannot_place_yet_is_held_not_removed(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = [row(1, 1, 11, 111), row(2, 1, 11, 111)]
    await sync(api, rows, options)
    before = side.hosts()[2]
    held = [rows[0], replace(rows[1], bk_set_id=None, bk_module_id=999)]  # its relation's set not known
    summary = await sync(api, held, options)
    assert (summary.hosts_held, summary.hosts_removed, summary.write_calls) == (1, 0, 0)
    assert side.hosts()[2] == before
    # a host mid-transfer (no relation row at all) held through `pending`
    summary = await reconcile(api, desired_state(rows[:1], options, pending=[2]), options)
    assert (summary.hosts_held, summary.hosts_removed, summary.write_calls) == (1, 0, 0)


async def test_a_scoped_reconcile_reads_and_writes_only_the_hosts_it_names(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = [row(1, 1, 11, 111), row(2, 1, 11, 111), row(3, 1, 11, 112)]
    await sync(api, rows, options)
    before = side.hosts()
    # Host 1 moves, host 2 is renamed, host 3 is gone: a batch that touched host 1 only reconciles host 1.
    changed = [row(1, 1, 11, 112), replace(row(2, 1, 11, 111), bk_host_name="other")]
    summary = await sync(api, changed, options, scope=[1])
    assert (summary.hosts_updated, summary.hosts_removed, summary.groups_removed) == (1, 0, 0)
    assert summary.api_calls == 2 + 1
    hosts = side.hosts()
    assert hosts[1]["groups"] == {f"{options.group_prefix}/biz1/set11/mod112"}
    assert (hosts[2], hosts[3]) == (before[2], before[3])
    summary = await sync(api, changed, options, scope=[2, 3, 4])
    assert (summary.hosts_updated, summary.hosts_removed) == (1, 1)
    side.assert_equal(desired_state(changed, options))
    assert (await sync(api, changed, options, scope=[1, 2])).write_calls == 0


async def test_a_change_one_batch_cannot_explain_is_a_transient_conflict_and_the_next_reconcile_finishes(
        zabbix: Zabbix, side: Side, options: ZabbixOptions) -> None:
    prefix = options.group_prefix
    async with ZabbixApi(zabbix.url, token=zabbix.token) as api:
        await sync(api, [row(1, 1, 11, 111), row(2, 1, 11, 111)], options)
    rows = [row(1, 1, 11, 112), row(2, 1, 11, 111)]

    def delete_the_new_group() -> None:  # someone removes the group host 1 is about to move into
        [group] = zabbix.call("hostgroup.get", {"filter": {"name": [f"{prefix}/biz1/set11/mod112"]}})
        zabbix.call("hostgroup.delete", [group["groupid"]])

    async with Crashing(zabbix.url, token=zabbix.token, before={"host.update": delete_the_new_group}) as api:
        with pytest.raises(ReconcileConflict) as caught:
            await sync(api, rows, options)
        assert isinstance(caught.value, TransientError)
        await sync(api, rows, options)
    side.assert_equal(desired_state(rows, options))


async def test_a_name_another_host_holds_is_a_conflict_that_does_not_stop_the_others(
        api: ZabbixApi, zabbix: Zabbix, side: Side, options: ZabbixOptions, unique: str) -> None:
    group = zabbix.call("hostgroup.create", {"name": f"hand-{unique}"})["groupids"][0]
    try:
        rows = [row(1, 1, 11, 111), row(2, 1, 11, 111)]
        await sync(api, rows, options)
        taken = f"web ({options.group_prefix}-1)"  # the visible name host 1 is about to get, held by hand
        hand = zabbix.call("host.create", {"host": f"hand-{unique}", "name": taken,
                                           "groups": [{"groupid": group}]})["hostids"][0]
        renamed = [replace(rows[0], bk_host_name="web"), replace(rows[1], bk_host_name="db")]
        summary = await sync(api, renamed, options)
        assert (summary.conflicts, summary.hosts_updated) == (1, 1)
        assert side.hosts()[2]["name"] == f"db ({options.group_prefix}-2)"
        zabbix.call("host.delete", [hand])
        await sync(api, renamed, options)
        side.assert_equal(desired_state(renamed, options))
    finally:
        side.cleanup()
        if left := zabbix.call("host.get", {"groupids": [group], "output": ["hostid"]}):
            zabbix.call("host.delete", [h["hostid"] for h in left])
        zabbix.call("hostgroup.delete", [group])


async def test_two_modules_swapping_names_end_equal_without_an_error(
        api: ZabbixApi, side: Side, options: ZabbixOptions) -> None:
    rows = [row(1, 1, 11, 111, module_name="a"), row(2, 1, 11, 112, module_name="b")]
    await sync(api, rows, options)
    swapped = [replace(rows[0], bk_module_name="b"), replace(rows[1], bk_module_name="a")]
    summary = await sync(api, swapped, options)  # both names exist: the hosts change groups, none is renamed
    assert (summary.groups_renamed, summary.groups_created, summary.groups_removed) == (0, 0, 0)
    side.assert_equal(desired_state(swapped, options))
    assert (await sync(api, swapped, options)).write_calls == 0
