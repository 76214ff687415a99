"""The demo's Zabbix: the ``--zabbix`` options, the check before the start, its prefix cleared, its line in the view.

The demo owns its prefix (``BK-demo`` unless ``--zabbix-prefix`` says otherwise) the way it owns its files: what
an earlier demo left under it is removed at the start, and what this one made at the exit (unless
``--zabbix-keep``). Its hosts carry the managed tag ``rwatch-demo=<prefix>`` and names with the prefix in them,
so even a prefix that a production rwatch uses would not let the demo touch, adopt or collide with that rwatch's
hosts; only groups under the prefix that no host is left in are removed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from rwatch.sinks.zabbix.api import ApiVersion, ZabbixApi

SINK = "zabbix"
API_FILE = "api_jsonrpc.php"
DEFAULT_PREFIX = "BK-demo"  # never production's "BK": a demo cannot rename or empty a real rwatch's groups
DEFAULT_USER, DEFAULT_PASSWORD = "Admin", "zabbix"  # the account a fresh Zabbix comes with
MANAGED_TAG = "rwatch-demo"  # not "rwatch": hosts a production rwatch manages are never the demo's
CHECK_SECONDS = 15.0


class ZabbixUnusable(Exception):
    """A reason the demo cannot use the Zabbix it was given, said in one line."""


def api_url(url: str) -> str:
    """The API endpoint for a frontend URL (``http://host:8080/``, ``.../zabbix``, ``.../index.php``) or the
    endpoint itself; ValueError for anything but http(s)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL of Zabbix's frontend or of its {API_FILE}")
    path = parts.path
    if path.endswith(".php"):  # the endpoint, or a page of the frontend: its folder is the frontend's
        path = path.rsplit("/", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, path.rstrip("/") + "/" + API_FILE, "", ""))


@dataclass(frozen=True)
class DemoZabbix:
    """Where the demo's zabbix sink writes, and how it logs in."""

    url: str  # the API endpoint
    prefix: str = DEFAULT_PREFIX
    token: str | None = None
    username: str | None = DEFAULT_USER
    password: str | None = DEFAULT_PASSWORD
    keep: bool = False

    @property
    def frontend(self) -> str:
        return self.url[: -len(API_FILE)]

    @property
    def login(self) -> str:
        return "an API token" if self.token else f"user {self.username}"

    def groups_page(self, version: ApiVersion) -> str:
        """The frontend's host group list filtered to the prefix (its page moved in 6.4)."""
        query = f"filter_name={quote(self.prefix)}&filter_set=1"
        if (version.major, version.minor) >= (6, 4):
            return f"{self.frontend}zabbix.php?action=hostgroup.list&{query}"
        return f"{self.frontend}hostgroups.php?{query}"

    def sink(self, source: str) -> dict[str, Any]:
        """The ``[sinks.zabbix]`` table the demo embeds."""
        escaped = self.prefix.replace("{", "{{").replace("}", "}}")  # the name templates are format strings
        auth: dict[str, Any] = {"token": self.token} if self.token else {
            "username": self.username, "password": self.password}
        return {"kind": "zabbix", "source": source, "url": self.url, **auth, "group_prefix": self.prefix,
                "managed_tag": MANAGED_TAG, "technical_name": f"{escaped}-{{bk_host_id}}",
                "visible_name": f"{{label}} ({escaped}-{{bk_host_id}})",
                # The simulator deletes hosts all the time: gone from Zabbix rather than piling up disabled.
                "on_delete": "delete", "timeout": 10.0}

    def client(self) -> ZabbixApi:
        from rwatch.sinks.zabbix.api import ZabbixApi

        return ZabbixApi(self.url, token=self.token, username=None if self.token else self.username,
                         password=None if self.token else self.password, timeout=CHECK_SECONDS)


