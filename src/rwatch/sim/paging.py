"""Parameters, filters and offset paging shared by the list APIs, with CMDB's errors for bad ones.

Paging is offset paging sorted by the id field (``page.sort`` may name another field, ``-field`` for
descending); a ``page.limit`` above the API's maximum is refused with ``CODE_PAGE_LIMIT``. The newer APIs
(list_project, list_business_set) count only on request: ``countless_page``. Sorting by an
all-int field takes a fast path (the usual case: an id field, 100,000 hosts).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Final

from rwatch.cmdb.protocol import CODE_PAGE_LIMIT, CODE_START_FROM_INVALID
from rwatch.sim.query import compile_filter, match_condition, project

CODE_PARAM_INVALID: Final = CODE_START_FROM_INVALID  # 1199006 CCErrCommParamsInvalid
Params = dict[str, Any]


class ListError(Exception):
    """A ``result: false`` reply of a list API: CMDB's code and message."""

    def __init__(self, code: int, message: str, permission: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.permission = permission  # the IAM permission a 9900403 lacks


def int_param(params: Params, name: str, required: bool = True) -> int:
    value = params.get(name)
    if value in (None, "") and not required:
        return 0
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ListError(CODE_PARAM_INVALID, f"'{name}' data parameter verification does not pass") from None


def id_set(params: Params, name: str, max_len: int) -> set[int] | None:
    values = params.get(name)
    if not values:
        return None
    if not isinstance(values, list) or len(values) > max_len:
        raise ListError(CODE_PARAM_INVALID, f"'{name}' must be a list of at most {max_len} ids")
    try:
        return {int(v) for v in values}
    except (TypeError, ValueError):
        raise ListError(CODE_PARAM_INVALID, f"'{name}' must be a list of at most {max_len} ids") from None


def where(params: Params, docs: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    """Apply whichever of the condition/filter parameters ``names`` the caller sent."""
    sent = [n for n in names if params.get(n)]
    if len(sent) > 1:
        raise ListError(CODE_PARAM_INVALID, f"{' and '.join(sent)} can not be used at the same time")
    if not sent:
        return docs
    name = sent[0]
    try:
        if name == "condition":
            cond = params[name]
            return [d for d in docs if match_condition(cond, d)]
        check = compile_filter(params[name])
        return [d for d in docs if check(d)]
    except ValueError as err:
        raise ListError(CODE_PARAM_INVALID, f"{name}: {err}") from None


def paged(
    params: Params,
    docs: list[dict[str, Any]],
    id_field: str,
    api: str,
    max_limit: int,
    zero_limit: int | None = None,
) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    page = params.get("page") or {}
    start, limit = int_param(page, "start", False), int_param(page, "limit", False)
    if limit == 0:
        limit = zero_limit or max_limit
    if limit > max_limit:
        raise ListError(CODE_PAGE_LIMIT, f"page.limit {limit} exceeds the maximum {max_limit} of {api}")
    if start < 0 or limit < 0:
        raise ListError(CODE_PARAM_INVALID, "page.start and page.limit must not be negative")
    sort = str(page.get("sort") or id_field).split(",")[0]
    field = sort.lstrip("-+")
    reverse = sort.startswith("-")
    if all(type(d.get(field)) is int for d in docs):
        # The usual case (an id field): the general key below reduces to the value itself, same order.
        ordered = sorted(docs, key=itemgetter(field), reverse=reverse)[start : start + limit]
    else:
        ordered = sorted(
            docs,
            key=lambda d: (d.get(field) is None, str(type(d.get(field))), d.get(field) or 0),
            reverse=reverse,
        )[start : start + limit]
    return len(docs), ordered, {"start": start, "limit": limit, "sort": sort}


def info_page(
    params: Params,
    docs: list[dict[str, Any]],
    id_field: str,
    api: str,
    max_limit: int,
    zero_limit: int | None = None,
) -> dict[str, Any]:
    count, page, _ = paged(params, docs, id_field, api, max_limit, zero_limit)
    return {"count": count, "info": [project(d, params.get("fields")) for d in page]}


def countless_page(params: Params, docs: list[dict[str, Any]], id_field: str, api: str, max_limit: int) -> Any:
    """A page of an API that counts only when asked (§10.5): a detail page answers ``count: 0``; the count
    comes from a separate ``page: {enable_count: true, start: 0, limit: 0, sort: ""}`` with no ``info``."""
    page = params.get("page") or {}
    if page.get("enable_count"):
        if page.get("start") or page.get("limit") or page.get("sort"):
            raise ListError(CODE_PARAM_INVALID, "enable_count requires start=0, limit=0 and no sort")
        return {"count": len(docs), "info": []}
    return {**info_page(params, docs, id_field, api, max_limit), "count": 0}
