"""The managed part of a Zabbix, read in a few calls: its groups under the prefix, its managed hosts, adoptees.

Three reads whatever the size, the first two side by side: ``hostgroup.get`` of the prefix and every group below
it (with how many hosts each holds, so that a group holding a host rwatch does not manage is never removed; a
count, since the ids of every host would make each scoped reconcile's first read grow with the whole Zabbix),
``host.get`` of the hosts carrying the managed tag (``<managed_tag>=<prefix>``) with their groups, tags,
interfaces (and templates when rules link some), and, only when some desired host has no managed host yet,
``host.get`` of the hosts with those technical names: hosts made by hand before rwatch, adopted rather than
refused as duplicates (a host managed under another prefix is not).

Zabbix 6.0 gives groups no tags, so a group's CMDB identity is read from its hosts: a managed host in one module
(one ``bk_module_id`` tag, which with ``bk_set_id`` and ``bk_biz_id`` names the module) and in one module-level
group votes for that group as the module's, and for its parent and grandparent as the set's and the biz's. A
renamed biz, set or module then finds its group by the votes and renames it, instead of making a new one.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from rwatch.sinks.zabbix.api import ZabbixApi
from rwatch.sinks.zabbix.desired import DesiredState, GroupKey, Tag, ZabbixOptions

AGENT = 1  # interface type


@dataclass
class CurrentHost:
    """A host as Zabbix holds it (the fields the reconcile compares)."""

    hostid: str
    host: str
    name: str
    status: int
    proxy: str  # proxy id, "0" for none
    groups: frozenset[str]  # group ids
    tags: frozenset[Tag]
    agent: dict[str, Any] | None  # the main agent interface
    templates: frozenset[str]  # linked template ids

    def tag_values(self, name: str) -> list[str]:
        return [value for tag, value in self.tags if tag == name]

    @property
    def bk_host_id(self) -> int | None:
        values = self.tag_values("bk_host_id")
        return int(values[0]) if len(values) == 1 and values[0].isdigit() else None


@dataclass
class CurrentState:
    """The managed groups (id -> name), how many hosts each holds, the managed hosts by hostid, adoptable hosts."""

    groups: dict[str, str]
    sizes: dict[str, int]  # group id -> how many hosts are in it, managed or not
    hosts: dict[str, CurrentHost]
    adoptable: dict[str, CurrentHost] = field(default_factory=dict)  # technical name -> a host made by hand

    def group_ids(self) -> dict[str, str]:
        return {name: groupid for groupid, name in self.groups.items()}


def depth(name: str, prefix: str) -> int:
    """0 for the prefix's group, 1 for a biz's, 2 for a set's, 3 for a module's (and for ``_deleted``: 1)."""
    return 0 if name == prefix else name[len(prefix) + 1:].count("/") + 1


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "/")


async def read_current(api: ZabbixApi, options: ZabbixOptions, desired: DesiredState,
                       scope: Collection[int] | None = None) -> CurrentState:
    """The managed part; with a ``scope`` (bk_host_ids), only the managed hosts of those ids (and every group)."""
    prefix = options.group_prefix
    # The groups and the hosts, side by side: neither read depends on the other, and each costs Zabbix tens of ms.
    found, raw_hosts = await asyncio.gather(api.call("hostgroup.get", {
        "output": ["groupid", "name"], "search": {"name": prefix}, "startSearch": True,
        "selectHosts": "count",
    }), _read_hosts(api, options, scope))
    groups = {g["groupid"]: g["name"] for g in found if under(g["name"], prefix)}
    sizes = {g["groupid"]: int(g.get("hosts") or 0) for g in found if g["groupid"] in groups}
    hosts = [h for h in (_host(api, raw) for raw in raw_hosts) if options.managed in h.tags]
    current = CurrentState(groups, sizes, {h.hostid: h for h in hosts})
    have = {h.bk_host_id for h in hosts}
    missing = sorted(d.host for i, d in desired.hosts.items() if i not in have)
    if missing:
        for raw in await api.call("host.get", {**_host_query(api, options), "filter": {"host": missing}}):
            host = _host(api, raw)
            if not host.tag_values(options.managed_tag):  # a host of another prefix's rwatch is not ours to take
                current.adoptable[host.host] = host
    return current


async def _read_hosts(api: ZabbixApi, options: ZabbixOptions, scope: Collection[int] | None) -> list[Any]:
    """The managed hosts, or those of the scope's bk_host_ids (the caller keeps the managed ones)."""
    if scope is None:
        tag, value = options.managed
        which: dict[str, Any] = {"tags": [{"tag": tag, "value": value, "operator": 1}]}
    elif not scope:
        return []
    else:  # tags OR-ed ("evaltype": 2): the managed tag is checked by the caller
        which = {"evaltype": 2, "tags": [{"tag": "bk_host_id", "value": str(i), "operator": 1} for i in sorted(scope)]}
    found: list[Any] = await api.call("host.get", {**_host_query(api, options), **which})
    return found


def _host_query(api: ZabbixApi, options: ZabbixOptions) -> dict[str, Any]:
    query: dict[str, Any] = {
        "output": api.host_output(), **api.select_groups(["groupid"]), "selectTags": ["tag", "value"],
        "selectInterfaces": ["interfaceid", "ip", "type", "main", "port"],
    }
    if options.template_rules:
        query["selectParentTemplates"] = ["templateid"]
    return query


def _host(api: ZabbixApi, raw: dict[str, Any]) -> CurrentHost:
    agents = [i for i in raw.get("interfaces") or [] if int(i["type"]) == AGENT]
    main = next((i for i in agents if int(i["main"]) == 1), agents[0] if agents else None)
    return CurrentHost(
        hostid=raw["hostid"], host=raw["host"], name=raw["name"], status=int(raw["status"]),
        proxy=api.proxy_of(raw),
        groups=frozenset(g["groupid"] for g in api.groups_of(raw)),
        tags=frozenset((t["tag"], t["value"]) for t in raw.get("tags") or []),
        agent=main,
        templates=frozenset(t["templateid"] for t in raw.get("parentTemplates") or []),
    )


def group_votes(current: CurrentState, prefix: str) -> dict[GroupKey, Counter[str]]:
    """Which current group each CMDB biz, set and module had, as the managed hosts' tags and groups tell."""
    by_name = current.group_ids()
    votes: dict[GroupKey, Counter[str]] = defaultdict(Counter)
    for host in current.hosts.values():
        ids = [host.tag_values(t) for t in ("bk_biz_id", "bk_set_id", "bk_module_id")]
        if any(len(v) != 1 or not v[0].isdigit() for v in ids):
            continue  # in several modules (or none): which group is which module's is ambiguous
        key = tuple(int(v[0]) for v in ids)
        modules = [g for g in host.groups if g in current.groups and depth(current.groups[g], prefix) == 3]
        if len(modules) != 1:
            continue
        name = current.groups[modules[0]]
        votes[key][modules[0]] += 1
        for level in (2, 1):
            name = name.rsplit("/", 1)[0]
            if name in by_name:
                votes[key[:level]][by_name[name]] += 1
    return votes
