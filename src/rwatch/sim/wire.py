"""HTTP details shared by the simulator's CMDB endpoints: envelopes, authentication, gateway errors."""

from __future__ import annotations

import uuid
from typing import Any, Final

import orjson
from aiohttp import web

from rwatch.cmdb.protocol import (
    CODE_BAD_OPTIONS,
    CODE_CURSOR_EXPIRED,
    CODE_DB_READ,
    CODE_DETAIL_NOT_EXIST,
    CODE_JSON_DECODE,
    CODE_NO_PERMISSION,
    CODE_PROXY_FAILED,
    CODE_START_FROM_INVALID,
    CODE_TOO_MANY_REQUESTS,
)

ESB_PREFIX: Final = "/api/c/compapi/v2/cc/"
AUTH_HEADER: Final = "X-Bkapi-Authorization"
# Code of the gateway's (and the simulator's ESB) app-authentication failure.
AUTH_FAILED_CODE: Final = 1640001

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
}

# IAM action per resource (§1.2).
WATCH_ACTIONS: Final[dict[str, str]] = {
    "host": "watch_host_event",
    "host_relation": "watch_host_relation_event",
    "biz": "watch_biz_event",
    "set": "watch_set_event",
    "module": "watch_module_event",
    "process": "watch_process_event",
    "object_instance": "watch_comm_model_inst_event",
    "mainline_instance": "watch_custom_topo_layer_event",
    "biz_set": "watch_biz_set_event",
    "biz_set_relation": "watch_biz_set_event",
    "plat": "watch_plat_event",
    "project": "watch_project_event",
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


def check_auth(request: web.Request, body: Any, app_code: str | None, app_secret: str | None) -> str | None:
    """None when the credentials are acceptable, else why not.

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
            return f"please provide the {AUTH_HEADER} header"
        try:
            creds = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return f"{AUTH_HEADER} is not valid JSON"
        if not isinstance(creds, dict):
            return f"{AUTH_HEADER} is not a JSON object"
    if app_code is not None and creds.get("bk_app_code") != app_code:
        return "app authentication failed: unknown bk_app_code"
    if app_secret is not None and creds.get("bk_app_secret") != app_secret:
        return "app authentication failed: bk_app_secret does not match"
    if not (creds.get("bk_username") or creds.get("bk_token")):
        return "user authentication failed: bk_username or bk_token is required"
    return None


def auth_refused(request: web.Request, reason: str) -> web.Response:
    """Gateway: HTTP 401 in the gateway's own format. ESB: HTTP 200, result false."""
    if is_esb(request):
        return envelope(request, code=AUTH_FAILED_CODE, message=reason)
    body = {
        "result": False,
        "code": AUTH_FAILED_CODE,
        "code_name": "UNAUTHENTICATED",
        "message": reason,
        "data": None,
    }
    return json_response(body, status=401)


def permission(resource: str) -> dict[str, Any]:
    """The ``permission`` object of a 9900403 reply: which IAM action on which event_watch instance."""
    action = WATCH_ACTIONS.get(resource, f"watch_{resource}_event")
    instance = {"type": "event_watch", "type_name": "事件监听", "id": resource, "name": resource}
    return {
        "system_id": "bk_cmdb",
        "system_name": "配置平台",
        "actions": [
            {
                "id": action,
                "name": action,
                "related_resource_types": [
                    {
                        "system_id": "bk_cmdb",
                        "system_name": "配置平台",
                        "type": "event_watch",
                        "type_name": "事件监听",
                        "instances": [[instance]],
                    }
                ],
            }
        ],
    }
