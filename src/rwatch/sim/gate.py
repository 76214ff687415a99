"""Who may reach the simulated CMDB: the gateway's checks in the order its plugins run, then CMDB's own.

Every CMDB request passes ``admit`` before anything else looks at it, so a refused request changes nothing:
it uses up no fault, draws nothing from a random generator and counts only in ``Stats.refused``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from rwatch.cmdb.protocol import CODE_INVALID_TENANT, GW_APP_NO_PERMISSION, GW_CROSS_TENANT, RESOURCE_TYPES
from rwatch.sim.wire import GW_ERRORS, MESSAGES, check_auth, envelope, gateway_error

if TYPE_CHECKING:
    from rwatch.sim.server import Simulator

WATCH_API: Final = "resource_watch"  # the gateway resource (and ESB component) name of the watch API
ALL_APIS: Final = "*"
TENANT_HEADER: Final = "X-Bk-Tenant-Id"


@dataclass
class Permissions:
    """What the calling app and user may do: the app's gateway grants and the user's IAM permissions.

    ``deny``: resources whose IAM watch action is refused (CMDB answers 9900403). ``deny_apis``: gateway
    resources the app is not granted (the gateway answers 403 1640301; ``*`` = every one). ``hide_bizs``:
    businesses the user may not view in IAM (a user who is not a CMDB administrator); the list APIs drop or
    refuse them, the watch API does not (event watching is authorised per resource type).
    """

    apis: frozenset[str]  # the API names the simulator serves, for validation
    deny: set[str] = field(default_factory=set)
    deny_apis: set[str] = field(default_factory=set)
    hide_bizs: set[int] = field(default_factory=set)

    def update(self, spec: Mapping[str, Any]) -> None:
        """Replace the sets ``spec`` names (the others stay); ValueError, changing nothing, when one is bad."""
        deny = _names(spec, "deny", set(RESOURCE_TYPES))
        deny_apis = _names(spec, "deny_apis", {*self.apis, ALL_APIS})
        hide_bizs = _ids(spec, "hide_bizs")
        self.deny = self.deny if deny is None else deny
        self.deny_apis = self.deny_apis if deny_apis is None else deny_apis
        self.hide_bizs = self.hide_bizs if hide_bizs is None else hide_bizs

    def granted(self, api: str) -> bool:
        return ALL_APIS not in self.deny_apis and api not in self.deny_apis

    def to_json(self) -> dict[str, Any]:
        return {"deny": sorted(self.deny), "deny_apis": sorted(self.deny_apis), "hide_bizs": sorted(self.hide_bizs)}


def _items(spec: Mapping[str, Any], key: str) -> list[Any] | None:
    if key not in spec:
        return None
    value = spec[key]
    if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
        raise ValueError(f"{key} must be a list")
    return list(value)


def _ids(spec: Mapping[str, Any], key: str) -> set[int] | None:
    value = _items(spec, key)
    if value is not None and not all(type(v) is int for v in value):
        raise ValueError(f"{key} must be a list of integer ids")
    return None if value is None else set(value)


def _names(spec: Mapping[str, Any], key: str, known: set[str]) -> set[str] | None:
    value = _items(spec, key)
    if value is None:
        return None
    unknown = sorted(str(v) for v in value if v not in known)
    if unknown:
        raise ValueError(f"{key}: unknown names {unknown}; known: {sorted(known)}")
    return set(value)


def admit(sim: Simulator, request: web.Request, body: Any, api: str) -> web.Response | None:
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


def _refuse(sim: Simulator, api: str, reason: str, response: web.Response) -> web.Response:
    sim.stats.record_refused(api, reason)
    return response
