"""The CMDB HTTP client: both auth styles, error classification, a client-side rate limit.

It makes one attempt per call and raises a typed error; the watcher owns the retry policy
(errors.py says which errors are worth a retry).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from aiolimiter import AsyncLimiter

from rwatch.cmdb import protocol as p
from rwatch.config import CmdbConfig
from rwatch.errors import (
    AuthFailed,
    CmdbError,
    CmdbPermanentError,
    CmdbRateLimited,
    CmdbRefused,
    CmdbTransientError,
    CursorExpired,
    EndpointNotFound,
    GrantMissing,
    PermissionDenied,
    StartOutOfWindow,
    TenantRefused,
)

# Codes that pass: the same request can succeed later (CMDB's own, the gateway's backend trouble, the ESB's
# "CMDB unreachable or slow"). Classified by code whatever the HTTP status: behind the gateway's status-rewrite
# plugin every one of them arrives with HTTP 200 (cmdb-watch-api §10.4).
_TRANSIENT_CODES = frozenset({
    p.CODE_DETAIL_NOT_EXIST, p.CODE_DB_READ, p.CODE_PROXY_FAILED, p.CODE_JSON_DECODE,
    *p.GW_BAD_GATEWAY, *p.GW_UNAVAILABLE, p.GW_TIMEOUT, p.ESB_BACKEND_FAILED,
})
_RATE_LIMIT_CODES = frozenset({p.CODE_TOO_MANY_REQUESTS, *p.GW_RATE_LIMITED})
# Codes that say who was refused; any other code on a 401 / 403 / 404 is read by its status.
_REFUSAL_CODES = frozenset({
    p.CODE_NO_PERMISSION, p.GW_APP_NO_PERMISSION, p.GW_CROSS_TENANT, p.CODE_INVALID_TENANT,
    p.GW_APP_UNAUTHENTICATED, p.GW_USER_UNAUTHENTICATED, p.GW_NOT_FOUND,
})
# A clock more than this far from the server's (by its Date header) is corrected for when choosing start times;
# within it, ``server_now`` may be off by up to this much either way (a resync head subtracts it).
SKEW_ALLOWANCE = 5.0

WATCH_API = "resource_watch"


class Refusals:
    """The refusal errors, each with the fix an operator reads in the log, ``/readyz`` and ``rwatch doctor``."""

    def __init__(self, config: CmdbConfig) -> None:
        self.config = config

    def _tenant_now(self) -> str:
        tid = self.config.tenant_id
        return f"cmdb.tenant_id is {tid!r}" if tid else "cmdb.tenant_id is not set (single-tenant)"

    def build(self, code: int | None, status: int, message: str, *, api: str, resource: str | None,
              permission: Any = None) -> CmdbRefused | None:
        """The refusal for this answer, or None when it is not one."""
        cfg = self.config
        kw: dict[str, Any] = {"code": code, "resource": resource, "api": api, "status": status}
        if code == p.CODE_NO_PERMISSION:
            actions = _permission_actions(permission)
            if not actions and api == WATCH_API and resource in p.IAM_WATCH_ACTIONS:
                actions = [p.IAM_WATCH_ACTIONS[resource]]
            wanted = ", ".join(actions) or "the permission CMDB named"
            what = (f"the IAM action {wanted} (system bk_cmdb)" if api == WATCH_API
                    else f"the IAM permission {wanted} (system bk_cmdb: business view rights for a list API)")
            return PermissionDenied(message or "no permission", permission_actions=actions, **kw,
                                    fix=f"ask the BlueKing administrators to grant user {cfg.username!r} {what}")
        if code == p.GW_APP_NO_PERMISSION or (status == 403 and code not in _REFUSAL_CODES):
            return GrantMissing(message or "the app has no permission to this API", **kw,
                                fix=f"ask the administrators of the API gateway 'bk-cmdb' to grant app "
                                    f"{cfg.app_code!r} the resource {api!r} (or apply for it in the developer "
                                    f"centre)")
        if code in (p.GW_CROSS_TENANT, p.CODE_INVALID_TENANT):
            return TenantRefused(message or "tenant refused", **kw,
                                 fix=f"set cmdb.tenant_id to the tenant app {cfg.app_code!r} belongs to on this "
                                     f"multi-tenant CMDB ({self._tenant_now()})")
        if code == p.GW_APP_UNAUTHENTICATED or (status == 401 and code not in _REFUSAL_CODES):
            return AuthFailed(message or "app authentication failed", **kw,
                              fix="check cmdb.app_code and cmdb.app_secret (the app's code and secret from the "
                                  "BlueKing developer centre)")
        if code == p.GW_USER_UNAUTHENTICATED:
            return AuthFailed(message or "user authentication failed", **kw,
                              fix=f"check cmdb.username ({cfg.username!r} must exist in the user directory"
                                  + ("; on ESB the app must be on the login-free whitelist for bk_username)"
                                     if cfg.api == "esb" else ")"))
        if code == p.GW_NOT_FOUND or (status == 404 and code not in _REFUSAL_CODES):
            return EndpointNotFound(message or f"HTTP {status}", **kw, fix=_base_url_fix(cfg))
        return None


def _base_url_fix(cfg: CmdbConfig) -> str:
    return (f"nothing that speaks CMDB's API answers at cmdb.base_url = {cfg.base_url!r} with cmdb.api = "
            f"{cfg.api!r}: the gateway's base URL ends in /api/bk-cmdb/<stage> (e.g. "
            "https://bkapi.example.com/api/bk-cmdb/prod, cmdb.api = 'apigw'); the ESB's is the PaaS host "
            "(cmdb.api = 'esb')")


def _permission_actions(permission: Any) -> list[str]:
    """The IAM action ids a 9900403 reply's ``permission`` object names."""
    if not isinstance(permission, dict) or not isinstance(permission.get("actions"), list):
        return []
    return [str(a["id"]) for a in permission["actions"] if isinstance(a, dict) and a.get("id")]


