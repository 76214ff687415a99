"""The resource_watch wire protocol: resources, cursors, error codes, request and reply shapes.

Shared by the client and the simulator, so both sides speak exactly the same dialect.
See ../shared/cmdb-watch-api.md for where each rule comes from.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# --- resources -------------------------------------------------------------------------------------------

# The public resources rwatch follows, with the cursor type number of each (CUR, §5.1).
RESOURCE_TYPES: Final[dict[str, int]] = {
    "host": 2,
    "host_relation": 3,
    "biz": 4,
    "set": 5,
    "module": 6,
    "object_instance": 8,
    "process": 9,
    "mainline_instance": 12,
    "biz_set": 14,
    "biz_set_relation": 15,
    "plat": 16,
    "project": 22,
}
RESOURCES: Final[tuple[str, ...]] = (
    "host", "host_relation", "biz", "set", "module", "process", "object_instance",
    "mainline_instance", "biz_set", "biz_set_relation", "plat", "project",
)
TYPE_NO_EVENT: Final = 1

# The server rejects an empty bk_fields for these four (OPTS Validate).
FIELDS_REQUIRED: Final[frozenset[str]] = frozenset({"host", "biz", "set", "module"})
# Only these accept bk_filter.bk_sub_resource (the value is a bk_obj_id).
SUB_RESOURCE_ALLOWED: Final[frozenset[str]] = frozenset({"object_instance", "mainline_instance"})
# biz_set_relation ignores bk_fields: its detail is always {bk_biz_set_id, bk_biz_ids}.
FIELDS_IGNORED: Final[frozenset[str]] = frozenset({"biz_set_relation"})

EVENT_TYPES: Final[tuple[str, ...]] = ("create", "update", "delete")

# Fields that make up each resource's key (DESIGN.md "Keys"); rwatch always asks for them.
KEY_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "host": ("bk_host_id",),
    "host_relation": ("bk_host_id", "bk_module_id"),
    "biz": ("bk_biz_id",),
    "set": ("bk_set_id",),
    "module": ("bk_module_id",),
    "process": ("bk_process_id",),
    "object_instance": ("bk_obj_id", "bk_inst_id"),
    "mainline_instance": ("bk_obj_id", "bk_inst_id"),
    "biz_set": ("bk_biz_set_id",),
    "biz_set_relation": ("bk_biz_set_id",),
    "plat": ("bk_cloud_id",),
    "project": ("id",),
}


# The IAM action that authorises watching each resource (§1.2); biz_set and biz_set_relation share one.
IAM_WATCH_ACTIONS: Final[dict[str, str]] = {
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


# Fields a resync scopes its sweep by (``ResyncMark.scope``): the lists cannot see the resource pool business,
# so a biz resync sweeps only ``default == 0`` and a set or module resync only the businesses it listed. rwatch
# always asks for them, so every event carries what the sweep decides on.
SCOPE_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "biz": ("default",),
    "set": ("bk_biz_id",),
    "module": ("bk_biz_id",),
}

# The list APIs a resync calls (cmdb-watch-api.md §6): name -> gateway path; the ESB name is the same.
LIST_PATHS: Final[dict[str, str]] = {
    "search_business": "/api/v3/biz/search/{bk_supplier_account}",
    "list_business_set": "/api/v3/findmany/biz_set",
    "search_set": "/api/v3/set/search/{bk_supplier_account}/{bk_biz_id}",
    "search_module": "/api/v3/module/search/{bk_supplier_account}/{bk_biz_id}/{bk_set_id}",
    "list_hosts_without_biz": "/api/v3/hosts/list_hosts_without_app",
    "find_host_biz_relations": "/api/v3/hosts/modules/read",
    "search_cloud_area": "/api/v3/findmany/cloudarea",
    "list_project": "/api/v3/findmany/project",
}


def object_key(resource: str, data: dict[str, Any]) -> str | None:
    """The object's identity as DESIGN.md spells it, or None when the detail lacks an id field."""
    parts = []
    for name in KEY_FIELDS[resource]:
        value = data.get(name)
        if value is None or value == "":
            return None
        parts.append(str(value))
    return ":".join(parts)


