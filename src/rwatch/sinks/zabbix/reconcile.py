"""Make the managed part of a Zabbix equal to a desired state, in the fewest API calls; a summary of what it did.

One reconcile reads the managed part (``rwatch.sinks.zabbix.current``: three calls, plus one each for templates and
proxies when the options name some), diffs, then writes with arrays, never one call per object:

1. ``hostgroup.update`` renames the groups of renamed bizs, sets and modules, every group below included (one
   call), so permissions and actions set on a group survive a rename;
2. ``hostgroup.create`` makes the missing groups, one call per level, parents first, so that a new group inherits
   its parent's permissions as Zabbix does for nested groups;
3. ``host.create`` / ``host.update`` / ``hostinterface.update`` / ``hostinterface.create``, arrays of up to
   ``CHUNK`` hosts: names, tags, groups, status, templates, proxy, the agent interface;
4. hosts CMDB no longer has, per ``on_delete``: ``host.delete``; or ``host.massadd`` to ``<prefix>/_deleted`` and
   ``host.massremove`` from the managed groups (``move``), with ``host.massupdate`` to disabled (``disable``).
   Given ``proven`` (the sink always gives it), only the hosts CMDB is proved to have deleted; the mass-delete
   guard stands before the mirror (a sweep past the share never becomes a tombstone), not here;
5. ``hostgroup.delete`` of the managed groups nothing is in any more.

What is not rwatch's is never written: groups outside the prefix, hosts without the managed tag (except a host of
the same technical name, adopted: tagged and then managed), a managed host's groups outside the prefix and tags
rwatch does not own. "Already exists" and "does not exist" are outcomes (``rwatch.sinks.zabbix.writes``). Every
step is idempotent and each reads nothing it wrote, so a reconcile cut short (a crash, a transient error) is
finished by the next one, and a reconcile of an unchanged topology makes no write call.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from rwatch.logs import get_logger
from rwatch.sinks.zabbix.api import ZabbixApi, ZabbixApiError
from rwatch.sinks.zabbix.current import AGENT, CurrentHost, CurrentState, depth, group_votes, read_current
from rwatch.sinks.zabbix.desired import DISABLED_TAG, DesiredHost, DesiredState, GroupKey, ZabbixOptions
from rwatch.sinks.zabbix.writes import Outcomes, create_groups, create_hosts, delete, mass, update

SCOPE_MAX = 500  # bk_host_id tags OR-ed in one host.get; past this, reading every managed host is as quick

log = get_logger("rwatch.sinks.zabbix")


@dataclass
class Summary:
    """What one reconcile did; ``api_calls`` counts reads and writes, ``write_calls`` writes alone."""

    groups_created: int = 0
    groups_renamed: int = 0
    groups_removed: int = 0
    hosts_created: int = 0
    hosts_updated: int = 0  # managed hosts changed (names, tags, groups, status, templates, proxy, interface)
    hosts_adopted: int = 0
    hosts_removed: int = 0  # deleted, disabled or moved to <prefix>/_deleted, per on_delete
    hosts_held: int = 0  # desired.held: not placeable yet, left as they are
    hosts_unproven: int = 0  # not desired, but CMDB's delete is not proved (no tombstone): left as they are
    existing: int = 0  # found already made (a concurrent change, a retry after a crash)
    gone: int = 0  # found already gone
    conflicts: int = 0  # a name another host holds
    api_calls: int = 0
    write_calls: int = 0
    seconds: float = 0.0


async def reconcile(api: ZabbixApi, desired: DesiredState, options: ZabbixOptions, *,
                    scope: Collection[int] | None = None, proven: Collection[int] | None = None) -> Summary:
    """Write to Zabbix whatever keeps its managed part from equalling ``desired``.

    ``scope``: the bk_host_ids whose hosts to reconcile (those a batch touched), the others neither read nor
    written nor removed; every desired group is still made, and a group is removed only when no host at all is
    left in it. A renamed biz, set or module must bring every host below it into the scope: their tags are what
    finds its group to rename. Past ``SCOPE_MAX`` ids a full reconcile is as quick.

    ``proven``: the bk_host_ids CMDB is proved to have deleted (the mirror's tombstones). When given, a managed
    host that is neither desired nor proven deleted is left as it is (``hosts_unproven``): a mirror that lost its
    rows (a new file, a restore) must not empty Zabbix."""
    started, calls, writes = time.monotonic(), api.total_calls, api.write_calls
    out, summary = Outcomes(), Summary(hosts_held=len(desired.held))
    if scope is not None and len(scope) > SCOPE_MAX:
        scope = None
    if scope is not None:
        desired = replace(desired, hosts={i: desired.hosts[i] for i in scope if i in desired.hosts})
    current = await read_current(api, options, desired, scope)
    templates = await _ids(api, "template", "host", {t for r in options.template_rules for t in r.templates})
    proxies = await _ids(api, "proxy", api.api_version.proxy_name_key, set(options.proxies.values()))

    # Groups: bind each desired group to a current one (same name, else the one its hosts say was its), rename.
    bound, renames = _bind_groups(current, desired, options.group_prefix)
    if renames:
        summary.groups_renamed = await update(api, "hostgroup.update", renames, out)
        for item in renames:
            current.groups[item["groupid"]] = item["name"]

    # Hosts: pick the Zabbix host of each desired one; the managed ones left over are CMDB's deletes.
    chosen, orphans = _match_hosts(current, desired)
    if proven is not None:
        # (A second managed copy of a desired host is proof enough: the desired one stays.)
        unproven = [h for h in orphans if h.bk_host_id not in proven and h.bk_host_id not in desired.hosts]
        if unproven:
            summary.hosts_unproven = len(unproven)
            log.warning("zabbix_removal_unproven", hosts=len(unproven), sample=[h.host for h in unproven[:10]],
                        prefix=options.group_prefix)
            orphans = [h for h in orphans if h not in unproven]
    deleted_gid = current.group_ids().get(options.deleted_group)
    act = [h for h in orphans if options.on_delete == "delete" or h.groups & set(current.groups) != {deleted_gid}
           or (options.on_delete == "disable" and h.status != 1)]

    missing = [name for key, name in desired.groups.items() if key not in bound]
    if act and options.on_delete != "delete" and deleted_gid is None:
        missing.append(options.deleted_group)
    for level in sorted({depth(n, options.group_prefix) for n in missing}):
        names = sorted(n for n in missing if depth(n, options.group_prefix) == level)
        made = await create_groups(api, names, out)
        summary.groups_created += len(made)
        current.groups.update({gid: name for name, gid in made.items()})
    gids = current.group_ids()
    deleted_gid = gids.get(options.deleted_group)

    plan = _HostPlan(api, options, current, gids, templates, proxies, deleted_gid)
    for bk_host_id, d in desired.hosts.items():
        host = chosen.get(bk_host_id)
        if host is None:
            plan.create(d)
        else:
            summary.hosts_adopted += host.hostid not in current.hosts
            plan.change(d, host)
    made = await create_hosts(api, plan.creates, out)
    summary.hosts_created = len(made)
    dropped = len(plan.updates) - await update(api, "host.update", plan.updates, out)  # gone, or a name taken
    await update(api, "hostinterface.update", plan.iface_updates, out)
    await update(api, "hostinterface.create", plan.iface_creates, out)
    summary.hosts_updated = plan.changed - summary.hosts_adopted - dropped

    summary.hosts_removed = await _remove(api, act, options, current, deleted_gid, out)
    for host in act:
        plan.final[host.hostid] = (
            frozenset() if options.on_delete == "delete"
            else (host.groups - set(current.groups)) | {deleted_gid or ""}
        )
    keep = {gids[name] for name in desired.groups.values()}
    summary.groups_removed = await _remove_groups(api, current, plan.final, keep, out)

    summary.existing, summary.gone, summary.conflicts = out.existing, out.gone, len(out.conflicts)
    summary.api_calls, summary.write_calls = api.total_calls - calls, api.write_calls - writes
    summary.seconds = round(time.monotonic() - started, 3)
    # One line per reconcile that wrote; a reconcile that found nothing to do is the steady state, not news.
    (log.info if summary.write_calls else log.debug)("zabbix_reconciled", prefix=options.group_prefix,
                                                     **asdict(summary))
    return summary


async def _ids(api: ZabbixApi, kind: str, name_field: str, names: set[str]) -> dict[str, str]:
    """Template or proxy ids by name (no call when none is named); one the options name but Zabbix lacks fails."""
    if not names:
        return {}
    found = await api.call(f"{kind}.get", {"output": [f"{kind}id", name_field], "filter": {name_field: sorted(names)}})
    ids = {f[name_field]: f[f"{kind}id"] for f in found}
    if unknown := sorted(names - set(ids)):
        raise ZabbixApiError(f"{kind}.get", 0, f"no {kind} of these names", ", ".join(unknown))
    return ids


def _bind_groups(current: CurrentState, desired: DesiredState,
                 prefix: str) -> tuple[dict[GroupKey, str], list[dict[str, str]]]:
    """Each desired group's current id where it has one, and the renames that give some theirs."""
    by_name = current.group_ids()
    wanted = set(desired.groups.values())
    bound = {key: by_name[name] for key, name in desired.groups.items() if name in by_name}
    used, renames = set(bound.values()), []
    votes = group_votes(current, prefix)
    for key in sorted(set(desired.groups) - set(bound), key=len):
        for gid, _ in votes.get(key, Counter()).most_common():
            if gid not in used and current.groups[gid] not in wanted:
                bound[key] = gid
                used.add(gid)
                renames.append({"groupid": gid, "name": desired.groups[key]})
                break
    return bound, renames


def _match_hosts(current: CurrentState, desired: DesiredState) -> tuple[dict[int, CurrentHost], list[CurrentHost]]:
    """The Zabbix host of each desired host (managed, else adoptable) and the managed hosts CMDB no longer has."""
    chosen: dict[int, CurrentHost] = {}
    orphans: list[CurrentHost] = []
    for host in sorted(current.hosts.values(), key=lambda h: int(h.hostid)):
        d = desired.hosts.get(host.bk_host_id) if host.bk_host_id is not None else None
        if host.bk_host_id in desired.held:
            continue
        if d is None:
            orphans.append(host)
        elif (first := chosen.get(d.bk_host_id)) is None or (host.host == d.host != first.host):
            if first is not None:
                orphans.append(first)  # a copy made by hand: the one named as desired stays
            chosen[d.bk_host_id] = host
        else:
            orphans.append(host)
    for bk_host_id, d in desired.hosts.items():
        if bk_host_id not in chosen and d.host in current.adoptable:
            chosen[bk_host_id] = current.adoptable[d.host]
    return chosen, orphans


class _HostPlan:
    """The host writes a reconcile makes, and every managed host's groups once they are made."""

    def __init__(self, api: ZabbixApi, options: ZabbixOptions, current: CurrentState, gids: dict[str, str],
                 templates: dict[str, str], proxies: dict[str, str], deleted_gid: str | None) -> None:
        self.api, self.options, self.gids = api, options, gids
        self.managed = set(current.groups)
        self.rule_templates = set(templates.values())
        self.templates, self.proxies, self.deleted_gid = templates, proxies, deleted_gid
        self.creates: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.iface_updates: list[dict[str, Any]] = []
        self.iface_creates: list[dict[str, Any]] = []
        self.final: dict[str, frozenset[str]] = {h.hostid: h.groups for h in current.hosts.values()}
        self.changed = 0  # hosts with any write (adopted ones included)

    def _proxy(self, d: DesiredHost) -> str:
        return self.proxies[d.proxy] if d.proxy else "0"

    def create(self, d: DesiredHost) -> None:
        spec: dict[str, Any] = {
            "host": d.host, "name": d.name, "groups": [{"groupid": self.gids[g]} for g in sorted(d.groups)],
            "tags": _tags(d.tags), "status": 1 if d.disabled else 0,
        }
        if d.ip:
            spec["interfaces"] = [{"type": AGENT, "main": 1, "useip": 1, "ip": d.ip, "dns": "",
                                   "port": str(self.options.agent_port)}]
        if d.templates:
            spec["templates"] = [{"templateid": self.templates[t]} for t in sorted(d.templates)]
        if self.options.proxies:
            spec.update(self.api.proxy_fields(self._proxy(d)))
        self.creates.append(spec)

    def change(self, d: DesiredHost, host: CurrentHost) -> None:
        diff: dict[str, Any] = {}
        if host.host != d.host:
            diff["host"] = d.host
        if host.name != d.name:
            diff["name"] = d.name
        groups = (host.groups - self.managed) | {self.gids[g] for g in d.groups}
        self.final[host.hostid] = frozenset(groups)
        if groups != host.groups:
            diff["groups"] = [{"groupid": g} for g in sorted(groups)]
        tags = {t for t in host.tags if not self.options.owns_tag(t[0])} | d.tags
        if tags != host.tags:
            diff["tags"] = _tags(tags)
        # Re-enabled only when rwatch disabled it (idle, or deleted then back): an operator's disable stays.
        by_rwatch = bool(host.tag_values(DISABLED_TAG)) or self.deleted_gid in host.groups
        status = 1 if d.disabled else 0 if by_rwatch else host.status
        if status != host.status:
            diff["status"] = status
        if self.options.template_rules:
            linked = (host.templates - self.rule_templates) | {self.templates[t] for t in d.templates}
            if linked != host.templates:
                diff["templates"] = [{"templateid": t} for t in sorted(linked)]
        if self.options.proxies and host.proxy != self._proxy(d):
            diff.update(self.api.proxy_fields(self._proxy(d)))
        if diff:
            self.updates.append({"hostid": host.hostid, **diff})
        if d.ip and host.agent is None:
            self.iface_creates.append({"hostid": host.hostid, "type": AGENT, "main": 1, "useip": 1, "ip": d.ip,
                                       "dns": "", "port": str(self.options.agent_port)})
        elif d.ip and host.agent is not None and host.agent["ip"] != d.ip:
            self.iface_updates.append({"interfaceid": host.agent["interfaceid"], "ip": d.ip})
        elif not diff:
            return
        self.changed += 1


def _tags(tags: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"tag": tag, "value": value} for tag, value in sorted(tags)]


