"""HTTP details shared by the simulator's CMDB endpoints: envelopes, authentication, gateway errors."""

from __future__ import annotations

import uuid
from typing import Any, Final, NamedTuple

import orjson
from aiohttp import web

from rwatch.cmdb.protocol import (
    CODE_BAD_OPTIONS,
    CODE_CURSOR_EXPIRED,
    CODE_DB_READ,
    CODE_DETAIL_NOT_EXIST,
    CODE_INVALID_TENANT,
    CODE_JSON_DECODE,
    CODE_NO_PERMISSION,
    CODE_PROXY_FAILED,
    CODE_START_FROM_INVALID,
    CODE_TOO_MANY_REQUESTS,
    GW_APP_NO_PERMISSION,
    GW_APP_UNAUTHENTICATED,
    GW_CROSS_TENANT,
    GW_TIMEOUT,
    GW_USER_UNAUTHENTICATED,
    IAM_WATCH_ACTIONS,
)

ESB_PREFIX: Final = "/api/c/compapi/v2/cc/"
AUTH_HEADER: Final = "X-Bkapi-Authorization"


class GatewayError(NamedTuple):
    """One of the gateway's own errors as apisix ``bk-core/errorx.lua`` defines it."""

    status: int
    code: int
    code_name: str
    message: str


GW_ERRORS: Final[dict[int, GatewayError]] = {
    e.code: e
    for e in (
        GatewayError(401, GW_APP_UNAUTHENTICATED, "APP_VERIFY_FAILED", "App authentication failed"),
        GatewayError(401, GW_USER_UNAUTHENTICATED, "USER_VERIFY_FAILED", "User authentication failed"),
        GatewayError(403, GW_APP_NO_PERMISSION, "APP_NO_PERMISSION", "App has no permission to the resource"),
        GatewayError(403, GW_CROSS_TENANT, "CROSS_TENANT_FORBIDDEN", "Cross tenant forbidden"),
        GatewayError(429, 1642901, "RATE_LIMIT_RESTRICTION", "API rate limit exceeded by stage global limit"),
        GatewayError(429, 1642902, "RATE_LIMIT_RESTRICTION", "API rate limit exceeded by stage strategy"),
        GatewayError(429, 1642903, "RATE_LIMIT_RESTRICTION", "API rate limit exceeded by resource strategy"),
        GatewayError(429, 1642904, "CONCURRENCY_LIMIT_RESTRICTION", "Request concurrency exceeds"),
        GatewayError(502, 1650200, "BAD_GATEWAY", "Bad Gateway"),
        GatewayError(502, 1650201, "ERROR_REQUESTING_RESOURCE", "Request backend service failed"),
        GatewayError(503, 1650300, "SERVICE_UNAVAILABLE", "Service Unavailable"),
        GatewayError(504, GW_TIMEOUT, "REQUEST_BACKEND_TIMEOUT", "Request backend service timeout"),
    )
}

MESSAGES: Final[dict[int, str]] = {
    CODE_CURSOR_EXPIRED: "Event chain node not exist",
    CODE_DETAIL_NOT_EXIST: "Event detail not exist",
    CODE_START_FROM_INVALID: "'bk_start_from' data parameter verification does not pass",
    CODE_JSON_DECODE: "Failed to deserialize JSON data",
    CODE_DB_READ: "Failed to query data",
    CODE_NO_PERMISSION: "You have no permission to operate",
    CODE_TOO_MANY_REQUESTS: "too many requests",
    CODE_PROXY_FAILED: "proxy request failed",
    CODE_BAD_OPTIONS: "unknown or unrecognized error",
    CODE_INVALID_TENANT: "invalid tenant",
}

def is_esb(request: web.Request) -> bool:
    return request.path.startswith(ESB_PREFIX)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json", headers=headers
    )


