"""The tests' own view of the managed part of the real Zabbix: what a reconcile left there, checked and cleaned up."""

from __future__ import annotations

from typing import Any

from rwatch.sinks.zabbix.desired import DesiredState, ZabbixOptions
from tests.downstream.instances import Zabbix


class Side:
    """The test's own view of Zabbix (the fixture's synchronous client): what the reconcile left there."""

    def __init__(self, zabbix: Zabbix, options: ZabbixOptions) -> None:
        self.zabbix, self.options = zabbix, options

    def groups(self) -> dict[str, str]:
        """Group name -> id, under the prefix."""
        prefix = self.options.group_prefix
        found = self.zabbix.call("hostgroup.get", {"output": ["name"], "search": {"name": prefix},
                                                   "startSearch": True})
        return {g["name"]: g["groupid"] for g in found if g["name"] == prefix or g["name"].startswith(prefix + "/")}

    def hosts(self) -> dict[int, dict[str, Any]]:
        """bk_host_id -> the managed host (groups by name, tags as pairs, the agent interface's IP)."""
        tag, value = self.options.managed
        found = self.zabbix.call("host.get", {
            "output": ["hostid", "host", "name", "status"], "selectGroups": ["name"], "selectTags": ["tag", "value"],
            "selectInterfaces": ["ip", "type"], "selectParentTemplates": ["host"],
            "tags": [{"tag": tag, "value": value, "operator": 1}],
        })
        hosts = {}
        for h in found:
            if not h["tags"]:  # found by its managed tag, deleted before host.get read its tags (a sink at work)
                continue
            tags = {(t["tag"], t["value"]) for t in h["tags"]}
            [bk_host_id] = [int(v) for t, v in tags if t == "bk_host_id"]
            assert bk_host_id not in hosts, f"two Zabbix hosts for bk_host_id {bk_host_id}"
            hosts[bk_host_id] = {
                "hostid": h["hostid"], "host": h["host"], "name": h["name"], "status": int(h["status"]),
                "groups": {g["name"] for g in h["groups"]}, "tags": tags,
                "ips": [i["ip"] for i in h["interfaces"] if i["type"] == "1"],
                "templates": {t["host"] for t in h["parentTemplates"]},
            }
        return hosts

    def assert_equal(self, desired: DesiredState) -> None:
        """Zabbix's managed part is exactly ``desired``: its groups (parents and no others) and hosts."""
        groups = set(self.groups())
        assert groups - {self.options.deleted_group} == set(desired.groups.values())
        hosts = self.hosts()
        live = {i: h for i, h in hosts.items() if self.options.deleted_group not in h["groups"]}
        assert set(live) == set(desired.hosts)
        for i, d in desired.hosts.items():
            h = live[i]
            assert (h["host"], h["name"]) == (d.host, d.name)
            assert {g for g in h["groups"] if g.startswith(self.options.group_prefix)} == d.groups
            assert {t for t in h["tags"] if self.options.owns_tag(t[0])} == d.tags
            assert h["ips"] == ([d.ip] if d.ip else [])
            assert h["status"] == (1 if d.disabled else 0)

    def cleanup(self) -> None:
        tag, value = self.options.managed
        hosts = self.zabbix.call("host.get", {"output": ["hostid"], "tags": [{"tag": tag, "value": value,
                                                                               "operator": 1}]})
        hosts += self.zabbix.call("host.get", {"output": ["hostid"], "search": {"host": self.options.group_prefix},
                                               "startSearch": True})
        if hosts:
            self.zabbix.call("host.delete", sorted({h["hostid"] for h in hosts}))
        found = self.zabbix.call("hostgroup.get", {"output": ["name"], "search": {"name": self.options.group_prefix},
                                                   "startSearch": True})
        if found:
            self.zabbix.call("hostgroup.delete", [g["groupid"] for g in found])
