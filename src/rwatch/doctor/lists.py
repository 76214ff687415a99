"""The doctor's probes of the list APIs a resync uses: do they answer, and do their pages advance."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from rwatch.cmdb.listing import COUNT_ON_REQUEST, ListApi, Proof
from rwatch.errors import ListingBroken

# The list APIs a resync of each resource calls (README "Resync").
RESYNC_APIS: Final[dict[str, tuple[str, ...]]] = {
    "host": ("search_business", "list_hosts_without_biz"),
    "host_relation": ("search_business", "list_hosts_without_biz", "find_host_biz_relations"),
    "biz": ("search_business",),
    "set": ("search_business", "search_set"),
    "module": ("search_business", "search_module"),
    "plat": ("search_cloud_area",),
    "project": ("list_project",),
    "biz_set": ("list_business_set",),
}
ANY_STATUS: Final = {"field": "bk_data_status", "operator": "not_equal", "value": "__rwatch_any__"}
# How each list API is paged (by which id, through which parameter), as the resyncer pages it.
PAGING: Final[dict[str, dict[str, Any]]] = {
    "search_business": {"id_field": "bk_biz_id", "param": "biz_property_filter",
                        "body": {"fields": ["bk_biz_id", "bk_biz_name", "default"],
                                 "biz_property_filter": ANY_STATUS}},
    "search_set": {"id_field": "bk_set_id", "style": "condition", "param": "condition",
                   "body": {"fields": ["bk_set_id"]}},
    "search_module": {"id_field": "bk_module_id", "style": "condition", "param": "condition",
                      "body": {"fields": ["bk_module_id"]}},
    "list_hosts_without_biz": {"id_field": "bk_host_id", "param": "host_property_filter",
                               "body": {"fields": ["bk_host_id"]}},
    "search_cloud_area": {"id_field": "bk_cloud_id", "style": "condition", "param": "condition",
                          "body": {"fields": ["bk_cloud_id"]}},
    "list_project": {"id_field": "id", "body": {"fields": ["id"]}},
    "list_business_set": {"id_field": "bk_biz_set_id", "param": "bk_biz_set_filter",
                          "body": {"fields": ["bk_biz_set_id"]}},
}
PROBE_LIMIT: Final = 2  # a small page, so that even a small CMDB shows whether paging advances


async def probe_api(lists: ListApi, api: str, context: dict[str, Any]) -> str:
    """Page through ``api`` as a resync would (two small pages) and say what it answered; ``context`` carries the
    businesses and hosts the first APIs listed to the ones that need them."""
    requests: Counter[str] = Counter()
    if api == "find_host_biz_relations":
        hosts = context.get("hosts")
        if not hosts:
            return "not checked: no host to ask about"
        rows = await lists.call(api, {"bk_host_id": hosts}, requests)
        if not isinstance(rows, list):
            raise ListingBroken(f"{api} answered without a list", api=api)
        return f"answers ({len(rows)} relation rows for {len(hosts)} hosts)"
    path: dict[str, Any] = {}
    if api in ("search_set", "search_module"):
        if not context.get("bizs"):
            return "not checked: no business to list in"
        path = {"bk_biz_id": context["bizs"][0]}
        if api == "search_module":
            path["bk_set_id"] = 0
    paging = dict(PAGING[api])
    id_field, body = paging.pop("id_field"), paging.pop("body")
    proof, pages, ids = Proof(), 0, list[int]()
    async for info, _ in lists.pages(api, id_field, requests, proof, body=body, limit=PROBE_LIMIT, **paging,
                                     **path):
        pages += 1
        ids.extend(d[id_field] for d in info)
        if api in ("search_business", "list_hosts_without_biz"):
            context.setdefault("bizs" if api == "search_business" else "hosts", []).extend(
                d[id_field] for d in info)
        if pages == 2:
            break
    if not proof.complete:
        raise ListingBroken("; ".join(proof.reasons), api=api)
    counted = ""
    if api in COUNT_ON_REQUEST:
        counted = f"; count on request: {await lists.count(api, body, requests, **path)}"
    paged = "ids advance from page to page" if pages == 2 else "all in one page: paging not exercised"
    return f"answers and pages ({len(ids)} objects in {pages} page(s) of {PROBE_LIMIT}: {paged}{counted})"


async def listed_businesses(lists: ListApi) -> set[int]:
    """Every business ``search_business`` lists to the configured user."""
    paging = dict(PAGING["search_business"])
    id_field, body = paging.pop("id_field"), paging.pop("body")
    listed: set[int] = set()
    async for info, _ in lists.pages("search_business", id_field, Counter(), Proof(), body=body, **paging):
        listed.update(int(d[id_field]) for d in info)
    return listed