def envelope(
    request: web.Request, *, data: Any = None, code: int = 0, message: str = "success", permission: Any = None
) -> web.Response:
    """CMDB's reply as callers see it: result/code/message/permission/data, plus request_id on ESB."""
    request_id = uuid.uuid4().hex
    body: dict[str, Any] = {
        "result": code == 0,
        "code": code,
        "message": message,
        "permission": permission,
        "data": data,
    }
    if is_esb(request):
        body["request_id"] = request_id
    return json_response(body, headers={"X-Request-Id": request_id, "X-Bkapi-Request-Id": request_id})


def check_auth(
    request: web.Request, body: Any, app_code: str | None, app_secret: str | None
) -> tuple[int, str] | None:
    """None when the credentials are acceptable, else the gateway's code (1640101 app, 1640102 user) and why.

    Gateway and direct paths read only the ``X-Bkapi-Authorization`` header (the gateway does not accept
    credentials from the body); ESB reads only the body. ``app_code``/``app_secret`` None accepts anyone.
    """
    if app_code is None and app_secret is None:
        return None
    if is_esb(request):
        creds = body if isinstance(body, dict) else {}
    else:
        raw = request.headers.get(AUTH_HEADER)
        if not raw:
            return GW_APP_UNAUTHENTICATED, f"please provide the {AUTH_HEADER} header"
        try:
            creds = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return GW_APP_UNAUTHENTICATED, f"{AUTH_HEADER} is not valid JSON"
        if not isinstance(creds, dict):
            return GW_APP_UNAUTHENTICATED, f"{AUTH_HEADER} is not a JSON object"
    if app_code is not None and creds.get("bk_app_code") != app_code:
        return GW_APP_UNAUTHENTICATED, "bk_app_code or bk_app_secret is incorrect"
    if app_secret is not None and creds.get("bk_app_secret") != app_secret:
        return GW_APP_UNAUTHENTICATED, "bk_app_code or bk_app_secret is incorrect"
    if not (creds.get("bk_username") or creds.get("bk_token")):
        return GW_USER_UNAUTHENTICATED, "user authentication failed: bk_username or bk_token is required"
    return None


def gateway_error(
    request: web.Request, error: GatewayError, reason: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """An error the gateway itself answers: its body and ``X-Bkapi-Error-*`` headers, its HTTP status.

    On the ESB paths the stage runs ``bk-status-rewrite``, so the same body arrives with HTTP 200. A
    ``reason`` is appended to the message the way ``errorx`` ``with_field`` does.
    """
    message = error.message if reason is None else f'{error.message} [reason="{reason}"]'
    body = {"code": error.code, "code_name": error.code_name, "message": message, "result": False, "data": None}
    request_id = uuid.uuid4().hex
    all_headers = {
        "X-Bkapi-Error-Code": str(error.code),
        "X-Bkapi-Error-Message": message,
        "X-Bkapi-Request-Id": request_id,
        **(headers or {}),
    }
    return json_response(body, status=200 if is_esb(request) else error.status, headers=all_headers)


def permission(action: str, action_name: str, rtype: str, type_name: str, inst_id: str, inst_name: str) -> Any:
    """The ``permission`` object of a 9900403 reply: the IAM action the caller lacks, on which instance."""
    instance = {"type": rtype, "type_name": type_name, "id": inst_id, "name": inst_name}
    return {
        "system_id": "bk_cmdb",
        "system_name": "配置平台",
        "actions": [
            {
                "id": action,
                "name": action_name,
                "related_resource_types": [
                    {
                        "system_id": "bk_cmdb",
                        "system_name": "配置平台",
                        "type": rtype,
                        "type_name": type_name,
                        "instances": [[instance]],
                    }
                ],
            }
        ],
    }


def watch_permission(resource: str) -> Any:
    """Watching ``resource``: its ``watch_<resource>_event`` action on the event_watch instance (§1.2)."""
    action = IAM_WATCH_ACTIONS.get(resource, f"watch_{resource}_event")
    return permission(action, action, "event_watch", "事件监听", resource, resource)


def biz_permission(biz_id: int, name: str) -> Any:
    """Viewing a business: IAM's ``view_business`` action on that biz instance."""
    return permission("view_business", "业务访问", "biz", "业务", str(biz_id), name)
