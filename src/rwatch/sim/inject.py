"""The replies of injected request faults: what a flaky gateway, ESB, load balancer or CMDB answers instead.

Gateway errors come in the gateway's format (``wire.gateway_error``), at their real HTTP status on the
gateway and direct paths and at HTTP 200 on the ESB paths (bk-status-rewrite); ESB's own 1306201 comes in
ESB's envelope. The 5xx HTML pages are what a load balancer, or a crashed backend passed through, sends.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson
from aiohttp import web

from rwatch.cmdb.protocol import (
    CODE_CURSOR_EXPIRED,
    CODE_DETAIL_NOT_EXIST,
    CODE_NO_PERMISSION,
    CODE_TOO_MANY_REQUESTS,
    ESB_BACKEND_FAILED,
    GW_TIMEOUT,
    NO_EVENT_CURSOR,
)
from rwatch.sim.faults import CONDITIONAL_KINDS, Fault
from rwatch.sim.parts import SimParts
from rwatch.sim.wire import GW_ERRORS, MESSAGES, envelope, gateway_error, is_esb, watch_permission

RATE_LIMIT_CODE: Final = 1642903  # http_429: the per-resource limit every CMDB resource carries (§7)
# The plugin behind each rate-limit code, and the per-app limit it reports (bk-rate-limit headers).
RATE_LIMIT_PLUGINS: Final = {
    1642901: "bk-stage-global-rate-limit",
    1642902: "bk-stage-rate-limit",
    1642903: "bk-resource-rate-limit",
}
RATE_LIMIT: Final = 100
ESB_BACKEND_MESSAGE: Final = "Request third-party system CMDB interface error: unreachable or no answer within 30 s"


async def inject(sim: SimParts, request: web.Request, fault: Fault, resource: str) -> web.StreamResponse | None:
    """The response ``fault`` produces, or None to answer normally (after ``slow``'s delay)."""
    kind = fault.kind
    if kind == "slow":
        await asyncio.sleep(fault.delay)
        return None
    if kind in CONDITIONAL_KINDS:
        return None  # they bend the real answer: the caller computes it, then asks ``unwatch`` / ``bend_page``
    if kind == "empty_events":
        return envelope(request, data={"bk_watched": True, "bk_events": []})
    if kind == "missing_events":
        return envelope(request, data={"bk_watched": True})
    if kind == "events_not_list":
        # The placeholder element itself instead of a one-element list (as a careless JSON rewriter would).
        return envelope(request, data={"bk_watched": False, "bk_events": {
            "bk_cursor": NO_EVENT_CURSOR, "bk_resource": resource, "bk_event_type": "", "bk_detail": {}}})
    if kind == "http_429":
        return _gateway(request, RATE_LIMIT_CODE)
    if kind == "gateway":
        return _gateway(request, sim.faults.gateway_code(fault, is_esb(request)))
    if kind.startswith("http_"):
        status = int(kind[5:])
        return web.Response(
            status=status,
            content_type="text/html",
            text=f"<html><body><h1>{status}</h1>simulated gateway error</body></html>",
        )
    if kind == "code":
        code = CODE_TOO_MANY_REQUESTS if fault.code is None else fault.code
        message = fault.message or MESSAGES.get(code, "simulated error")
        perm = watch_permission(resource) if code == CODE_NO_PERMISSION else None
        await asyncio.sleep(sim.options.error_delay)
        return envelope(request, code=code, message=message, permission=perm)
    if kind == "detail_missing":
        await asyncio.sleep(sim.options.error_delay)
        return envelope(request, code=CODE_DETAIL_NOT_EXIST, message=MESSAGES[CODE_DETAIL_NOT_EXIST])
    if kind == "expire_cursors":
        await asyncio.sleep(sim.options.error_delay)
        return envelope(request, code=CODE_CURSOR_EXPIRED, message=MESSAGES[CODE_CURSOR_EXPIRED])
    if kind == "malformed":
        return web.Response(
            status=200,
            content_type="application/json",
            text="<html><body>upstream returned garbage</body></html>",
        )
    if kind == "truncated":
        return _truncated(resource)
    if kind == "drop":
        # Close the socket; aiohttp then drops the response quietly (the transport is gone).
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=200)
    raise AssertionError(f"unhandled fault kind {kind}")  # Fault.from_json admits only known kinds