def classify(code: int, message: str, resource: str | None, *, status: int = 200) -> CmdbError:
    """The typed error for a ``result: false`` reply that is not a refusal (``Refusals.build`` goes first)."""
    kw: dict[str, Any] = {"code": code, "resource": resource}
    if code == p.CODE_CURSOR_EXPIRED:
        return CursorExpired(message or "cursor not found or expired", **kw)
    if code == p.CODE_START_FROM_INVALID:
        return StartOutOfWindow(message or "bk_start_from outside the retention window", **kw)
    if code in _RATE_LIMIT_CODES:
        return CmdbRateLimited(message or "too many requests", **kw, status=status)
    if code in _TRANSIENT_CODES:
        return CmdbTransientError(message or f"error {code}", **kw, status=status, reason="backend")
    if status >= 500:  # an unknown code on a failing backend: it may pass
        return CmdbTransientError(message or f"error {code}", **kw, status=status, reason="http_5xx")
    if status == 429:
        return CmdbRateLimited(message or "too many requests", **kw, status=status)
    return CmdbPermanentError(message or f"CMDB error {code}", **kw, status=status)


def rate_limiter(rate: float) -> AsyncLimiter | None:
    """The client-side limit shared by every resource: calls spaced ``1/rate`` seconds apart, no burst credit
    kept while idle (a bucket of one); None when ``rate`` is 0 (off)."""
    return AsyncLimiter(1, 1.0 / rate) if rate > 0 else None


