"""An async JSON-RPC client for Zabbix's API (6.0 LTS; 6.2, 6.4 and 7.x by their version), counting its calls.

``open()`` reads ``apiinfo.version`` first (it needs no authentication), then authenticates: an API token is used
as it stands, a username and password log in (and ``close()`` logs out). From the version come the differences
the sink meets: the token travels in the ``auth`` field until 6.2 and in an ``Authorization: Bearer`` header from
6.4 (7.2 removed the field); hosts' groups are selected with ``selectHostGroups`` (answered as ``hostgroups``)
from 6.2 and ``selectGroups`` (``groups``) before; a host's proxy is ``proxy_hostid`` until 6.4 and ``proxyid``
with ``monitored_by`` from 7.0, where a proxy's name is ``name`` instead of ``host``.

Errors, named for what the caller does: the transport failing, a timeout, a 5xx, an answer that is not JSON-RPC
or a failed SQL statement (a deadlock, a concurrent insert) raise ``ZabbixUnavailable`` (a TransientError: the
same call may pass later). Zabbix's "already exists" raises ``AlreadyExists`` and its "does not exist" (which
Zabbix words as missing permissions too, on purpose) ``DoesNotExist``: outcomes a reconcile absorbs (a concurrent
change, a retry after a crash). Every other error answer raises ``ZabbixApiError`` (a PermanentError) naming
the method with Zabbix's message and data. A session that expired is logged in again once, when the client has a
password to do it with. Secrets are never logged nor shown by ``repr``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from rwatch.errors import PermanentError, TransientError
from rwatch.logs import get_logger

# Zabbix refuses authentication on these ("must be called without the auth parameter").
NO_AUTH = frozenset({"apiinfo.version", "user.login", "user.checkAuthentication"})
READS = frozenset({"apiinfo.version", "user.checkAuthentication"})  # besides every "*.get"
_SNIPPET = 300  # characters of a non-JSON answer kept for the error
_EXPIRED = ("session terminated", "not authorised", "not authorized")

log = get_logger("rwatch.sinks.zabbix")


class ZabbixUnavailable(TransientError):
    """Zabbix did not answer usefully now (transport, timeout, 5xx, not JSON-RPC, a failed SQL statement)."""

    def __init__(self, message: str, *, method: str, **fields: Any) -> None:
        super().__init__(message, method=method, **fields)
        self.method = method


class ZabbixApiError(PermanentError):
    """Zabbix answered the call with an error; ``method``, ``code`` and Zabbix's ``data`` say which and why."""

    def __init__(self, method: str, code: int, message: str, data: str) -> None:
        super().__init__(f"{method}: {message} {data}".strip(), method=method, code=code, data=data)
        self.method, self.code, self.data = method, code, data


class AlreadyExists(ZabbixApiError):
    """An outcome: what the call would create already exists (its name is taken)."""


class DoesNotExist(ZabbixApiError):
    """An outcome: an object the call names does not exist (or is not visible to this user: Zabbix says both)."""


def classify(method: str, code: int, message: str, data: str) -> ZabbixApiError | ZabbixUnavailable:
    """The exception for one error answer of Zabbix."""
    text = f"{message} {data}".lower()
    if "already exists" in text:
        return AlreadyExists(method, code, message, data)
    if ("does not exist" in text or "no permissions to referred object" in text
            or "do not have permission to perform this operation" in text):
        return DoesNotExist(method, code, message, data)
    if "sql statement execution has failed" in text or "database error" in text:
        return ZabbixUnavailable(f"{method}: {data or message}", method=method, code=code)
    return ZabbixApiError(method, code, message, data)


@dataclass(frozen=True, slots=True)
class ApiVersion:
    """What ``apiinfo.version`` answered, and the API differences that follow from it."""

    major: int
    minor: int
    text: str

    @classmethod
    def parse(cls, text: str) -> ApiVersion:
        parts = text.split(".")
        try:
            return cls(int(parts[0]), int(parts[1]), text)
        except (IndexError, ValueError):
            raise ZabbixApiError("apiinfo.version", 0, "unexpected version", text) from None

    @property
    def bearer(self) -> bool:
        """6.4 takes the token in ``Authorization: Bearer`` (the ``auth`` field is gone in 7.2)."""
        return (self.major, self.minor) >= (6, 4)

    @property
    def groups_key(self) -> str:
        """Where host.get puts a host's groups: ``hostgroups`` from 6.2 (template groups split off)."""
        return "hostgroups" if (self.major, self.minor) >= (6, 2) else "groups"

    @property
    def proxy_key(self) -> str:
        """A host's proxy field: ``proxyid`` from 7.0, ``proxy_hostid`` before."""
        return "proxyid" if self.major >= 7 else "proxy_hostid"

    @property
    def proxy_name_key(self) -> str:
        """A proxy's name field: ``name`` from 7.0, ``host`` before."""
        return "name" if self.major >= 7 else "host"


