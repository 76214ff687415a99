"""Who may reach the simulated CMDB: the gateway's checks in the order its plugins run, then CMDB's own.

Every CMDB request passes ``admit`` before anything else looks at it, so a refused request changes nothing:
it uses up no fault, draws nothing from a random generator and counts only in ``Stats.refused``.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from rwatch.cmdb.protocol import CODE_INVALID_TENANT, GW_APP_NO_PERMISSION, GW_CROSS_TENANT
from rwatch.sim.parts import SimParts
from rwatch.sim.wire import GW_ERRORS, MESSAGES, check_auth, envelope, gateway_error

WATCH_API: Final = "resource_watch"  # the gateway resource (and ESB component) name of the watch API
TENANT_HEADER: Final = "X-Bk-Tenant-Id"


def admit(sim: SimParts, request: web.Request, body: Any, api: str) -> web.Response | None:
    """None when ``api`` may be served, else the refusal (counted under its reason).

    The gateway's plugins run in priority order: authentication (bk-auth-validate), tenancy
    (bk-tenant-validate), grants (bk-permission); then CMDB 3.15 checks the tenant the request names.
    """
    options = sim.options
    failed = check_auth(request, body, options.app_code, options.app_secret)
    if failed is not None:
        code, reason = failed
        return _refuse(sim, api, "auth", gateway_error(request, GW_ERRORS[code], reason))
    multi = options.tenant_mode == "multi"
    # Single-tenant: the gateway overwrites the header with "default" (bk-default-tenant), whatever was sent.
    tenant = request.headers.get(TENANT_HEADER, "") if multi else options.tenant
    if multi:
        cross = _cross_tenant(tenant, options.app_tenant)
        if cross is not None:
            return _refuse(sim, api, "tenant", gateway_error(request, GW_ERRORS[GW_CROSS_TENANT], cross))
        if not tenant and options.app_tenant is not None:
            tenant = options.app_tenant  # bk-tenant-validate fills a missing header with the app's one tenant
    if not sim.permissions.granted(api):
        reason = f"the app is not granted the gateway resource {api}; apply for it on the gateway"
        return _refuse(sim, api, "grant", gateway_error(request, GW_ERRORS[GW_APP_NO_PERMISSION], reason))
    if tenant != options.tenant:
        # Through the gateway, so CMDB's own envelope at HTTP 200 (feature-tenant apiserver filter).
        refusal = envelope(request, code=CODE_INVALID_TENANT, message=f"{MESSAGES[CODE_INVALID_TENANT]}: {tenant}")
        return _refuse(sim, api, "tenant", refusal)
    return None


def _cross_tenant(header: str, app_tenant: str | None) -> str | None:
    """Why bk-tenant-validate refuses the header, or None: an app of one tenant may not name another (a missing
    header is filled with its tenant), an app valid in every tenant must name one."""
    if app_tenant is None:
        if not header:
            return "Cross-tenant calls are not allowed: header X-Bk-Tenant-Id is required. the app tenant_mode=global"
        return None
    if header and header != app_tenant:
        return (
            f"Cross-tenant calls are not allowed: current header X-Bk-Tenant-Id={header}, "
            f"should be the same as app's tenant_id={app_tenant}, while the app's tenant_mode=single"
        )
    return None


def _refuse(sim: SimParts, api: str, reason: str, response: web.Response) -> web.Response:
    sim.stats.record_refused(api, reason)
    return response