def _gateway(request: web.Request, code: int) -> web.Response:
    """A transient gateway error; 1306201 is ESB's own (its envelope), on a gateway path the gateway's 504."""
    if code == ESB_BACKEND_FAILED:
        if is_esb(request):
            return envelope(request, code=ESB_BACKEND_FAILED, message=ESB_BACKEND_MESSAGE)
        code = GW_TIMEOUT
    plugin = RATE_LIMIT_PLUGINS.get(code)
    headers = None
    if plugin is not None:  # no Retry-After: the gateway never sends one
        headers = {
            "X-Bkapi-RateLimit-Limit": str(RATE_LIMIT),
            "X-Bkapi-RateLimit-Remaining": "0",
            "X-Bkapi-RateLimit-Reset": "1",
            "X-Bkapi-RateLimit-Plugin": plugin,
        }
    return gateway_error(request, GW_ERRORS[code], headers=headers)


def _truncated(resource: str) -> web.Response:
    data = {
        "bk_watched": True,
        "bk_events": [
            {"bk_cursor": "x" * 40, "bk_resource": resource, "bk_event_type": "update", "bk_detail": {"k": "v"}}
        ],
    }
    full = orjson.dumps({"result": True, "code": 0, "message": "success", "permission": None, "data": data})
    return web.Response(status=200, content_type="application/json", body=full[: len(full) // 2])


# --- faults that bend a real answer -----------------------------------------------------------------------

_KEYSET_OPERATORS: Final = frozenset({"$gt", "$gte", "greater", "greater_or_equal"})


def unwatch(data: dict[str, Any]) -> dict[str, Any] | None:
    """``unwatched_with_events``: the answer's real events under ``bk_watched: false``; None for a placeholder."""
    if not data.get("bk_watched") or not data.get("bk_events"):
        return None
    return {**data, "bk_watched": False}


def bend_page(kind: str, data: Any) -> Any | None:
    """``empty_page`` / ``truncated_page``: the page with none, or only the first half, of its objects (at least
    one fewer), every other member (``count``) kept; None when the page has no object to take away."""
    key: str | None = None
    if isinstance(data, dict):
        key = "info" if isinstance(data.get("info"), list) else "data" if isinstance(data.get("data"), list) else None
        if key is None:
            return None
        items: list[Any] = data[key]
    elif isinstance(data, list):
        items = data
    else:
        return None
    if not items:
        return None
    kept = [] if kind == "empty_page" else items[: len(items) - max(1, len(items) // 2)]
    return {**data, key: kept} if key is not None else kept


def ignore_keyset(params: dict[str, Any]) -> dict[str, Any] | None:
    """``ignore_keyset``: the request without its keyset rule (``$gt``/``$gte`` in a legacy condition,
    ``greater``/``greater_or_equal`` in a query filter; on the sort field when one is named), so the listing
    gets the first page again; None when it has no such rule."""
    sort = str((params.get("page") or {}).get("sort") or "").split(",")[0].lstrip("+-") or None
    out = dict(params)
    changed = False
    for name, value in params.items():
        if name == "page" or not isinstance(value, dict):
            continue
        if "rules" in value:
            stripped = _strip_rules(value, sort)
        else:
            stripped = {k: v for k, v in value.items() if not (
                isinstance(v, dict) and (sort is None or k == sort) and _KEYSET_OPERATORS & set(v))}
        if stripped != value:
            changed = True
            if stripped:
                out[name] = stripped
            else:
                del out[name]
    return out if changed else None


def _strip_rules(flt: dict[str, Any], sort: str | None) -> dict[str, Any] | None:
    rules = []
    for rule in flt.get("rules") or []:
        if isinstance(rule, dict) and "rules" in rule:
            inner = _strip_rules(rule, sort)
            if inner:
                rules.append(inner)
        elif not (isinstance(rule, dict) and rule.get("operator") in _KEYSET_OPERATORS
                  and (sort is None or rule.get("field") == sort)):
            rules.append(rule)
    if not rules:
        return None
    return {**flt, "rules": rules}