class CmdbClient:
    """One aiohttp session to CMDB, through the API gateway (``apigw``) or the legacy ESB (``esb``)."""

    def __init__(self, config: CmdbConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self._session = session
        self._owns_session = session is None
        self._limiter = rate_limiter(config.rate_limit)
        self.skew = 0.0  # server clock minus ours, from the Date header, when it is off by more than a few seconds
        self.measured_skew: float | None = None  # the last Date header's difference, however small (doctor)
        self.refusals = Refusals(config)
        auth = {"bk_app_code": config.app_code, "bk_app_secret": config.app_secret.get_secret_value(),
                "bk_username": config.username}
        self._auth = auth
        # Each value goes where the server reads it (cmdb-watch-api §1.3, §10.2): the supplier account in the body
        # (and the URL segment of some list APIs) and its header; the tenant id only on a multi-tenant CMDB.
        common = {"X-Bkcmdb-Supplier-Account": config.supplier_account, "Content-Type": "application/json"}
        if config.tenant_id is not None:
            common["X-Bk-Tenant-Id"] = config.tenant_id
        self._gateway_headers = {"X-Bkapi-Authorization": orjson.dumps(auth).decode(), **common}
        self._esb_headers = common

    async def __aenter__(self) -> CmdbClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=bool(self.config.verify_tls), limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def server_now(self) -> float:
        """Our best estimate of the server's clock (start times must fall inside *its* window)."""
        return time.time() + self.skew

    async def watch(
        self,
        resource: str,
        *,
        fields: Sequence[str],
        event_types: Sequence[str],
        cursor: str | None = None,
        start_from: int | None = None,
        sub_resource: str | None = None,
    ) -> p.WatchReply:
        body = p.watch_body(
            resource=resource, fields=fields, event_types=event_types, cursor=cursor,
            start_from=start_from, sub_resource=sub_resource,
            supplier_account=self.config.supplier_account,
        )
        if self.config.api == "esb":
            url = self.config.base_url + p.ESB_WATCH_PATH
        else:
            url = self.config.base_url + p.GATEWAY_WATCH_PATH.format(resource=resource)
        data = await self.call(url, body, resource=resource, api=WATCH_API)
        try:
            return p.parse_watch_data(data, resource)
        except ValueError as exc:
            # Retried with the position unchanged, never read as "from now": what the server meant is unknown.
            raise CmdbTransientError(f"malformed watch reply: {exc}", resource=resource, reason="malformed",
                                     data=orjson.dumps(data).decode(errors="replace")[:300]) from None

    def api_url(self, gateway_path: str, esb_name: str) -> str:
        """The URL of a list API: its gateway path, or its ESB component name."""
        if self.config.api == "esb":
            return f"{self.config.base_url}/api/c/compapi/v2/cc/{esb_name}/"
        return self.config.base_url + gateway_path

    async def call(self, url: str, body: dict[str, Any], *, resource: str | None = None,
                   api: str = WATCH_API) -> Any:
        """POST one request; return ``data`` of a successful reply or raise a classified error (``api`` names the
        API in a refusal's fix)."""
        if self.config.api == "esb":
            body = {**self._auth, **body}
            headers = self._esb_headers
        else:
            headers = self._gateway_headers
        if self._limiter is not None:
            await self._limiter.acquire()
        try:
            async with self.session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                raw = await resp.read()
                self._note_date(resp.headers.get("Date"))
                status = resp.status
                header_code = resp.headers.get("X-Bkapi-Error-Code")
        except TimeoutError:
            raise CmdbTransientError("request timed out", resource=resource, reason="timeout") from None
        except aiohttp.ClientError as exc:
            raise CmdbTransientError(f"connection failed: {exc.__class__.__name__}: {exc}",
                                     resource=resource, reason="connection") from None
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            raise self._not_json(raw, status, header_code, resource=resource, api=api, url=url)
        code: Any = reply.get("code", reply.get("bk_error_code"))
        if code is None and header_code and header_code.isdigit():
            code = int(header_code)
        if code is not None and not isinstance(code, int):
            raise CmdbTransientError("reply has a non-integer code", resource=resource, reason="malformed")
        message = str(reply.get("message") or reply.get("bk_error_msg") or "")
        if status == 200 and reply.get("result") is not False and not code:
            return reply.get("data")
        refused = self.refusals.build(code, status, message, api=api, resource=resource,
                                      permission=reply.get("permission"))
        if refused is not None:
            raise refused
        if code:
            raise classify(code, message, resource, status=status)
        if status >= 500 or status == 429:
            raise classify(0, message or f"HTTP {status}", resource, status=status)
        raise CmdbPermanentError(message or f"HTTP {status} from CMDB", resource=resource, status=status, code=code)

    def _not_json(self, raw: bytes, status: int, header_code: str | None, *, resource: str | None, api: str,
                  url: str) -> CmdbError:
        """The error for a body that is not a JSON object: a gateway's HTML page, a proxy's, a cut reply."""
        code = int(header_code) if header_code and header_code.isdigit() else None
        refused = self.refusals.build(code, status, f"HTTP {status} from {url}", api=api, resource=resource)
        if refused is not None:
            return refused
        if status == 429:
            return CmdbRateLimited(f"HTTP {status} from CMDB", resource=resource, status=status)
        if status >= 500:
            return CmdbTransientError(f"HTTP {status} from CMDB", resource=resource, status=status,
                                      reason="http_5xx")
        if status != 200:
            return CmdbPermanentError(f"HTTP {status} from CMDB", resource=resource, status=status)
        text = raw[:200].decode(errors="replace")
        # A web page at 200 is usually a login or portal page: say where to look, but retry (a proxy hiccup can
        # look the same, and a reply cut mid-way is plain transient).
        hint = " (an HTML page: is cmdb.base_url the API gateway or ESB, not a web UI?)" \
            if text.lstrip().startswith("<") else ""
        return CmdbTransientError(f"reply is not JSON{hint}", resource=resource, reason="malformed", body=text)

    def _note_date(self, header: str | None) -> None:
        if not header:
            return
        try:
            server = parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        skew = server - time.time()
        self.measured_skew = skew
        self.skew = skew if abs(skew) > SKEW_ALLOWANCE else 0.0