async def check_zabbix(zabbix: DemoZabbix) -> tuple[ApiVersion, int]:
    """Log in once before anything starts (a wrong URL or password is said at once, in one line), and clear what
    an earlier demo left under the prefix; Zabbix's version and the hosts removed."""
    from rwatch.sinks.zabbix.api import ZabbixApiError, ZabbixUnavailable

    api = zabbix.client()
    try:
        try:
            async with asyncio.timeout(CHECK_SECONDS * 2):
                await api.open()
                # A token is first used here (a password was used by open): a refused one is said as such.
                await api.call("hostgroup.get", {"output": ["groupid"], "limit": 1})
        except (ZabbixUnavailable, TimeoutError) as exc:
            raise ZabbixUnusable(f"--zabbix: cannot reach Zabbix's API at {zabbix.url}: {_cause(exc)}") from None
        except ZabbixApiError as exc:
            if exc.method == "apiinfo.version":  # an answer, but not the API's: a wrong path, a proxy
                http = str(exc).startswith(f"{exc.method}: HTTP ")  # the page's HTML says nothing more
                said = f"{exc.method}: HTTP {exc.code}" if http else _line(exc)
                raise ZabbixUnusable(f"--zabbix: {zabbix.url} is not Zabbix's API: {said}") from None
            what = "the API token" if zabbix.token else f"the login as {zabbix.username}"
            raise ZabbixUnusable(f"--zabbix: Zabbix at {zabbix.url} refused {what}: {_line(exc)}") from None
        assert api.version is not None
        try:
            return api.version, await _clear(api, zabbix.prefix)
        except (ZabbixApiError, ZabbixUnavailable) as exc:
            raise ZabbixUnusable(f"--zabbix: cannot clear the prefix {zabbix.prefix!r} at {zabbix.url}: "
                            f"{_line(exc)}") from None
    finally:
        await api.close()


def _cause(exc: BaseException) -> str:
    """What went wrong underneath, in words: aiohttp's own text rather than the repr the API error carries."""
    cause = exc.__cause__ or exc
    return _line(cause) or type(cause).__name__


def _line(exc: BaseException, limit: int = 300) -> str:
    return _clip(str(exc), limit)


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def remove_demo(zabbix: DemoZabbix) -> int:
    """At the exit: the demo's hosts and the groups it leaves empty; the hosts removed."""
    api = zabbix.client()
    await api.open()
    try:
        return await _clear(api, zabbix.prefix)
    finally:
        await api.close()


async def _clear(api: ZabbixApi, prefix: str) -> int:
    hosts = await api.call("host.get", {"output": ["hostid"],
                                        "tags": [{"tag": MANAGED_TAG, "value": prefix, "operator": 1}]})
    if hosts:
        await api.call("host.delete", [h["hostid"] for h in hosts])
    groups = await api.call("hostgroup.get", {"output": ["groupid", "name"], "search": {"name": prefix},
                                              "startSearch": True, "selectHosts": ["hostid"]})
    empty = [g["groupid"] for g in groups
             if (g["name"] == prefix or g["name"].startswith(prefix + "/")) and not g["hosts"]]
    if empty:
        await api.call("hostgroup.delete", empty)
    return len(hosts)


@dataclass
class ZabbixState:
    """The zabbix sink as its metrics and the process's recent errors show it."""

    hosts: int = 0
    reconciles: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0
    last_error: str | None = None
    failing: bool = False  # the last reconcile seen failed (Zabbix away or refusing: the sink retries)
    changed_at: float | None = None  # monotonic time the reconciles were last seen to grow
    last_calls: int = 0  # API calls made since the sample before that

    def text(self) -> str:
        ago = "" if self.changed_at is None else f" (last {self.last_calls} calls, " \
                                                 f"{time.monotonic() - self.changed_at:.0f} s ago)"
        line = (f"zabbix hosts={self.hosts} reconciles={self.reconciles}{ago} calls={self.reads}r/{self.writes}w "
                f"errors={self.errors}")
        return line + (f" failing, retrying: {self.last_error}" if self.failing and self.last_error else "")


@dataclass
class ZabbixWatch:
    """Samples the zabbix sink's state for the live view."""

    state: ZabbixState = field(default_factory=ZabbixState)

    def sample(self) -> ZabbixState:
        from prometheus_client import REGISTRY

        from rwatch.error_tap import recent_errors

        def value(name: str, **labels: str) -> int:
            return int(REGISTRY.get_sample_value(name, {"sink": SINK, **labels}) or 0)

        before = self.state
        now = ZabbixState(hosts=value("rwatch_zabbix_hosts"), reconciles=value("rwatch_zabbix_reconciles_total"),
                          reads=value("rwatch_zabbix_api_calls_total", kind="read"),
                          writes=value("rwatch_zabbix_api_calls_total", kind="write"),
                          errors=value("rwatch_zabbix_errors_total"),
                          changed_at=before.changed_at, last_calls=before.last_calls, failing=before.failing)
        tried, failed = now.reconciles - before.reconciles, now.errors - before.errors
        if failed:
            now.failing = failed >= tried
        elif tried:
            now.failing = False
        if now.reconciles > before.reconciles:
            now.changed_at = time.monotonic()
            now.last_calls = now.reads + now.writes - before.reads - before.writes
        errors = [e for e in recent_errors() if str(e.get("event") or "").startswith("zabbix")]
        now.last_error = _clip(str(errors[0]["error"])) if errors else None
        self.state = now
        return now
