"""The simulator's truth: live objects, the event chain of every resource, and the simulated clock.

Pure and synchronous: every change goes through ``_emit``, which stamps a globally monotonic cluster time
and appends to the resource's chain exactly as the server's change-stream flow would. Documents are never
mutated in place (an update stores a new dict), so a chain node can keep a reference as its snapshot.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

from rwatch.cmdb.protocol import RESOURCE_TYPES, RESOURCES, Cursor, object_key
from rwatch.sim.chain import DEFAULT_KEEP_EXPIRED, Chain, ChainNode, EventFaults, SimClock
from rwatch.sim.docs import ID_FIELDS, INST_RESOURCES, default_doc
from rwatch.sim.query import match_filter

DetailMode = Literal["snapshot", "latest"]
_EVENT_TYPE = {"insert": "create", "update": "update", "delete": "delete"}
# Fields an update may not change (identity and placement; moving objects has its own operations).
_FROZEN = {
    "set": ("bk_biz_id",),
    "module": ("bk_biz_id", "bk_set_id"),
    "process": ("bk_biz_id",),
    "object_instance": ("bk_obj_id",),
    "mainline_instance": ("bk_obj_id", "bk_biz_id"),
}

__all__ = ["ChainNode", "EventFaults", "SimClock", "SimError", "SimState"]


class SimError(Exception):
    """A change the simulated CMDB refuses; ``status`` is the admin API's HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SimState:
    """Objects, relations and event chains. Not thread-safe: use it from the event loop's thread."""

    def __init__(
        self,
        *,
        clock: SimClock | None = None,
        retention: float = 6 * 3600,
        detail_mode: DetailMode = "snapshot",
        seed: int = 0,
        keep_expired: int = DEFAULT_KEEP_EXPIRED,
        supplier_account: str = "0",
    ) -> None:
        self.clock = clock or SimClock()
        self.retention = retention
        self.detail_mode: DetailMode = detail_mode
        self.supplier_account = supplier_account
        self.faults = EventFaults(random.Random(seed))
        self.listeners: list[Callable[[str], None]] = []  # called with the resource after each new node
        self.events_total = 0
        self.events_dropped = 0
        self._docs: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in RESOURCES}
        self._oids: dict[str, dict[str, str]] = {r: {} for r in RESOURCES}
        self._chains = {r: Chain(r, keep_expired) for r in RESOURCES}
        self._last_node: dict[tuple[str, str], ChainNode] = {}
        self._ids: dict[str, int] = {}
        self._oid_prefix = f"{int(self.clock.now()) & 0xFFFFFFFF:08x}"
        self._oid_seq = 0
        self._last_time = (0, 0)
        self._host_modules: dict[int, list[int]] = {}
        self._module_hosts: dict[int, set[int]] = {}
        self._members: dict[int, list[int]] = {}
        # Keys in a list plus their positions, so a random pick is O(1) (the load generator's hot path).
        self._keys: dict[str, list[str]] = {r: [] for r in RESOURCES}
        self._key_pos: dict[str, dict[str, int]] = {r: {} for r in RESOURCES}
        # The resource pool (default=1) with its idle set and module: new hosts land there.
        self.create("plat", {"bk_cloud_id": 0, "bk_cloud_name": "Default Area"})
        self.pool_biz_id = self.create("biz", {"bk_biz_name": "资源池", "default": 1})["bk_biz_id"]
        self.idle_set_id = self.create(
            "set", {"bk_biz_id": self.pool_biz_id, "bk_set_name": "空闲机池", "default": 1}
        )["bk_set_id"]
        self.idle_module_id = self.create(
            "module", {"bk_set_id": self.idle_set_id, "bk_module_name": "空闲机", "default": 1}
        )["bk_module_id"]

    # --- reading -------------------------------------------------------------------------------------

    def objects(self, resource: str) -> dict[str, dict[str, Any]]:
        """The truth: every live document of ``resource`` by its DESIGN.md key."""
        self._check(resource)
        if resource == "biz_set_relation":
            return {str(i): {"bk_biz_set_id": i, "bk_biz_ids": list(m)} for i, m in self._members.items()}
        return dict(self._docs[resource])

    def objects_view(self, resource: str) -> Mapping[str, dict[str, Any]]:
        """The live documents without a copy (read-only; not for biz_set_relation)."""
        return MappingProxyType(self._docs[resource])

    def get(self, resource: str, key: str) -> dict[str, Any]:
        self._check(resource)
        doc = self.objects(resource).get(key) if resource == "biz_set_relation" else self._docs[resource].get(key)
        if doc is None:
            raise SimError(f"{resource} {key} does not exist", 404)
        return doc

    def random_key(self, resource: str, rng: random.Random) -> str | None:
        """A uniformly random live key of ``resource`` (None when there is none), in O(1)."""
        keys = self._keys[resource]
        return keys[rng.randrange(len(keys))] if keys else None

    def chain(self, resource: str) -> list[ChainNode]:
        """Every retained event of ``resource``, oldest first (expired ones go only after many pile up)."""
        self._check(resource)
        return self._chains[resource].nodes()

    def chain_of(self, resource: str) -> Chain:
        return self._chains[resource]

    def host_modules(self, host_id: int) -> list[int]:
        return list(self._host_modules.get(host_id, ()))

    def module_hosts(self, module_id: int) -> set[int]:
        return set(self._module_hosts.get(module_id, ()))

    def detail_for(self, resource: str, node: ChainNode) -> dict[str, Any]:
        """The detail served for ``node``: its snapshot, or in "latest" mode the object's current state."""
        if self.detail_mode == "snapshot" or node.event_type == "delete":
            return node.detail
        if resource == "biz_set_relation":
            return self.objects(resource).get(node.key, node.detail)
        if self._oids[resource].get(node.key) != node.oid:
            return {}  # the object is gone and nothing is cached: the server serves an empty detail
        return self._docs[resource][node.key]

    # --- changing ------------------------------------------------------------------------------------

    def create(self, resource: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create an object (ids are assigned unless given) and emit its create event."""
        self._check(resource)
        fields = dict(fields or {})
        if resource == "host_relation":
            return self._add_relation(int(fields.get("bk_host_id", 0)), int(fields.get("bk_module_id", 0)))
        if resource == "biz_set_relation":
            raise SimError("biz_set_relation is derived from biz and biz_set; change those instead")
        id_field = ID_FIELDS[resource]
        new_id = fields.pop(id_field, None)
        counter = "inst" if resource in INST_RESOURCES else resource
        if new_id is None:
            new_id = self._ids.get(counter, 0 if resource == "plat" else 1)
        new_id = int(new_id)
        self._ids[counter] = max(self._ids.get(counter, 0), new_id + 1)
        doc = {**default_doc(resource, new_id, self.supplier_account), **fields, id_field: new_id}
        self._place(resource, doc)
        key = object_key(resource, doc)
        if key is None or key in self._docs[resource]:
            raise SimError(f"{resource} {key} already exists", 409)
        self._store(resource, key, doc, "insert")
        if resource == "host":
            self._add_relation(new_id, self.idle_module_id)
        elif resource == "biz":
            self._refresh_for_biz(new_id)
        elif resource == "biz_set":
            self._refresh_biz_sets(only=new_id, force=True)
        return doc

    def update(self, resource: str, key: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Merge ``fields`` into the object and emit an update event."""
        if resource in ("host_relation", "biz_set_relation"):
            raise SimError(f"{resource} cannot be updated: it is created and deleted only")
        old = self.get(resource, key)
        for name in (ID_FIELDS[resource], *_FROZEN.get(resource, ())):
            if name in fields and fields[name] != old.get(name):
                raise SimError(f"{resource}.{name} cannot be changed by an update")
        if resource == "host" and "bk_cloud_id" in fields:
            self.get("plat", str(fields["bk_cloud_id"]))
        doc = {**old, **fields}
        self._store(resource, key, doc, "update")
        if resource == "biz":
            self._refresh_for_biz(doc["bk_biz_id"])
        elif resource == "biz_set":
            self._refresh_biz_sets(only=doc["bk_biz_set_id"])
        return doc

    def delete(self, resource: str, key: str) -> dict[str, Any]:
        """Delete an object (refusing what would break the topology) and emit its delete event(s)."""
        doc = self.get(resource, key)
        if resource == "biz_set_relation":
            raise SimError("biz_set_relation is derived; delete the biz_set instead")
        if resource == "host_relation":
            if len(self._host_modules[doc["bk_host_id"]]) < 2:
                raise SimError("a host must stay in at least one module; move it instead", 409)
            self._del_relation(doc["bk_host_id"], doc["bk_module_id"])
            return doc
        if resource == "host":
            for module_id in list(self._host_modules.get(doc["bk_host_id"], ())):
                self._del_relation(doc["bk_host_id"], module_id)
            self._host_modules.pop(doc["bk_host_id"], None)
        elif resource in ("biz", "set", "module"):
            self._delete_topo(resource, doc)
            return doc
        elif resource == "plat" and (
            doc["bk_cloud_id"] == 0
            or any(h["bk_cloud_id"] == doc["bk_cloud_id"] for h in self._docs["host"].values())
        ):
            raise SimError("plat is the default or still has hosts", 409)
        self._remove(resource, key, doc)
        if resource == "biz_set":
            self._members.pop(doc["bk_biz_set_id"], None)
            self._emit_relation(doc["bk_biz_set_id"], [], self._oids["biz_set"].get(key, ""))
        return doc

    def move_host(self, host_id: int, module_ids: list[int]) -> list[dict[str, Any]]:
        """Transfer a host: delete its relation rows that are not targets, then create the new ones."""
        self.get("host", str(host_id))
        targets = list(dict.fromkeys(int(m) for m in module_ids))
        if not targets:
            raise SimError("module_ids must not be empty")
        bizs = {self.get("module", str(m))["bk_biz_id"] for m in targets}
        if len(bizs) != 1:
            raise SimError("all target modules must belong to one business")
        current = self._host_modules.get(host_id, [])
        for module_id in [m for m in current if m not in targets]:
            self._del_relation(host_id, module_id)
        for module_id in targets:
            if module_id not in self._host_modules.get(host_id, []):
                self._add_relation(host_id, module_id, check_biz=False)
        return [self._docs["host_relation"][f"{host_id}:{m}"] for m in self._host_modules[host_id]]

    # --- internals -----------------------------------------------------------------------------------

    def _check(self, resource: str) -> None:
        if resource not in RESOURCE_TYPES:
            raise SimError(f"unknown resource {resource!r}", 404)

    def _place(self, resource: str, doc: dict[str, Any]) -> None:
        """Check references and fill placement fields from the parent, as CMDB does."""
        if resource in ("set", "process", "mainline_instance"):
            self.get("biz", str(doc.get("bk_biz_id")))
            if resource != "process":
                doc.setdefault("bk_parent_id", doc["bk_biz_id"])
        elif resource == "module":
            parent = self.get("set", str(doc.get("bk_set_id")))
            doc["bk_biz_id"] = parent["bk_biz_id"]
            doc["bk_parent_id"] = parent["bk_set_id"]
        elif resource == "host":
            self.get("plat", str(doc.get("bk_cloud_id")))

    def _delete_topo(self, resource: str, doc: dict[str, Any]) -> None:
        """Delete a biz, set or module with everything under it, if no host sits anywhere below."""
        id_field = ID_FIELDS[resource]
        if resource == "module":
            modules = [doc]
        else:
            modules = [m for m in self._docs["module"].values() if m[id_field] == doc[id_field]]
        if doc.get("default") or any(self._module_hosts.get(m["bk_module_id"]) for m in modules):
            raise SimError(f"{resource} {doc[id_field]} is a default node or still has hosts", 409)
        for module in modules:
            self._remove("module", str(module["bk_module_id"]), module)
        if resource == "module":
            return
        for set_doc in [s for s in self._docs["set"].values() if s[id_field] == doc[id_field]]:
            self._remove("set", str(set_doc["bk_set_id"]), set_doc)
        if resource == "biz":
            for res in ("process", "mainline_instance"):
                for key, child in [
                    (k, d) for k, d in self._docs[res].items() if d["bk_biz_id"] == doc[id_field]
                ]:
                    self._remove(res, key, child)
            self._remove("biz", str(doc["bk_biz_id"]), doc)
            self._refresh_for_biz(doc["bk_biz_id"])

    def _add_relation(self, host_id: int, module_id: int, check_biz: bool = True) -> dict[str, Any]:
        self.get("host", str(host_id))
        module = self.get("module", str(module_id))
        current = self._host_modules.setdefault(host_id, [])
        if module_id in current:
            raise SimError(f"host {host_id} is already in module {module_id}", 409)
        if check_biz and current:
            biz = self._docs["module"][str(current[0])]["bk_biz_id"]
            if biz != module["bk_biz_id"]:
                raise SimError("a host belongs to one business; use move_host to change it", 409)
        doc = {
            "bk_biz_id": module["bk_biz_id"],
            "bk_set_id": module["bk_set_id"],
            "bk_module_id": module_id,
            "bk_host_id": host_id,
            "bk_supplier_account": self.supplier_account,
        }
        current.append(module_id)
        self._module_hosts.setdefault(module_id, set()).add(host_id)
        self._store("host_relation", f"{host_id}:{module_id}", doc, "insert")
        return doc

    def _del_relation(self, host_id: int, module_id: int) -> None:
        key = f"{host_id}:{module_id}"
        self._host_modules[host_id].remove(module_id)
        self._module_hosts[module_id].discard(host_id)
        self._remove("host_relation", key, self._docs["host_relation"][key])

    @staticmethod
    def _in_scope(biz_set: dict[str, Any], biz: dict[str, Any]) -> bool:
        if biz.get("default") == 1 or biz.get("bk_data_status") == "disabled":
            return False  # the resource pool and archived businesses are never members
        scope = biz_set.get("bk_scope") or {}
        try:
            return bool(
                scope.get("match_all") or (scope.get("filter") and match_filter(scope["filter"], biz))
            )
        except ValueError:
            return False  # a scope the simulator cannot evaluate selects nothing

    def _biz_set_members(self, biz_set: dict[str, Any]) -> list[int]:
        return sorted(b["bk_biz_id"] for b in self._docs["biz"].values() if self._in_scope(biz_set, b))

    def _refresh_for_biz(self, biz_id: int) -> None:
        """One business changed: add it to or drop it from each biz set's list, emitting where it moved."""
        biz = self._docs["biz"].get(str(biz_id))
        for key, biz_set in self._docs["biz_set"].items():
            set_id = biz_set["bk_biz_set_id"]
            members = self._members.get(set_id, [])
            if (biz is not None and self._in_scope(biz_set, biz)) != (biz_id in members):
                self._members[set_id] = sorted(set(members) ^ {biz_id})
                self._emit_relation(set_id, self._members[set_id], self._oids["biz_set"][key])

    def _refresh_biz_sets(self, only: int | None = None, force: bool = False) -> None:
        """Emit a biz_set_relation update for every biz set whose member list changed (or ``only``)."""
        for key, biz_set in list(self._docs["biz_set"].items()):
            set_id = biz_set["bk_biz_set_id"]
            if only is not None and set_id != only:
                continue
            members = self._biz_set_members(biz_set)
            if force or members != self._members.get(set_id):
                self._members[set_id] = members
                self._emit_relation(set_id, members, self._oids["biz_set"][key])

    def _emit_relation(self, set_id: int, members: list[int], oid: str) -> None:
        detail = {"bk_biz_set_id": set_id, "bk_biz_ids": list(members)}
        self._emit("biz_set_relation", "update", str(set_id), oid, detail)

    def _store(self, resource: str, key: str, doc: dict[str, Any], op: str) -> None:
        if op == "insert":
            self._oid_seq += 1
            self._oids[resource][key] = f"{self._oid_prefix}{self._oid_seq:016x}"
            self._key_pos[resource][key] = len(self._keys[resource])
            self._keys[resource].append(key)
        self._docs[resource][key] = doc
        self._emit(resource, op, key, self._oids[resource][key], doc)

    def _remove(self, resource: str, key: str, doc: dict[str, Any]) -> None:
        oid = self._oids[resource].pop(key)
        del self._docs[resource][key]
        keys, pos = self._keys[resource], self._key_pos[resource]
        i = pos.pop(key)
        last = keys.pop()
        if last != key:  # move the last key into the hole
            keys[i] = last
            pos[last] = i
        self._emit(resource, "delete", key, oid, doc)
        self._last_node.pop((resource, oid), None)

    def _tick(self) -> tuple[int, int]:
        sec, inc = self._last_time
        now = int(self.clock.now())
        # Cluster time never goes back, even when the clock is jumped backwards.
        self._last_time = (now, 1) if now > sec else (sec, inc + 1)
        return self._last_time

    def _emit(self, resource: str, op: str, key: str, oid: str, detail: dict[str, Any]) -> None:
        if self.faults.take_drop(resource):
            self.events_dropped += 1
            return
        event_type = _EVENT_TYPE[op]
        prev = self._last_node.get((resource, oid))
        faults = self.faults
        if (
            faults.collapse_next > 0
            and faults.collapse_resource in (None, resource)
            and prev is not None
            and prev.event_type == event_type
        ):
            faults.collapse_next -= 1
            sec, inc = prev.sec, prev.inc  # same (type, oid, op, time): the chain keeps only the last
        else:
            sec, inc = self._tick()
        uniq = str(detail.get("bk_inst_id", "")) if resource in INST_RESOURCES else ""
        cursor = Cursor(RESOURCE_TYPES[resource], oid, op, sec, inc, uniq).encode()
        sub = str(detail.get("bk_obj_id", "")) if resource in INST_RESOURCES else ""
        chain = self._chains[resource]
        before = chain.end
        node = chain.append(ChainNode(0, cursor, event_type, key, oid, sec, inc, detail, sub))
        self._last_node[(resource, oid)] = node
        self.events_total += 1
        if self.events_total % 1024 == 0:
            min_sec = int(self.clock.now() - self.retention)
            for c in self._chains.values():
                c.trim(min_sec)
        if chain.end != before:
            for listener in self.listeners:
                listener(resource)
