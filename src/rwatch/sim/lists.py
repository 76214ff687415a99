"""The list APIs a full resync needs (cmdb-watch-api.md §6), on gateway, direct and ESB paths.

Filtering is deliberately small but honest (see ``query.py``): equality-style conditions and CMDB query
filters on top-level fields, path ids, and offset paging sorted by the id field (``page.sort`` may name
another field, ``-field`` for descending). A ``page.limit`` above the API's maximum is refused with
``CODE_PAGE_LIMIT``; ``limit`` 0 means 20 for search_module, 1000 for search_cloud_area and the API's
maximum elsewhere. Keyset paging works too: a ``$gt`` condition or ``greater`` filter on the sort field.
``find_host_biz_relations`` has no paging: it answers the relation rows of at most 500 given hosts.
list_project and list_business_set answer ``count: 0`` on detail pages, as CMDB does (§10.5).

Businesses the user may not view in IAM (``Permissions.hide_bizs``) are dropped silently where CMDB drops
them (search_business; hosts and relation rows in them) and refused with 9900403 and a ``view_business``
permission where an API names one (search_set, search_module, the per-business host and topology APIs).

Sized for 100,000 hosts: filters are compiled once per request, sorting by an all-int field takes a fast
path, and host lists without a biz/set/module restriction skip the relation scan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from rwatch.cmdb.protocol import CODE_JSON_DECODE, CODE_NO_PERMISSION, CODE_PAGE_LIMIT
from rwatch.sim import esb
from rwatch.sim.faults import LIST_API_RESOURCES, LIST_REPLY_KINDS
from rwatch.sim.gate import admit
from rwatch.sim.inject import bend_page, ignore_keyset, inject
from rwatch.sim.paging import (
    CODE_PARAM_INVALID,
    ListError,
    Params,
    countless_page,
    id_set,
    info_page,
    int_param,
    paged,
    where,
)
from rwatch.sim.parts import SimParts
from rwatch.sim.query import mentions, project
from rwatch.sim.state import SimError
from rwatch.sim.wire import MESSAGES, biz_permission, envelope, is_esb


def _objs(sim: SimParts, resource: str) -> list[dict[str, Any]]:
    return list(sim.state.objects_view(resource).values())  # not for biz_set_relation (derived)


def _viewable(sim: SimParts, biz_id: int) -> int:
    """``biz_id``, or ListError 9900403 when the user may not view that business (IAM ``view_business``)."""
    if biz_id in sim.permissions.hide_bizs:
        biz = sim.state.objects_view("biz").get(str(biz_id))
        name = str(biz["bk_biz_name"]) if biz else str(biz_id)
        raise ListError(CODE_NO_PERMISSION, MESSAGES[CODE_NO_PERMISSION], biz_permission(biz_id, name))
    return biz_id


def _hidden_hosts(sim: SimParts) -> set[int]:
    """Hosts in a business the user may not view (a host's relations are all in one business)."""
    hidden = sim.permissions.hide_bizs
    if not hidden:
        return set()
    return {r["bk_host_id"] for r in _objs(sim, "host_relation") if r["bk_biz_id"] in hidden}


def _biz_hosts(sim: SimParts, biz_id: int, params: Params) -> list[dict[str, Any]]:
    if biz_id:
        sim.state.get("biz", str(biz_id))
    set_ids = id_set(params, "bk_set_ids", 200)
    module_ids = id_set(params, "bk_module_ids", 500)
    if not biz_id and set_ids is None and module_ids is None:
        # "Hosts with at least one relation" is every host: SimState places a new host in the idle module
        # and never lets a host lose its last relation (delete refuses it, move_host needs a target).
        hosts = _objs(sim, "host")
    else:
        host_ids = {
            r["bk_host_id"]
            for r in _objs(sim, "host_relation")
            if (not biz_id or r["bk_biz_id"] == biz_id)
            and (set_ids is None or r["bk_set_id"] in set_ids)
            and (module_ids is None or r["bk_module_id"] in module_ids)
        }
        hosts = [h for h in _objs(sim, "host") if h["bk_host_id"] in host_ids]
    return where(params, hosts, "host_property_filter")


# --- the APIs -----------------------------------------------------------------------------------------


def search_business(sim: SimParts, p: Params) -> Any:
    # The resource pool is never returned; a business the user may not view is dropped silently.
    hidden = sim.permissions.hide_bizs
    bizs = [b for b in _objs(sim, "biz") if b.get("default") == 0 and b["bk_biz_id"] not in hidden]
    if not (
        mentions(p.get("condition"), "bk_data_status")
        or mentions(p.get("biz_property_filter"), "bk_data_status")
    ):
        bizs = [b for b in bizs if b.get("bk_data_status") != "disabled"]
    return info_page(p, where(p, bizs, "condition", "biz_property_filter"), "bk_biz_id", "search_business", 200)


def list_business_set(sim: SimParts, p: Params) -> Any:
    sets = where(p, _objs(sim, "biz_set"), "bk_biz_set_filter")
    return countless_page(p, sets, "bk_biz_set_id", "list_business_set", 500)


def list_business_in_business_set(sim: SimParts, p: Params) -> Any:
    set_id = int_param(p, "bk_biz_set_id")
    members = set(sim.state.get("biz_set_relation", str(set_id))["bk_biz_ids"])
    bizs = where(p, [b for b in _objs(sim, "biz") if b["bk_biz_id"] in members], "filter")
    return info_page(p, bizs, "bk_biz_id", "list_business_in_business_set", 500)


def search_set(sim: SimParts, p: Params) -> Any:
    biz_id = _viewable(sim, int_param(p, "bk_biz_id"))
    sets = [s for s in _objs(sim, "set") if s["bk_biz_id"] == biz_id]
    return info_page(p, where(p, sets, "condition", "filter"), "bk_set_id", "search_set", 500)


def search_module(sim: SimParts, p: Params) -> Any:
    biz_id, set_id = _viewable(sim, int_param(p, "bk_biz_id")), int_param(p, "bk_set_id", False)
    modules = [m for m in _objs(sim, "module") if m["bk_biz_id"] == biz_id and set_id in (0, m["bk_set_id"])]
    return info_page(p, where(p, modules, "condition", "filter"), "bk_module_id", "search_module", 500, 20)


def search_biz_inst_topo(sim: SimParts, p: Params) -> Any:
    biz = sim.state.get("biz", str(_viewable(sim, int_param(p, "bk_biz_id"))))
    sets = sorted(
        (s for s in _objs(sim, "set") if s["bk_biz_id"] == biz["bk_biz_id"]), key=lambda s: s["bk_set_id"]
    )
    modules = sorted(_objs(sim, "module"), key=lambda m: m["bk_module_id"])

    def node(obj: str, inst_id: int, name: str, default: int, child: list[Any]) -> dict[str, Any]:
        return {
            "bk_obj_id": obj,
            "bk_obj_name": obj,
            "bk_inst_id": inst_id,
            "bk_inst_name": name,
            "default": default,
            "child": child,
        }

    set_nodes = [
        node(
            "set",
            s["bk_set_id"],
            s["bk_set_name"],
            s.get("default", 0),
            [
                node("module", m["bk_module_id"], m["bk_module_name"], m.get("default", 0), [])
                for m in modules
                if m["bk_set_id"] == s["bk_set_id"]
            ],
        )
        for s in sets
    ]
    return [node("biz", biz["bk_biz_id"], biz["bk_biz_name"], biz.get("default", 0), set_nodes)]


def list_biz_hosts(sim: SimParts, p: Params) -> Any:
    if not p.get("fields"):
        raise ListError(CODE_PARAM_INVALID, "'fields' data parameter verification does not pass")
    hosts = _biz_hosts(sim, _viewable(sim, int_param(p, "bk_biz_id")), p)
    return info_page(p, hosts, "bk_host_id", "list_biz_hosts", 500)


def list_biz_hosts_topo(sim: SimParts, p: Params) -> Any:
    biz_id = _viewable(sim, int_param(p, "bk_biz_id"))
    p = {**p, "page": {**(p.get("page") or {}), "sort": "bk_host_id"}}
    count, hosts, _ = paged(p, _biz_hosts(sim, biz_id, p), "bk_host_id", "list_biz_hosts_topo", 500)
    sets, modules = sim.state.objects("set"), sim.state.objects("module")
    info = []
    for host in hosts:
        topo: dict[int, dict[str, Any]] = {}
        for module_id in sim.state.host_modules(host["bk_host_id"]):
            module = modules[str(module_id)]
            entry = topo.setdefault(
                module["bk_set_id"],
                {
                    "bk_set_id": module["bk_set_id"],
                    "bk_set_name": sets[str(module["bk_set_id"])]["bk_set_name"],
                    "module": [],
                },
            )
            entry["module"].append({"bk_module_id": module_id, "bk_module_name": module["bk_module_name"]})
        info.append({"host": project(host, p.get("fields")), "topo": list(topo.values())})
    return {"count": count, "info": info}


def find_host_topo_relation(sim: SimParts, p: Params) -> Any:
    biz_id = _viewable(sim, int_param(p, "bk_biz_id"))
    set_ids, module_ids = id_set(p, "bk_set_ids", 200), id_set(p, "bk_module_ids", 500)
    host_ids = id_set(p, "bk_host_ids", 500)
    rows = [
        r
        for r in _objs(sim, "host_relation")
        if r["bk_biz_id"] == biz_id
        and (set_ids is None or r["bk_set_id"] in set_ids)
        and (module_ids is None or r["bk_module_id"] in module_ids)
        and (host_ids is None or r["bk_host_id"] in host_ids)
    ]
    rows.sort(key=lambda r: (r["bk_host_id"], r["bk_module_id"]))
    page = p.get("page") or {}
    start, limit = int_param(page, "start", False), int_param(page, "limit", False) or 500
    if limit > 500:
        raise ListError(
            CODE_PAGE_LIMIT, f"page.limit {limit} exceeds the maximum 500 of find_host_topo_relation"
        )
    return {"count": len(rows), "page": {"start": start, "limit": limit}, "data": rows[start : start + limit]}


def find_host_biz_relations(sim: SimParts, p: Params) -> Any:
    """The relation rows of the given hosts (a plain list, no paging), optionally of one business only."""
    host_ids = p.get("bk_host_id")
    if not isinstance(host_ids, list) or not host_ids:
        raise ListError(CODE_PARAM_INVALID, "'bk_host_id' data parameter verification does not pass")
    wanted = id_set(p, "bk_host_id", 500) or set()
    biz_id = int_param(p, "bk_biz_id", False)
    relations = sim.state.objects_view("host_relation")
    hidden = sim.permissions.hide_bizs
    rows = []
    for host_id in sorted(wanted):  # the per-host index: never a scan of every relation
        for module_id in sorted(sim.state.host_modules(host_id)):
            row = relations.get(f"{host_id}:{module_id}")
            if row is not None and row["bk_biz_id"] not in hidden and biz_id in (0, row["bk_biz_id"]):
                rows.append(row)
    return rows


def list_hosts_without_biz(sim: SimParts, p: Params) -> Any:
    hosts = _biz_hosts(sim, int_param(p, "bk_biz_id", False), p)
    hidden = _hidden_hosts(sim)
    if hidden:
        hosts = [h for h in hosts if h["bk_host_id"] not in hidden]
    return info_page(p, hosts, "bk_host_id", "list_hosts_without_biz", 500)


def search_cloud_area(sim: SimParts, p: Params) -> Any:
    plats = where(p, _objs(sim, "plat"), "condition")
    return info_page(p, plats, "bk_cloud_id", "search_cloud_area", 1000, 1000)


def search_object_instances(sim: SimParts, p: Params) -> Any:
    obj_id = str(p.get("bk_obj_id") or "")
    if not obj_id:
        raise ListError(CODE_PARAM_INVALID, "'bk_obj_id' data parameter verification does not pass")
    insts = [
        d for r in ("object_instance", "mainline_instance") for d in _objs(sim, r) if d["bk_obj_id"] == obj_id
    ]
    return info_page(p, where(p, insts, "conditions", "condition"), "bk_inst_id", "search_object_instances", 500)


def list_project(sim: SimParts, p: Params) -> Any:
    return countless_page(p, where(p, _objs(sim, "project"), "filter"), "id", "list_project", 500)


# name -> (gateway path, function)
APIS: Final[dict[str, tuple[str, Callable[[SimParts, Params], Any]]]] = {
    "search_business": ("/api/v3/biz/search/{bk_supplier_account}", search_business),
    "list_business_set": ("/api/v3/findmany/biz_set", list_business_set),
    "list_business_in_business_set": ("/api/v3/find/biz_set/biz_list", list_business_in_business_set),
    "search_set": ("/api/v3/set/search/{bk_supplier_account}/{bk_biz_id}", search_set),
    "search_module": ("/api/v3/module/search/{bk_supplier_account}/{bk_biz_id}/{bk_set_id}", search_module),
    "search_biz_inst_topo": ("/api/v3/find/topoinst/biz/{bk_biz_id}", search_biz_inst_topo),
    "list_biz_hosts": ("/api/v3/hosts/app/{bk_biz_id}/list_hosts", list_biz_hosts),
    "list_biz_hosts_topo": ("/api/v3/hosts/app/{bk_biz_id}/list_hosts_topo", list_biz_hosts_topo),
    "find_host_topo_relation": ("/api/v3/host/topo/relation/read", find_host_topo_relation),
    "find_host_biz_relations": ("/api/v3/hosts/modules/read", find_host_biz_relations),
    "list_hosts_without_biz": ("/api/v3/hosts/list_hosts_without_app", list_hosts_without_biz),
    "search_cloud_area": ("/api/v3/findmany/cloudarea", search_cloud_area),
    "search_object_instances": ("/api/v3/search/instances/object/{bk_obj_id}", search_object_instances),
    "list_project": ("/api/v3/findmany/project", list_project),
}


def _handler(
    sim: SimParts, name: str, fn: Callable[[SimParts, Params], Any]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            body = None
        refused = admit(sim, request, body, name)
        if refused is not None:
            return refused
        sim.stats.lists[name] += 1
        if not isinstance(body, dict):
            return envelope(request, code=CODE_JSON_DECODE, message=MESSAGES[CODE_JSON_DECODE])
        fault = sim.faults.take("list", LIST_API_RESOURCES[name], list_api=name)
        if fault is not None:
            response = await inject(sim, request, fault, name)
            if response is not None:
                return response
        bend = fault if fault is not None and fault.kind in LIST_REPLY_KINDS else None
        if is_esb(request):
            params = esb.forward(name, body)
        else:
            params = {k: v for k, v in body.items() if k not in esb.CREDENTIALS}
            params.update(request.match_info)
            params.pop("stage", None)
        if bend is not None and bend.kind == "ignore_keyset":
            first_page = ignore_keyset(params)
            if first_page is None:  # no keyset rule to ignore: the fault waits for a request that has one
                sim.faults.give_back(bend)
                bend = None
            else:
                params = first_page
        try:
            data = fn(sim, params)
        except (ListError, SimError) as err:
            if bend is not None:
                sim.faults.give_back(bend)
            if isinstance(err, ListError):
                return envelope(request, code=err.code, message=err.message, permission=err.permission)
            return envelope(request, code=CODE_PARAM_INVALID, message=str(err))  # an unknown biz / biz set id
        if bend is not None and bend.kind != "ignore_keyset":
            bent = bend_page(bend.kind, data)
            if bent is None:  # nothing on the page to take away: the fault waits for a page that has some
                sim.faults.give_back(bend)
            else:
                data = bent
        return envelope(request, data=data)

    return handle


def add_routes(app: web.Application, sim: SimParts) -> None:
    for name, (path, fn) in APIS.items():
        handle = _handler(sim, name, fn)
        for full in (path, "/api/bk-cmdb/{stage}" + path, f"/api/c/compapi/v2/cc/{name}/"):
            app.router.add_post(full, handle)
            if name == "search_biz_inst_topo":
                app.router.add_get(full, handle)
