"""The Zabbix state a mirror's topology calls for: a pure function of the topology rows and the sink's options.

Groups: ``<prefix>/<biz>/<set>/<module>`` for every module that holds a host, with every parent (``<prefix>``,
``<prefix>/<biz>``, ``<prefix>/<biz>/<set>``), each keyed by its CMDB identity (``()``, ``(biz,)``,
``(biz, set)``, ``(biz, set, module)``) so that a rename is seen as one group changing its name. A ``/`` inside a
CMDB name becomes ``／`` (U+FF0F), since Zabbix reads ``/`` as nesting.

Hosts: one per CMDB host, its technical and visible names from the options' templates (defaults unique by
``bk_host_id``, so two control areas reusing an IP never collide), tags ``bk_host_id``, the managed tag
(``<managed_tag>=<prefix>``, so two rwatch instances with different prefixes never touch each other's hosts),
``bk_cloud_id`` and ``bk_biz[_id]`` / ``bk_set[_id]`` / ``bk_module[_id]`` per module (a host in two modules has
two of each), an agent interface on its first inner IP, exactly the groups of its modules, the templates its
rules pick, the proxy of its control area, and ``disabled`` when every module it is in is an idle / fault /
recycle module and the options ask for that.

Names not known yet: CMDB gives no order across resources, so a relation can reach the mirror before its biz,
set or module, whose name is then None. The host is not held back for that (monitoring starts at once): the
missing name is written ``#<id>`` (``BK/#3/web/nginx``) and, since groups are keyed by id, the name's arrival
renames that group in place. Only a relation without a biz or set id (which CMDB always records) cannot be placed;
a host with no placeable module is ``held``: the reconcile neither creates, changes nor deletes it.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from rwatch.config.sinks import check_zabbix_names
from rwatch.sinks.base import TopologyRow, first_ip

OnDelete = Literal["delete", "disable", "move"]
ON_DELETE: tuple[OnDelete, ...] = ("delete", "disable", "move")
# CMDB's default modules of a business: the idle, fault and recycle pools (their names as CMDB creates them).
IDLE_MODULES = frozenset({"空闲机", "故障机", "待回收"})
# CMDB's bk_os_type codes, so that a rule may say "linux" rather than "1".
OS_TYPES = {"1": "linux", "2": "windows", "3": "aix", "4": "unix", "5": "solaris", "6": "freebsd"}
MAX_NAME = 128  # Zabbix's limit for both names
DISABLED_TAG = "rwatch_disabled"  # on a host rwatch disabled (value: why), so that only rwatch re-enables it
# Tags rwatch owns on a managed host (besides the managed tag); a host's other tags are the operator's and stay.
OWN_TAGS = frozenset({"bk_host_id", "bk_cloud_id", "bk_biz_id", "bk_biz", "bk_set_id", "bk_set", "bk_module_id",
                      "bk_module", DISABLED_TAG})
DELETED = "_deleted"  # <prefix>/_deleted, where on_delete = "move" / "disable" puts hosts CMDB deleted
_TECHNICAL_BAD = re.compile(r"[^0-9A-Za-z_. -]")

GroupKey = tuple[int, ...]
Tag = tuple[str, str]


@dataclass(frozen=True, slots=True)
class TemplateRule:
    """Link ``templates`` (Zabbix template names) to the hosts matching every pattern given (shell-style, case
    insensitive): ``module`` on a module's name, ``os_type`` on the OS type (``linux``, ``windows``, or CMDB's
    code). A rule with no pattern matches every host. ``os_type`` matches only when the topology carries it."""

    templates: tuple[str, ...]
    module: str | None = None
    os_type: str | None = None

    def matches(self, module_names: Iterable[str | None], os_type: str | None) -> bool:
        if self.module is not None and not any(
                name is not None and fnmatch.fnmatch(name.lower(), self.module.lower()) for name in module_names):
            return False
        if self.os_type is not None:
            kinds = {os_type, OS_TYPES.get(os_type or "")} - {None}
            return any(fnmatch.fnmatch(str(k).lower(), self.os_type.lower()) for k in kinds)
        return True


@dataclass(frozen=True)
class ZabbixOptions:
    """What the zabbix sink makes of the topology (its config's fields, once the sink is wired)."""

    group_prefix: str = "BK"
    # str.format templates over config.sinks.ZABBIX_NAME_FIELDS (``ip``: the first inner IP; ``label``: the host
    # name, else the IP).
    visible_name: str = "{label} (bk-{bk_host_id})"
    technical_name: str = "bk-{bk_host_id}"
    template_rules: tuple[TemplateRule, ...] = ()
    # bk_cloud_id -> proxy name. Empty: proxies are left as they are; else every managed host gets its control
    # area's proxy, or none (monitored by the server) when its area has none.
    proxies: Mapping[int, str] = field(default_factory=dict)
    disable_idle: bool = False
    idle_modules: frozenset[str] = IDLE_MODULES
    on_delete: OnDelete = "disable"
    agent_port: int = 10050
    managed_tag: str = "rwatch"  # its value is group_prefix

    def __post_init__(self) -> None:
        check_zabbix_names(self.group_prefix, visible_name=self.visible_name, technical_name=self.technical_name)
        if self.on_delete not in ON_DELETE:
            raise ValueError(f"on_delete {self.on_delete!r}: one of {', '.join(ON_DELETE)}")

    @property
    def deleted_group(self) -> str:
        return f"{self.group_prefix}/{DELETED}"

    @property
    def managed(self) -> Tag:
        return (self.managed_tag, self.group_prefix)

    def owns_tag(self, name: str) -> bool:
        return name in OWN_TAGS or name == self.managed_tag


@dataclass(frozen=True, slots=True)
class DesiredHost:
    """One CMDB host as Zabbix should hold it."""

    bk_host_id: int
    host: str  # technical name
    name: str  # visible name
    ip: str | None  # of the agent interface; None: CMDB has no IP for it (yet), no interface is asked for
    groups: frozenset[str]
    tags: frozenset[Tag]
    templates: frozenset[str]
    proxy: str | None  # a proxy name; None: monitored by the server (only meaningful when options.proxies)
    disabled: bool  # every module it is in is an idle / fault / recycle one, and options.disable_idle


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Every managed group by its CMDB identity (parents included), every host by bk_host_id, and the hosts held."""

    groups: Mapping[GroupKey, str]
    hosts: Mapping[int, DesiredHost]
    held: frozenset[int] = frozenset()


def segment(name: str | None, ident: int) -> str:
    """One level of a group name: the CMDB name with ``/`` made harmless, or ``#<id>`` while it is unknown."""
    text = (name or "").strip().replace("/", "／")
    return text or f"#{ident}"


def desired_state(rows: Iterable[TopologyRow], options: ZabbixOptions, pending: Iterable[int] = (),
                  os_types: Mapping[int, str | None] | None = None) -> DesiredState:
    """The groups and hosts Zabbix should hold for these rows (one tenant's topology, as the mirror gives it).

    ``pending``: ids of hosts known to exist that the rows do not place (a host between the delete and the create
    of its relations, mid-transfer): held, so that a reconcile does not take them for deleted ones. ``os_types``:
    each host's ``bk_os_type``, for template rules on it."""
    prefix = options.group_prefix
    groups: dict[GroupKey, str] = {}
    by_host: dict[int, list[TopologyRow]] = defaultdict(list)
    placed: dict[int, list[tuple[GroupKey, str, str, str]]] = defaultdict(list)
    for row in rows:
        by_host[row.bk_host_id].append(row)
        if row.bk_biz_id is None or row.bk_set_id is None:
            continue
        biz = segment(row.bk_biz_name, row.bk_biz_id)
        set_ = segment(row.bk_set_name, row.bk_set_id)
        module = segment(row.bk_module_name, row.bk_module_id)
        key = (row.bk_biz_id, row.bk_set_id, row.bk_module_id)
        groups[()] = prefix
        groups[key[:1]] = f"{prefix}/{biz}"
        groups[key[:2]] = f"{prefix}/{biz}/{set_}"
        groups[key] = f"{prefix}/{biz}/{set_}/{module}"
        placed[row.bk_host_id].append((key, biz, set_, module))

    hosts: dict[int, DesiredHost] = {}
    taken_host: set[str] = set()
    taken_name: set[str] = set()
    for host_id in sorted(by_host):
        if host_id not in placed:
            continue
        hosts[host_id] = _host(host_id, by_host[host_id], placed[host_id], groups, options, taken_host, taken_name,
                               (os_types or {}).get(host_id))
    return DesiredState(groups, hosts, (frozenset(by_host) | frozenset(pending)) - frozenset(placed))


def _host(host_id: int, rows: list[TopologyRow], placed: list[tuple[GroupKey, str, str, str]],
          groups: Mapping[GroupKey, str], options: ZabbixOptions, taken_host: set[str],
          taken_name: set[str], os_type: str | None) -> DesiredHost:
    row = rows[0]  # host columns are the same on every row of a host
    ip = first_ip(row.bk_host_innerip)
    values: dict[str, Any] = {
        "bk_host_id": host_id, "bk_host_name": row.bk_host_name or "", "bk_host_innerip": row.bk_host_innerip or "",
        "ip": ip or "", "bk_cloud_id": "" if row.bk_cloud_id is None else row.bk_cloud_id,
        "label": (row.bk_host_name or "").strip() or ip or f"host {host_id}", "tenant": row.tenant,
    }
    technical = _unique(_TECHNICAL_BAD.sub("_", options.technical_name.format_map(values)).strip(), host_id,
                        taken_host, "-")
    visible = _unique(" ".join(options.visible_name.format_map(values).split()), host_id, taken_name, " ")
    tags: set[Tag] = {options.managed, ("bk_host_id", str(host_id))}
    if row.bk_cloud_id is not None:
        tags.add(("bk_cloud_id", str(row.bk_cloud_id)))
    for (biz_id, set_id, module_id), biz, set_, module in placed:
        tags.update({("bk_biz_id", str(biz_id)), ("bk_biz", biz), ("bk_set_id", str(set_id)), ("bk_set", set_),
                     ("bk_module_id", str(module_id)), ("bk_module", module)})
    modules = [r.bk_module_name for r in rows]
    disabled = options.disable_idle and all(name is not None and name in options.idle_modules for name in modules)
    if disabled:
        tags.add((DISABLED_TAG, "idle"))
    templates = {t for rule in options.template_rules if rule.matches(modules, os_type) for t in rule.templates}
    return DesiredHost(
        bk_host_id=host_id,
        host=technical,
        name=visible,
        ip=ip,
        groups=frozenset(groups[key] for key, *_ in placed),
        tags=frozenset(tags),
        templates=frozenset(templates),
        proxy=options.proxies.get(row.bk_cloud_id) if row.bk_cloud_id is not None else None,
        disabled=disabled,
    )


def _unique(name: str, host_id: int, taken: set[str], sep: str) -> str:
    """Zabbix refuses a second host of the same name: a template that made one anyway gets the id appended."""
    name = name[:MAX_NAME] or f"bk-{host_id}"
    if name in taken:
        suffix = f"{sep}{host_id}"
        name = name[: MAX_NAME - len(suffix)] + suffix
    taken.add(name)
    return name
