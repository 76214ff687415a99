"""The CMDB HTTP client: both auth styles, error classification, a client-side rate limit.

It makes one attempt per call and raises a typed error; the watcher owns the retry policy
(errors.py says which errors are worth a retry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from rwatch.cmdb import protocol as p
from rwatch.config import CmdbConfig
from rwatch.errors import (
    CmdbError,
    CmdbPermanentError,
    CmdbRateLimited,
    CmdbTransientError,
    CursorExpired,
    PermissionDenied,
    StartOutOfWindow,
)

# Codes that pass: the same request can succeed later.
_TRANSIENT_CODES = {
    p.CODE_DETAIL_NOT_EXIST, p.CODE_DB_READ, p.CODE_PROXY_FAILED, p.CODE_JSON_DECODE,
}
# A clock more than this far from the server's (by its Date header) is corrected for when choosing start times.
_SKEW_THRESHOLD = 5.0


def classify(code: int, message: str, resource: str | None) -> CmdbError:
    """The typed error for a ``result: false`` reply."""
    kw: dict[str, Any] = {"code": code, "resource": resource}
    if code == p.CODE_CURSOR_EXPIRED:
        return CursorExpired(message or "cursor not found or expired", **kw)
    if code == p.CODE_START_FROM_INVALID:
        return StartOutOfWindow(message or "bk_start_from outside the retention window", **kw)
    if code == p.CODE_TOO_MANY_REQUESTS:
        return CmdbRateLimited(message or "too many requests", **kw)
    if code == p.CODE_NO_PERMISSION:
        return PermissionDenied(message or "no permission", **kw)
    if code in _TRANSIENT_CODES:
        return CmdbTransientError(message, **kw)
    return CmdbPermanentError(message or f"CMDB error {code}", **kw)


class RateLimiter:
    """Spaces calls at least ``1/rate`` seconds apart, shared by every resource (0 = unlimited)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._clock = clock

    async def acquire(self) -> None:
        if not self._interval:
            return
        now = self._clock()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class CmdbClient:
    """One aiohttp session to CMDB, through the API gateway (``apigw``) or the legacy ESB (``esb``)."""

    def __init__(self, config: CmdbConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self._session = session
        self._owns_session = session is None
        self._limiter = RateLimiter(config.rate_limit)
        self.skew = 0.0  # server clock minus ours, from the Date header, when it is off by more than a few seconds
        auth = {"bk_app_code": config.app_code, "bk_app_secret": config.app_secret.get_secret_value(),
                "bk_username": config.username}
        self._auth = auth
        self._gateway_headers = {
            "X-Bkapi-Authorization": orjson.dumps(auth).decode(),
            "X-Bkcmdb-Supplier-Account": config.tenant,
            "X-Bk-Tenant-Id": config.tenant,
            "Content-Type": "application/json",
        }
        self._esb_headers = {
            "X-Bkcmdb-Supplier-Account": config.tenant,
            "X-Bk-Tenant-Id": config.tenant,
            "Content-Type": "application/json",
        }

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
            start_from=start_from, sub_resource=sub_resource, supplier_account=self.config.tenant,
        )
        if self.config.api == "esb":
            url = self.config.base_url + p.ESB_WATCH_PATH
        else:
            url = self.config.base_url + p.GATEWAY_WATCH_PATH.format(resource=resource)
        data = await self.call(url, body, resource=resource)
        try:
            return p.parse_watch_data(data, resource)
        except ValueError as exc:
            raise CmdbTransientError(f"malformed watch reply: {exc}", resource=resource,
                                     reason="malformed") from None

    def api_url(self, gateway_path: str, esb_name: str) -> str:
        """The URL of a list API: its gateway path, or its ESB component name."""
        if self.config.api == "esb":
            return f"{self.config.base_url}/api/c/compapi/v2/cc/{esb_name}/"
        return self.config.base_url + gateway_path

    async def call(self, url: str, body: dict[str, Any], *, resource: str | None = None) -> Any:
        """POST one request; return ``data`` of a successful reply or raise a classified error."""
        if self.config.api == "esb":
            body = {**self._auth, **body}
            headers = self._esb_headers
        else:
            headers = self._gateway_headers
        await self._limiter.acquire()
        try:
            async with self.session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                raw = await resp.read()
                self._note_date(resp.headers.get("Date"))
                status = resp.status
        except TimeoutError:
            raise CmdbTransientError("request timed out", resource=resource, reason="timeout") from None
        except aiohttp.ClientError as exc:
            raise CmdbTransientError(f"connection failed: {exc.__class__.__name__}: {exc}",
                                     resource=resource, reason="connection") from None
        if status == 429:
            raise CmdbRateLimited("HTTP 429 from CMDB", resource=resource, status=status)
        if status >= 500:
            raise CmdbTransientError(f"HTTP {status} from CMDB", resource=resource, status=status,
                                     reason="http_5xx")
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            if status != 200:
                raise CmdbPermanentError(f"HTTP {status} from CMDB", resource=resource, status=status) from None
            raise CmdbTransientError("reply is not JSON", resource=resource, reason="malformed",
                                     body=raw[:200].decode(errors="replace")) from None
        if not isinstance(reply, dict):
            raise CmdbTransientError("reply is not a JSON object", resource=resource, reason="malformed")
        code = reply.get("code", reply.get("bk_error_code", 0))
        if status != 200:
            message = str(reply.get("message") or reply.get("bk_error_msg") or f"HTTP {status}")
            raise CmdbPermanentError(message, resource=resource, status=status, code=code)
        if reply.get("result") is False or (isinstance(code, int) and code != 0):
            message = str(reply.get("message") or reply.get("bk_error_msg") or "")
            if not isinstance(code, int):
                raise CmdbTransientError("reply has a non-integer code", resource=resource, reason="malformed")
            raise classify(code, message, resource)
        return reply.get("data")

    def _note_date(self, header: str | None) -> None:
        if not header:
            return
        try:
            server = parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        skew = server - time.time()
        self.skew = skew if abs(skew) > _SKEW_THRESHOLD else 0.0
