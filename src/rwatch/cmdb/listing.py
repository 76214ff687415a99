"""CMDB's list APIs as they really page: keyset paging that proves itself complete, or says why it is not.

A resync deletes downstream what its listing did not show (the sweep), so a listing must be *provably* complete
before anyone sweeps from it (cmdb-watch-api §6, §10.3, §10.5):

* pages are keyset pages (``id > last id``, sorted by the id), never offsets, at each API's documented maximum;
* a page shorter than the limit ends the listing (as does, where the count is true, a page holding all the
  server counted); nothing depends on a ``count`` the API does not promise (``list_project`` and
  ``list_business_set`` answer ``count: 0`` on detail pages);
* every page's ids must rise past the previous page's last: one that does not (the ESB's ``search_set`` drops a
  ``filter``, so every request returns the first page again) is a ``ListingBroken`` error naming the API, never
  an endless loop;
* where the API gives a true count, the last page must hold exactly what the server counted from its first id
  on; where it gives one only on request (``enable_count``), the total must match it. Otherwise the listing is
  published but recorded as unproved (``Proof.reasons``), and nothing is swept from it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from rwatch import metrics as m
from rwatch.cmdb import protocol as p
from rwatch.cmdb.client import CmdbClient
from rwatch.errors import ListingBroken
from rwatch.retry import LIST, log_retry, retrying

log = structlog.get_logger("rwatch.resync")

Doc = dict[str, Any]

# Page sizes: the documented maximum of each API (cmdb-watch-api §6), never the system-wide 1000.
LIMITS: Final[dict[str, int]] = {
    "search_business": 200,
    "list_business_set": 500,
    "search_set": 500,
    "search_module": 500,
    "list_hosts_without_biz": 500,
    "find_host_biz_relations": 500,  # host ids per request
    "search_cloud_area": 200,
    "list_project": 500,
}
# Detail pages of these carry count 0: the count comes only from a separate enable_count request (§10.5).
COUNT_ON_REQUEST: Final = frozenset({"list_project", "list_business_set"})


@dataclass(slots=True)
class Proof:
    """What one resync's listings proved: empty ``reasons`` means every listing was provably complete."""

    reasons: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.reasons

    def fail(self, reason: str) -> None:
        self.reasons.append(reason)


class ListApi:
    """The list APIs: one request at a time per caller, ``concurrency`` in flight in all, transient errors (the
    gateway's rate limits and backend failures at any HTTP status included) retried with backoff until ``stop``;
    anything else raises."""

    def __init__(self, client: CmdbClient, stop: asyncio.Event, concurrency: int) -> None:
        self.client = client
        self.supplier_account = client.config.supplier_account
        self.stop = stop
        self._slots = asyncio.Semaphore(concurrency)

    async def call(self, api: str, body: dict[str, Any], requests: Counter[str], **path: Any) -> Any:
        url = self.client.api_url(p.LIST_PATHS[api].format(bk_supplier_account=self.supplier_account, **path), api)
        body = {**path, **body}
        retry = retrying(LIST, stop=self.stop, before_sleep=log_retry(log, "resync_list_failed", api=api))
        return await retry(self._call_once, api, url, body, requests)

    async def _call_once(self, api: str, url: str, body: dict[str, Any], requests: Counter[str]) -> Any:
        async with self._slots:
            requests[api] += 1
            m.RESYNC_REQUESTS.labels(api).inc()
            return await self.client.call(url, body, api=api)

    async def pages(self, api: str, id_field: str, requests: Counter[str], proof: Proof, *,
                    body: dict[str, Any] | None = None, style: str = "filter", param: str = "filter",
                    limit: int | None = None, **path: Any) -> AsyncIterator[tuple[list[Doc], int | None]]:
        """Every object, keyset-paged by ``id_field``: (page, the server's count of what remained including it,
        when the API gives one). The next page is requested while the caller handles this one (publishing
        overlaps listing; one page in hand). What the listing could not prove goes to ``proof``. ``limit``
        (default: the API's documented maximum) is smaller only for ``rwatch doctor``'s probes."""
        limit = limit or LIMITS[api]
        counted = api not in COUNT_ON_REQUEST
        where = _where(path)

        def request(last: Any) -> asyncio.Task[Any]:
            query = dict(body or {})
            if last is not None:
                if style == "condition":
                    query[param] = {**query.get(param, {}), id_field: {"$gt": last}}
                else:
                    rule = {"field": id_field, "operator": "greater", "value": last}
                    given = query.get(param)
                    query[param] = {"condition": "AND", "rules": [given, rule] if given else [rule]}
            query["page"] = {"start": 0, "limit": limit, "sort": id_field}
            return asyncio.ensure_future(self.call(api, query, requests, **path))

        pending = request(None)
        last: Any = None
        listed = 0
        try:
            while True:  # ends at the last page (a short one, or one holding all the server counted)
                info, count = _info(await pending, api)
                ids = [_id(doc, id_field, api) for doc in info]
                if ids and (ids != sorted(set(ids)) or (last is not None and ids[0] <= last)):
                    raise ListingBroken(
                        f"{api} answered a page whose {id_field}s do not advance past {last} (page {ids[0]} .. "
                        f"{ids[-1]}): it ignored the paging condition, so paging would never end", api=api,
                        id_field=id_field, last=last, **path)
                listed += len(info)
                # The end: a short page, or (where the count is true) a page holding all the server said remained,
                # which spares the empty page after an exactly full one.
                end = len(info) < limit or (counted and count == len(info))
                if not end:
                    last = ids[-1]
                    pending = request(last)
                yield info, count if counted else None
                if end:
                    if counted and count != len(info):
                        proof.fail(f"{api}{where}: the last page held {len(info)} objects but the server counted "
                                   f"{count} from its first {id_field} on")
                    break
        finally:
            if not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
        if not counted:
            total = await self.count(api, body, requests, **path)
            if total != listed:
                proof.fail(f"{api}{where}: listed {listed} objects, the server counts {total} (enable_count)")

    async def count(self, api: str, body: dict[str, Any] | None, requests: Counter[str], **path: Any) -> int:
        """The server's count from a separate ``enable_count`` request (the only true count some APIs give)."""
        query = {k: v for k, v in (body or {}).items() if k != "fields"}
        query["page"] = {"start": 0, "limit": 0, "sort": "", "enable_count": True}
        data = await self.call(api, query, requests, **path)
        if not isinstance(data, dict) or not isinstance(data.get("count"), int):
            raise ListingBroken(f"{api} answered an enable_count request without an integer count", api=api)
        return int(data["count"])


def _where(path: dict[str, Any]) -> str:
    return f" ({', '.join(f'{k}={v}' for k, v in path.items())})" if path else ""


def _id(doc: Doc, id_field: str, api: str) -> Any:
    value = doc.get(id_field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ListingBroken(f"{api} returned an object without an integer {id_field}", api=api, id_field=id_field)
    return value


def _info(data: Any, api: str) -> tuple[list[Doc], int | None]:
    if not isinstance(data, dict) or not isinstance(data.get("info"), list):
        raise ListingBroken(f"{api} answered without data.info", api=api)
    info = [d for d in data["info"] if isinstance(d, dict)]
    if len(info) != len(data["info"]):
        raise ListingBroken(f"{api} answered a page with an element that is not an object", api=api)
    count = data.get("count")
    return info, count if isinstance(count, int) and not isinstance(count, bool) else None