# --- error codes (§5.4) ----------------------------------------------------------------------------------

CODE_OK: Final = 0
CODE_CURSOR_EXPIRED: Final = 1103007  # CCErrEventChainNodeNotExist
CODE_DETAIL_NOT_EXIST: Final = 1103008  # CCErrEventDetailNotExist
CODE_START_FROM_INVALID: Final = 1199006  # CCErrCommParamsInvalid
CODE_BAD_OPTIONS: Final = 1199998  # unknown / unrecognised error (validation failures)
CODE_JSON_DECODE: Final = 1199000
CODE_DB_READ: Final = 1199017
CODE_NO_PERMISSION: Final = 9900403
CODE_TOO_MANY_REQUESTS: Final = 1199997
CODE_PROXY_FAILED: Final = 1199036
CODE_PAGE_LIMIT: Final = 1199055  # page.limit above the API's maximum
CODE_INVALID_TENANT: Final = 1100005  # CMDB 3.15 multi-tenant: unknown or missing X-Bk-Tenant-Id (HTTP 200)

# --- the gateway's and the ESB's own codes (§10.4) ----------------------------------------------------------
# The gateway answers in its own format ({code, code_name, message, result: false, data: null}, plus the
# X-Bkapi-Error-Code header) with a real HTTP status; behind the status-rewrite plugin of ESB stages the same
# body arrives with HTTP 200. Clients classify by code, never by status.

GW_INVALID_ARGS: Final = 1640001  # 400
GW_APP_UNAUTHENTICATED: Final = 1640101  # 401: bk_app_code / bk_app_secret wrong or missing
GW_USER_UNAUTHENTICATED: Final = 1640102  # 401: the user could not be verified
GW_APP_NO_PERMISSION: Final = 1640301  # 403: the app is not granted this gateway resource
GW_CROSS_TENANT: Final = 1640302  # 403 CROSS_TENANT_FORBIDDEN: X-Bk-Tenant-Id missing or not the app's tenant
GW_NOT_FOUND: Final = 1640401  # 404: no such resource on the gateway (wrong base URL or stage)
GW_RATE_LIMITED: Final = range(1642901, 1642905)  # 429: 1642901-1642904, no Retry-After
GW_BAD_GATEWAY: Final = range(1650200, 1650300)  # 502: 16502xx
GW_UNAVAILABLE: Final = range(1650300, 1650400)  # 503: 16503xx
GW_TIMEOUT: Final = 1650401  # 504: the backend was slower than the stage timeout
ESB_BACKEND_FAILED: Final = 1306201  # ESB: CMDB unreachable or slower than the ESB's 30 s (always HTTP 200)

# --- cursors (§5.1) --------------------------------------------------------------------------------------

NO_EVENT_CURSOR: Final = "MQ0xDTVlYTZkM2YzOTRjMWY1ZDk4NmU5YmQ4Ng1ub0V2ZW50DTENMQ=="