class ZabbixApi:
    """One Zabbix API endpoint: ``open()``, then ``call(method, params)``; ``calls`` counts every call by method."""

    def __init__(self, url: str, *, token: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 30.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        if not token and not (username and password):
            raise ValueError("Zabbix needs a token, or a username and a password")
        self.url = url
        self._token = token or ""
        self._username = username
        self._password = password
        self._logged_in = False  # a session of ours, to end at close (a token is the operator's)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None
        self._ids = itertools.count(1)
        self.version: ApiVersion | None = None
        self.calls: Counter[str] = Counter()

    def __repr__(self) -> str:
        auth = "token" if not self._username else f"user {self._username!r}"
        return f"ZabbixApi({self.url!r}, {auth}, version={self.version.text if self.version else None})"

    @property
    def api_version(self) -> ApiVersion:
        if self.version is None:
            raise RuntimeError("ZabbixApi.open() was not awaited")
        return self.version

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def write_calls(self) -> int:
        """Calls that may change something (everything but reads)."""
        return sum(n for method, n in self.calls.items() if not is_read(method))

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            self.version = ApiVersion.parse(await self.call("apiinfo.version", {}))
            if self._username:
                await self._login()
        except BaseException:
            await self.close()  # `async with` does not exit what did not enter: the session would leak
            raise
        log.info("zabbix_connected", url=self.url, version=self.version.text,
                 auth="token" if not self._username else "password", user=self._username)

    async def close(self) -> None:
        try:
            if self._logged_in:
                self._logged_in = False
                try:
                    await self.call("user.logout", [])
                except (ZabbixApiError, ZabbixUnavailable) as exc:  # the session expires by itself anyway
                    log.warning("zabbix_logout_failed", **exc.fields())
        finally:
            if self._own_session and self._session is not None:
                await self._session.close()
            self._session = None

    async def __aenter__(self) -> ZabbixApi:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _login(self) -> None:
        self._token = ""
        self._token = await self.call("user.login", {"username": self._username, "password": self._password})
        self._logged_in = True

    async def call(self, method: str, params: Any = None) -> Any:
        """One JSON-RPC call: its result, or one of this module's errors."""
        try:
            return await self._call(method, {} if params is None else params)
        except ZabbixApiError as exc:
            if not (self._logged_in and method not in NO_AUTH and _expired(exc)):
                raise
        log.info("zabbix_relogin", url=self.url, method=method)
        await self._login()
        return await self._call(method, {} if params is None else params)

    async def _call(self, method: str, params: Any) -> Any:
        if self._session is None:
            raise RuntimeError("ZabbixApi.open() was not awaited")
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params, "id": next(self._ids)}
        headers = {"Content-Type": "application/json-rpc"}
        if self._token and method not in NO_AUTH:
            if self.version is not None and self.version.bearer:
                headers["Authorization"] = f"Bearer {self._token}"
            else:
                body["auth"] = self._token
        self.calls[method] += 1
        try:
            async with self._session.post(self.url, data=orjson.dumps(body), headers=headers,
                                          timeout=self._timeout) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ZabbixUnavailable(f"{method}: {exc!r}", method=method) from exc
        if status >= 500:
            raise ZabbixUnavailable(f"{method}: HTTP {status}", method=method, status=status,
                                    body=_snippet(raw))
        if status >= 400:  # a wrong URL, a proxy refusing: nothing a retry changes
            raise ZabbixApiError(method, status, f"HTTP {status}", _snippet(raw))
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # PHP's own error pages come as 200 text; a proxy's maintenance page too
            raise ZabbixUnavailable(f"{method}: the answer is not JSON", method=method, status=status,
                                    body=_snippet(raw)) from None
        if not isinstance(answer, dict) or ("result" not in answer and "error" not in answer):
            raise ZabbixUnavailable(f"{method}: the answer is not JSON-RPC", method=method, body=_snippet(raw))
        if "error" in answer:
            err = answer["error"] if isinstance(answer["error"], dict) else {}
            raise classify(method, int(err.get("code", 0)), str(err.get("message", "")), str(err.get("data", "")))
        return answer["result"]

    # --- the version's differences, for the callers ------------------------------------------------------

    def select_groups(self, output: list[str]) -> dict[str, Any]:
        """The host.get parameter that selects each host's groups."""
        key = "selectHostGroups" if self.api_version.groups_key == "hostgroups" else "selectGroups"
        return {key: output}

    def groups_of(self, host: dict[str, Any]) -> list[dict[str, Any]]:
        """The groups host.get answered for one host (``select_groups`` asked for them)."""
        found: list[dict[str, Any]] = host.get(self.api_version.groups_key) or []
        return found

    def proxy_of(self, host: dict[str, Any]) -> str:
        """A host's proxy id as host.get answered it, "0" for none."""
        return str(host.get(self.api_version.proxy_key) or "0")

    def proxy_fields(self, proxyid: str) -> dict[str, Any]:
        """The host.create / host.update fields that set a host's proxy ("0": monitored by the server)."""
        if self.api_version.major >= 7:
            return {"monitored_by": 1, "proxyid": proxyid} if proxyid != "0" else {"monitored_by": 0}
        return {"proxy_hostid": proxyid}

    def host_output(self) -> list[str]:
        return ["hostid", "host", "name", "status", self.api_version.proxy_key]


def is_read(method: str) -> bool:
    return method.endswith(".get") or method in READS


def _expired(exc: ZabbixApiError) -> bool:
    text = f"{exc.message} {exc.data}".lower()
    return any(word in text for word in _EXPIRED)


def _snippet(raw: bytes) -> str:
    return raw[:_SNIPPET].decode("utf-8", "replace")
