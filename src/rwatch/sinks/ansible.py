"""ansible_inventory: an Ansible inventory, in the dynamic inventory script's JSON, computed from a mirror's topology.

``inventory`` is the pure part: the mirror's ``rwatch_topology`` rows and its live host documents in, the script
contract's ``--list`` document out. Groups are named by CMDB ids, so they survive renames: ``bk_biz_<id>`` holds
``bk_set_<id>`` which holds ``bk_module_<id>`` which holds the hosts, each with its ids and names as group vars;
``_meta.hostvars`` carries ``ansible_host`` (the first inner IP), ``bk_host_id``, ``bk_cloud_id`` and the configured
host fields. A host appears through its live relations, and only while its host row is live in the mirror: a host
deleted before its relations is gone from the inventory at once. A relation whose set or business is unknown still
puts the host in its module group, hung under the nearest known parent (or ``all``).

``AnsibleInventorySink`` is the projection (``rwatch.sinks.projection``) that writes that document to a file after
the mirror's commits, atomically and only when it changed; ``rwatch inventory`` prints the same document.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from rwatch.metrics import ANSIBLE_INVENTORY_HOSTS, ANSIBLE_INVENTORY_RENDER_ERRORS, ANSIBLE_INVENTORY_RENDERS
from rwatch.sinks.base import first_ip
from rwatch.sinks.files import ProjectedFile
from rwatch.sinks.projection import Projection, ProjectionFailed, TopologySource

if TYPE_CHECKING:
    from rwatch.config import AnsibleInventorySinkConfig
    from rwatch.sinks.base import TopologyRow
    from rwatch.sinks.mirror import MirroredObject

DEFAULT_HOST_NAME = "bk-{bk_host_id}"
HostKey = tuple[str, int]  # (tenant, bk_host_id)
_INVALID = re.compile(r"\W")  # what Ansible refuses in a group name (Unicode letters and digits are fine)
_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")


@dataclass(frozen=True, slots=True)
class InventoryOptions:
    """What shapes the inventory: the host name template, the alias groups, the host fields copied."""

    host_name: str = DEFAULT_HOST_NAME
    alias_groups: bool = False
    hostvars: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: AnsibleInventorySinkConfig) -> InventoryOptions:
        return cls(settings.host_name, settings.alias_groups, tuple(settings.hostvars))


# --- the inventory (pure) -------------------------------------------------------------------------------


def alias(prefix: str, name: str) -> str:
    """``prefix`` + the name with every character Ansible refuses in a group name made ``_``."""
    return prefix + _INVALID.sub("_", name)


def _natural(name: str) -> tuple[str, int, str]:
    """bk_module_9 before bk_module_10."""
    match = _TRAILING_NUMBER.match(name)
    return (match.group(1), int(match.group(2)), name) if match else (name, -1, name)


class _Group:
    __slots__ = ("children", "hosts", "vars")

    def __init__(self) -> None:
        self.hosts: dict[str, None] = {}
        self.children: set[str] = set()
        self.vars: dict[str, Any] = {}

    def set_vars(self, **values: Any) -> None:
        for key, value in values.items():
            if value is not None:
                self.vars.setdefault(key, value)

    def document(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.hosts:
            out["hosts"] = list(self.hosts)
        if self.children:
            out["children"] = sorted(self.children, key=_natural)
        if self.vars:
            out["vars"] = self.vars
        return out


def _host_names(rows: Mapping[HostKey, TopologyRow], template: str) -> dict[HostKey, str]:
    """Each host's inventory name: the template, else (empty, or taken by a host earlier in (tenant, id) order)
    ``bk-<id>``, else ``bk-<id>-<tenant>``, else that with ``-<n>``: unique, and the same on every render."""
    names: dict[HostKey, str] = {}
    taken: set[str] = set()
    for key, row in sorted(rows.items()):
        tenant, host_id = key
        rendered = template.format(bk_host_id=host_id, bk_host_name=row.bk_host_name or "",
                                   bk_host_innerip=row.bk_host_innerip or "", ip=first_ip(row.bk_host_innerip) or "",
                                   bk_cloud_id="" if row.bk_cloud_id is None else row.bk_cloud_id, tenant=tenant)
        candidates = [rendered.strip(), f"bk-{host_id}", f"bk-{host_id}-{tenant}"]
        name = next((c for c in candidates if c and c not in taken), None)
        n = 2
        while name is None or name in taken:
            name, n = f"bk-{host_id}-{tenant}-{n}", n + 1
        names[key] = name
        taken.add(name)
    return names


def _aliases(prefix: str, named: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Alias group -> the id groups it holds, from name -> id groups of that name. Distinct names that read the
    same once sanitised ("web-1", "web 1") do not share a group: a name that needed no change keeps the plain alias,
    each other one gets ``_`` and 8 hex digits of its SHA-1."""
    by_alias: dict[str, list[str]] = {}
    for name in named:
        by_alias.setdefault(alias(prefix, name), []).append(name)
    out: dict[str, set[str]] = {}
    for plain, names in by_alias.items():
        for name in names:
            group = plain
            if len(names) > 1 and plain != prefix + name:
                group = f"{plain}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
            out.setdefault(group, set()).update(named[name])
    return out