async def _remove(api: ZabbixApi, hosts: list[CurrentHost], options: ZabbixOptions, current: CurrentState,
                  deleted_gid: str | None, out: Outcomes) -> int:
    """Apply on_delete to these managed hosts: delete them, or move them to ``<prefix>/_deleted`` (and disable)."""
    if not hosts:
        return 0
    if options.on_delete == "delete":
        return await delete(api, "host.delete", [h.hostid for h in hosts], out)
    assert deleted_gid is not None  # created above when any host is to move
    into = [h.hostid for h in hosts if deleted_gid not in h.groups]
    if into:
        await mass(api, "host.massadd", into, {"groups": [{"groupid": deleted_gid}]}, out)
    leaving = sorted({g for h in hosts for g in h.groups if g in current.groups and g != deleted_gid})
    if leaving:
        await mass(api, "host.massremove", [h.hostid for h in hosts if h.groups & set(leaving)],
                   {"groupids": leaving}, out)
    if options.on_delete == "disable" and (enabled := [h.hostid for h in hosts if h.status != 1]):
        await mass(api, "host.massupdate", enabled, {"status": 1}, out)
    return len(hosts)


async def _remove_groups(api: ZabbixApi, current: CurrentState, final: dict[str, frozenset[str]],
                         keep: set[str], out: Outcomes) -> int:
    """Delete the managed groups no host is in any more and no desired group is bound to, but never the parent of
    one that stays, so that it keeps its place in the tree (and the permissions it inherits)."""
    occupied = {g for groups in final.values() for g in groups}
    # The hosts of ``final`` as they were read; any other host in a group (one rwatch does not manage, or a managed
    # one outside the scope) keeps it.
    read = {h.hostid: h.groups for h in (*current.hosts.values(), *current.adoptable.values())}
    ours = Counter(g for hostid in final if hostid in read for g in read[hostid])
    occupied |= {gid for gid, size in current.sizes.items() if size > ours[gid]}
    empty = sorted((g for g in current.groups if g not in keep and g not in occupied), key=int)
    # The parents of a group that stays (<prefix>/_deleted, a group a held or hand-made host keeps) stay too.
    staying = [current.groups[g] for g in current.groups if g not in empty]
    parents = {name.rsplit("/", n)[0] for name in staying for n in range(1, name.count("/") + 1)}
    empty = [g for g in empty if current.groups[g] not in parents]
    if not empty:
        return 0
    try:
        return await delete(api, "hostgroup.delete", empty, out)
    except ZabbixApiError:  # one is held by something else (a maintenance, a discovery rule): the others still go
        removed = 0
        for gid in empty:
            try:
                removed += await delete(api, "hostgroup.delete", [gid], out)
            except ZabbixApiError as exc:
                log.warning("zabbix_group_kept", group=current.groups[gid], **exc.fields())
        return removed