@dataclass(frozen=True, slots=True)
class Cursor:
    """A decoded cursor: ``version 1 \\r type \\r oid \\r op \\r sec \\r inc \\r uniq``, base64 encoded."""

    type: int
    oid: str
    op: str
    sec: int
    inc: int
    uniq: str = ""

    def encode(self) -> str:
        raw = "\r".join(("1", str(self.type), self.oid, self.op, str(self.sec), str(self.inc), self.uniq))
        return base64.b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> Cursor | None:
    """Decode a cursor, or None when it is not in the server's current seven-field form.

    rwatch never needs to decode a cursor to resume (the server treats it as opaque); it decodes only
    to learn the event's cluster time, which gives the event its version.
    """
    try:
        raw = base64.b64decode(cursor, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    parts = raw.split("\r")
    # Seven fields; the NoEventCursor constant has six (no unique key).
    if len(parts) not in (6, 7) or parts[0] != "1":
        return None
    try:
        return Cursor(int(parts[1]), parts[2], parts[3], int(parts[4]), int(parts[5]), "".join(parts[6:]))
    except ValueError:
        return None


# --- reply ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class WatchEvent:
    cursor: str
    resource: str
    event_type: str
    detail: dict[str, Any]


@dataclass(slots=True)
class WatchReply:
    watched: bool
    events: list[WatchEvent] = field(default_factory=list)

    @property
    def last_cursor(self) -> str | None:
        return self.events[-1].cursor if self.events else None


def parse_watch_data(data: Any, resource: str) -> WatchReply:
    """Turn the ``data`` member of a successful reply into a WatchReply; ValueError if it is malformed.

    The server always sends at least one element (§3.2, §3.3): ``bk_watched: true`` carries the events, and
    ``bk_watched: false`` exactly one cursor-only placeholder. So a reply without ``bk_events``, with an empty
    list or a list that is no list, and a ``bk_watched: false`` reply that carries events are malformed: none
    of them says where the stream stands, and taking one at its word would move the position sideways (an
    empty reply read as "from now" skips what happened since; events under ``bk_watched: false`` are skipped
    as if they were a placeholder). The caller retries with its position unchanged.
    """
    if not isinstance(data, dict):
        raise ValueError("data is not an object")
    watched = data.get("bk_watched")
    if not isinstance(watched, bool):
        raise ValueError("bk_watched is missing or not a boolean")
    if "bk_events" not in data or data["bk_events"] is None:
        raise ValueError("bk_events is missing")
    raw_events = data["bk_events"]
    if not isinstance(raw_events, list):
        raise ValueError("bk_events is not a list")
    if not raw_events:
        raise ValueError("bk_events is empty (the server always sends an event or a placeholder)")
    if not watched and len(raw_events) != 1:
        raise ValueError(f"bk_watched is false but bk_events holds {len(raw_events)} elements, not one placeholder")
    events = []
    for raw in raw_events:
        if not isinstance(raw, dict):
            raise ValueError("an element of bk_events is not an object")
        cursor = raw.get("bk_cursor")
        if not isinstance(cursor, str) or not cursor:
            raise ValueError("an event has no bk_cursor")
        detail = raw.get("bk_detail")
        if detail is None:
            detail = {}
        if not isinstance(detail, dict):
            raise ValueError("bk_detail is not an object")
        event_type = raw.get("bk_event_type") or ""
        if not isinstance(event_type, str):
            raise ValueError("bk_event_type is not a string")
        if not watched and (event_type or detail):
            raise ValueError("bk_watched is false but its element is an event (bk_event_type or bk_detail set), "
                             "not a placeholder")
        events.append(WatchEvent(cursor, str(raw.get("bk_resource") or resource), event_type, detail))
    return WatchReply(watched=watched, events=events)


def watch_body(
    *,
    resource: str,
    fields: Sequence[str],
    event_types: Sequence[str],
    cursor: str | None = None,
    start_from: int | None = None,
    sub_resource: str | None = None,
    supplier_account: str = "0",
) -> dict[str, Any]:
    """The request body, with exactly one start mode (cursor, start time, or neither for "from now")."""
    body: dict[str, Any] = {
        "bk_resource": resource,
        "bk_event_types": list(event_types),
        "bk_fields": list(fields),
        "bk_supplier_account": supplier_account,
    }
    if cursor:
        body["bk_cursor"] = cursor
    elif start_from is not None:
        body["bk_start_from"] = start_from
    if sub_resource:
        body["bk_filter"] = {"bk_sub_resource": sub_resource}
    return body


# Paths (§1.1). Gateway: base_url already includes /api/bk-cmdb/<stage> when going through BK API Gateway.
GATEWAY_WATCH_PATH: Final = "/api/v3/event/watch/resource/{resource}"
ESB_WATCH_PATH: Final = "/api/c/compapi/v2/cc/resource_watch/"