def inventory(rows: Iterable[TopologyRow], hosts: Mapping[HostKey, Mapping[str, Any]],
              options: InventoryOptions) -> dict[str, Any]:
    """The ``--list`` document of the dynamic inventory script contract, ``_meta.hostvars`` included.

    ``rows``: the mirror's topology; ``hosts``: the live host documents by (tenant, bk_host_id). Ids are CMDB's,
    so a mirror holding several tenants whose ids overlap would merge their groups: a mirror holds one tenant, the
    ``cmdb.tenant_id`` of the rwatch that fills it.
    """
    live = sorted((r for r in rows if (r.tenant, r.bk_host_id) in hosts),
                  key=lambda r: (r.tenant, r.bk_host_id, r.bk_module_id))
    first: dict[HostKey, TopologyRow] = {}
    for row in live:
        first.setdefault((row.tenant, row.bk_host_id), row)
    names = _host_names(first, options.host_name)
    groups: dict[str, _Group] = {}
    top: set[str] = set()
    named: dict[str, dict[str, set[str]]] = {"biz_": {}, "set_": {}, "module_": {}}

    def group(name: str) -> _Group:
        found = groups.get(name)
        if found is None:
            found = groups[name] = _Group()
        return found

    for row in live:
        module = f"bk_module_{row.bk_module_id}"
        group(module).hosts[names[(row.tenant, row.bk_host_id)]] = None
        group(module).set_vars(bk_module_id=row.bk_module_id, bk_module_name=row.bk_module_name)
        child = module
        if row.bk_set_id is not None:
            set_ = f"bk_set_{row.bk_set_id}"
            group(set_).children.add(module)
            group(set_).set_vars(bk_set_id=row.bk_set_id, bk_set_name=row.bk_set_name)
            child = set_
        if row.bk_biz_id is not None:
            biz = f"bk_biz_{row.bk_biz_id}"
            group(biz).children.add(child)
            group(biz).set_vars(bk_biz_id=row.bk_biz_id, bk_biz_name=row.bk_biz_name)
            child = biz
        top.add(child)
        for prefix, ident, name in (("biz_", row.bk_biz_id, row.bk_biz_name),
                                    ("set_", row.bk_set_id, row.bk_set_name),
                                    ("module_", row.bk_module_id, row.bk_module_name)):
            if ident is not None and name:
                named[prefix].setdefault(name, set()).add(f"bk_{prefix}{ident}")
    if options.alias_groups:
        for prefix, by_name in named.items():
            for name, children in _aliases(prefix, by_name).items():
                group(name).children.update(children)
                top.add(name)

    hostvars: dict[str, dict[str, Any]] = {}
    for key, row in first.items():
        data = hosts[key]
        own: dict[str, Any] = {"ansible_host": first_ip(row.bk_host_innerip), "bk_host_id": row.bk_host_id,
                               "bk_cloud_id": row.bk_cloud_id}
        copied = {field: data[field] for field in options.hostvars if field in data}
        hostvars[names[key]] = {**copied, **{k: v for k, v in own.items() if v is not None}}
    document: dict[str, Any] = {"_meta": {"hostvars": hostvars}, "all": {"children": sorted(top, key=_natural)}}
    for name in sorted(groups, key=_natural):
        document[name] = groups[name].document()
    return document


def host_vars(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``--host NAME``: that host's variables, ``{}`` for a host the inventory does not have."""
    found: dict[str, Any] = document["_meta"]["hostvars"].get(name, {})
    return found


def encode(document: Mapping[str, Any]) -> bytes:
    """The inventory as the file holds it: indented (people read and diff it), keys in the order built."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


# --- reading the mirror ---------------------------------------------------------------------------------


class HostSource(TopologySource, Protocol):
    """What the inventory needs of its mirror: the topology and the live host rows."""

    async def objects(self, resource: str, tenant: str = "0", *,
                      include_deleted: bool = False) -> dict[str, MirroredObject]: ...


async def read_inventory(source: HostSource, options: InventoryOptions) -> dict[str, Any]:
    """The inventory of ``source`` now (raises what the mirror raises)."""
    rows = await source.topology()
    hosts: dict[HostKey, Mapping[str, Any]] = {}
    for tenant in sorted({r.tenant for r in rows}):
        for key, obj in (await source.objects("host", tenant)).items():
            if key.isdigit():
                hosts[(tenant, int(key))] = obj.data
    # Grouping 100k rows takes a while: off the loop, so /healthz keeps answering.
    return await asyncio.to_thread(inventory, rows, hosts, options)


# --- the sink -------------------------------------------------------------------------------------------


class AnsibleInventorySink(Projection):
    """A projection: the inventory file re-rendered after its mirror's commits (debounced), replaced atomically."""

    kind = "ansible_inventory"
    _source: HostSource  # the projection's source, with the host rows the hostvars come from

    def __init__(self, name: str, settings: AnsibleInventorySinkConfig, source: HostSource, *,
                 debounce: float | None = None) -> None:
        super().__init__(name, source, debounce=settings.debounce if debounce is None else debounce,
                         renders=ANSIBLE_INVENTORY_RENDERS, errors=ANSIBLE_INVENTORY_RENDER_ERRORS)
        self._options = InventoryOptions.of(settings)
        self._path = Path(settings.file)
        self._file = ProjectedFile(self._path)
        self._hosts = ANSIBLE_INVENTORY_HOSTS.labels(name)

    async def project(self) -> None:
        try:
            document = await read_inventory(self._source, self._options)
            content = await asyncio.to_thread(encode, document)
        except Exception as exc:
            raise ProjectionFailed("ansible_inventory_topology_failed", exc) from exc
        hostvars = document["_meta"]["hostvars"]
        self._hosts.set(len(hostvars))
        try:
            wrote = await self._file.write(content)
        except OSError as exc:
            raise ProjectionFailed("ansible_inventory_write_failed", exc) from exc
        if wrote:
            self._log.info("ansible_inventory_written", path=str(self._path), hosts=len(hostvars),
                           groups=len(document) - 2, no_ip=sum("ansible_host" not in v for v in hostvars.values()),
                           bytes=len(content))

    def failure_fields(self) -> dict[str, object]:
        return {"path": str(self._path)}
