"""``rwatch doctor``: one run against a real CMDB before ``rwatch run``, a verdict and a fix for every line.

It asks what rwatch will ask, the way rwatch asks it (the same client, the same paging), and reads each answer
as the daemon would: reachability and the channel (a 404 or a web page where the API should be), the
credentials, the tenant header, the clock (``Date``), the gateway grant and the IAM ``watch_*_event`` action of
every enabled resource, every list API a resync of them uses (answers, and pages: ids that advance, the count
where the API gives one), and whether the configured user sees every business (compared with what the biz
stream showed in the retention window and what a running rwatch recorded). Secrets are never printed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from tenacity import retry_if_exception, wait_exponential

from rwatch.cmdb import protocol as p
from rwatch.cmdb.client import CmdbClient
from rwatch.cmdb.listing import ListApi
from rwatch.config import Config
from rwatch.doctor.lists import RESYNC_APIS, listed_businesses, probe_api
from rwatch.doctor.report import Report, Verdict
from rwatch.errors import (
    AuthFailed,
    CmdbError,
    CmdbRefused,
    CmdbTransientError,
    EndpointNotFound,
    ListingBroken,
    RwatchError,
    TenantRefused,
)
from rwatch.events import iso_utc
from rwatch.retry import retrying
from rwatch.store.base import open_store
from rwatch.watch.resync import Resyncer

T = TypeVar("T")

WINDOW_PAGES: Final = 50  # at most this many biz-stream pages are read for the visibility check
ATTEMPTS: Final = 4  # a transient failure (a rate limit, a backend hiccup) is tried this often per request


class Doctor:
    """The checks, in order, against one CMDB client; each adds its lines to ``report``."""

    def __init__(self, config: Config, client: CmdbClient, resources: list[str]) -> None:
        self.config = config
        self.client = client
        self.resources = resources
        self.stop = asyncio.Event()
        self.lists = ListApi(client, self.stop, 1)
        cfg = config.cmdb
        self.report = Report({"base_url": cfg.base_url, "api": cfg.api, "app_code": cfg.app_code,
                              "username": cfg.username, "supplier_account": cfg.supplier_account,
                              "tenant_id": cfg.tenant_id, "resources": resources})

    async def run(self) -> Report:
        if not await self.connect():
            return self.report
        self.clock()
        for resource in self.resources:
            await self.watch(resource)
        await self.list_apis()
        await self.businesses()
        return self.report

    # --- the first request: reach, channel, credentials, tenant ------------------------------------------

    async def connect(self) -> bool:
        """One from-now watch of the first resource; False when nothing else can be checked."""
        add, cfg = self.report.add, self.config.cmdb
        resource = self.resources[0] if self.resources else "biz"
        channel = "API gateway" if cfg.api == "apigw" else "ESB"
        try:
            await self._retry(lambda: self._watch(resource))
        except CmdbTransientError as exc:
            if exc.extra.get("reason") in ("connection", "timeout"):
                add("reach", cfg.base_url, "fail", exc.message,
                    "check cmdb.base_url, DNS, the firewall and TLS (cmdb.verify_tls)")
                return self._skip_rest("CMDB cannot be reached")
            add("reach", cfg.base_url, "ok", "something answers")
            if exc.extra.get("reason") == "malformed":
                add("channel", channel, "fail", exc.message, _channel_fix(cfg.base_url, cfg.api), exc.code)
                return self._skip_rest("the answer is not CMDB's API")
            add("channel", channel, "warn", f"answered with a transient failure: {exc.message}",
                "run doctor again; if it persists the gateway or CMDB backend is failing", exc.code)
            return self._skip_rest("CMDB failed transiently")
        except EndpointNotFound as exc:
            add("reach", cfg.base_url, "ok", "something answers")
            add("channel", channel, "fail", exc.message, exc.fix, exc.code)
            return self._skip_rest("nothing that speaks CMDB's API answers at this URL")
        except AuthFailed as exc:
            add("reach", cfg.base_url, "ok", "something answers")
            add("channel", channel, "ok", "answers in CMDB's format")
            add("credentials", f"app {cfg.app_code!r}, user {cfg.username!r}", "fail", exc.message, exc.fix, exc.code)
            return self._skip_rest("the credentials were refused")
        except TenantRefused as exc:
            add("reach", cfg.base_url, "ok", "something answers")
            add("channel", channel, "ok", "answers in CMDB's format")
            # CMDB's own 1100005 comes after the gateway accepted the app; the gateway's 1640302 may come first.
            verified = exc.code == p.CODE_INVALID_TENANT
            add("credentials", f"app {cfg.app_code!r}, user {cfg.username!r}", "ok" if verified else "skip",
                "accepted" if verified else "not checked: the tenant was refused first")
            add("tenant", _tenant_subject(cfg.tenant_id), "fail", exc.message, exc.fix, exc.code)
            return self._skip_rest("the tenant was refused")
        except (CmdbRefused, CmdbError):
            pass  # grant, IAM or a CMDB error about the request itself: the watch line of the resource says it
        add("reach", cfg.base_url, "ok", "something answers")
        add("channel", channel, "ok", "answers in CMDB's format")
        add("credentials", f"app {cfg.app_code!r}, user {cfg.username!r}", "ok", "accepted")
        add("tenant", _tenant_subject(cfg.tenant_id), "ok",
            "accepted" if cfg.tenant_id else "single-tenant: X-Bk-Tenant-Id is not sent")
        return True

    def _skip_rest(self, why: str) -> bool:
        names = [("credentials", "app"), ("tenant", "X-Bk-Tenant-Id"), ("clock", "Date header")]
        names += [("watch", r) for r in self.resources]
        done = {c.check for c in self.report.checks}
        for check, subject in names:
            if check not in done or check == "watch":
                self.report.add(check, subject, "skip", f"not checked: {why}")
        return False

    def clock(self) -> None:
        skew = self.client.measured_skew
        if skew is None:
            self.report.add("clock", "Date header", "warn", "CMDB sent no Date header: its clock is unknown",
                            "nothing to do unless start times are refused (1199006); keep NTP running")
        elif abs(skew) <= 5:
            self.report.add("clock", "Date header", "ok", f"CMDB's clock is {skew:+.1f} s from ours")
        else:
            self.report.add("clock", "Date header", "warn", f"CMDB's clock is {skew:+.0f} s from ours; rwatch "
                            "computes start times on CMDB's clock", "synchronise both clocks (NTP)")

    # --- per resource ------------------------------------------------------------------------------------

    async def _watch(self, resource: str, **kw: Any) -> p.WatchReply:
        settings = self.config.watch.resources[resource]
        return await self.client.watch(resource, fields=settings.fields, event_types=settings.event_types,
                                       sub_resource=settings.sub_resource, **kw)

    async def watch(self, resource: str) -> None:
        action = p.IAM_WATCH_ACTIONS.get(resource, f"watch_{resource}_event")
        try:
            reply = await self._retry(lambda: self._watch(resource))
        except CmdbRefused as exc:
            self.report.add("watch", resource, "fail", exc.message, exc.fix, exc.code)
            return
        except (CmdbError, RwatchError) as exc:
            self.report.add("watch", resource, "fail", exc.message, _generic_fix(exc), getattr(exc, "code", None))
            return
        newest = reply.last_cursor
        decoded = p.decode_cursor(newest) if newest and newest != p.NO_EVENT_CURSOR else None
        seen = f"newest event {iso_utc(decoded.sec)}" if decoded else "no event in CMDB's window yet"
        self.report.add("watch", resource, "ok", f"gateway grant and IAM {action} in place; {seen}")

    # --- list APIs -----------------------------------------------------------------------------------------

    async def list_apis(self) -> None:
        apis = list(dict.fromkeys(a for r in self.resources if r in Resyncer.SUPPORTED for a in RESYNC_APIS[r]))
        unsupported = [r for r in self.resources if r not in Resyncer.SUPPORTED]
        if unsupported:
            self.report.add("list", ", ".join(unsupported), "warn",
                            "no list API covers every object: gaps of these cannot be filled by a resync",
                            "nothing to configure; keep rwatch's lag well below CMDB's retention")
        context: dict[str, Any] = {}
        for api in apis:
            await self.list_api(api, context)

    async def list_api(self, api: str, context: dict[str, Any]) -> None:
        users = ", ".join(r for r in self.resources if api in RESYNC_APIS.get(r, ()))
        subject = f"{api} ({users})"
        try:
            detail = await asyncio.wait_for(probe_api(self.lists, api, context), 120)
        except CmdbRefused as exc:
            self.report.add("list", subject, "fail", exc.message, exc.fix, exc.code)
        except ListingBroken as exc:
            self.report.add("list", subject, "fail", exc.message,
                            f"rwatch cannot resync {users} through this API as it answers here; report it with the "
                            "CMDB and gateway versions")
        except TimeoutError:
            self.report.add("list", subject, "fail", "kept failing transiently for 2 minutes",
                            "run doctor again; if it persists the gateway or CMDB backend is failing")
        except (CmdbError, RwatchError) as exc:
            self.report.add("list", subject, "fail", exc.message, _generic_fix(exc), getattr(exc, "code", None))
        else:
            verdict: Verdict = "skip" if detail.startswith("not checked") else "ok"
            self.report.add("list", subject, verdict, detail)

    # --- businesses the user cannot see ------------------------------------------------------------------

    async def businesses(self) -> None:
        subject = f"user {self.config.cmdb.username!r}"
        try:
            listed = await asyncio.wait_for(listed_businesses(self.lists), 300)
        except (CmdbError, RwatchError, TimeoutError) as exc:
            fix = exc.fix if isinstance(exc, CmdbRefused) else "see the search_business line"
            self.report.add("businesses", subject, "fail", f"search_business failed: {exc}", fix)
            return
        if "biz" not in self.config.watch.enabled:
            self.report.add("businesses", "watch.resources.biz", "warn",
                            "biz is not followed: rwatch records the businesses the stream shows only from the biz "
                            "stream, so it cannot tell a business hidden from the user from a deleted one",
                            "enable watch.resources.biz (it costs one quiet long-poll)")
        shown, sources = await self._shown_businesses()
        hidden = sorted(b for b, live in shown.items() if live and b not in listed)
        if hidden:
            ids = ", ".join(str(b) for b in hidden[:30]) + (f" ... ({len(hidden)} in all)" if len(hidden) > 30 else "")
            self.report.add(
                "businesses", subject, "warn",
                f"{len(hidden)} businesses shown alive by {sources} are not listed by search_business: {ids}. "
                "The user is not a CMDB administrator and IAM does not let it view them (or they were deleted "
                "while history was lost). rwatch still follows their events, but its resyncs delete nothing there "
                "and /readyz reports them",
                f"grant user {self.config.cmdb.username!r} view rights on every business (or use a CMDB "
                "administrator as cmdb.username)")
            return
        checked = f"; all {sum(shown.values())} shown alive by {sources} are among them" if shown else \
            f"; {sources} showed none to compare with"
        self.report.add("businesses", subject, "ok", f"search_business lists {len(listed)} businesses{checked}")

    async def _shown_businesses(self) -> tuple[dict[int, bool], str]:
        """Business id -> alive, from the biz stream's window and from a running rwatch's record."""
        shown: dict[int, tuple[tuple[int, int], bool]] = {}
        sources = []
        try:
            start = int(self.client.server_now() - self.config.watch.retention + 120)
            reply = await self._retry(lambda: self._watch("biz", start_from=start))
            # Pages of the biz stream's window, up to the newest event (a short page) or WINDOW_PAGES of them.
            for pages in range(1, WINDOW_PAGES + 1):
                for event in reply.events if reply.watched else []:
                    cur = p.decode_cursor(event.cursor)
                    biz = event.detail.get("bk_biz_id")
                    if not isinstance(biz, int) or event.event_type not in p.EVENT_TYPES:
                        continue
                    default = event.detail.get("default")
                    if isinstance(default, int) and default != 0:
                        continue  # the resource pool: never listed
                    shown[biz] = ((cur.sec, cur.inc) if cur else (0, pages), event.event_type != "delete")
                if len(reply.events) < 200 or pages == WINDOW_PAGES or not reply.last_cursor:
                    break
                reply = await self._retry(functools.partial(self._watch, "biz", cursor=reply.last_cursor))
            sources.append("the biz stream's window")
        except (CmdbError, RwatchError):
            pass  # the watch line of biz says why
        try:
            async with asyncio.timeout(10), open_store(self.config.store.url.get_secret_value(), timeout=5) as store:
                recorded = await store.businesses(self.config.cmdb.tenant)
            for sighting in recorded:
                if sighting.pool:
                    continue
                if sighting.biz_id not in shown or shown[sighting.biz_id][0] < sighting.version:
                    shown[sighting.biz_id] = (sighting.version, sighting.live)
            if recorded:
                sources.append("rwatch's record")
        except (RwatchError, TimeoutError, OSError):
            pass  # no store yet (rwatch never ran here): the window is the evidence
        return {b: live for b, (_, live) in shown.items()}, " and ".join(sources) or "nothing"

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """A transient failure (rate limit, backend hiccup) is retried a few times: doctor judges the setup."""
        # 0.5 s, 1 s, 2 s between the attempts, without jitter: one command, no storm to spread.
        async for attempt in retrying(wait_exponential(multiplier=0.5), stop=self.stop,
                                      retry_if=retry_if_exception(_worth_retrying), attempts=ATTEMPTS):
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover - the last failure is raised, not returned


def _worth_retrying(exc: BaseException) -> bool:
    """A rate limit or a backend hiccup; not a connection refused or a page that is not CMDB's: doctor judges
    those at once."""
    return isinstance(exc, CmdbTransientError) and exc.extra.get("reason") not in ("connection", "malformed")


def _tenant_subject(tenant_id: str | None) -> str:
    return f"X-Bk-Tenant-Id {tenant_id!r}" if tenant_id else "X-Bk-Tenant-Id (not sent)"


def _channel_fix(base_url: str, api: str) -> str:
    return (f"cmdb.base_url = {base_url!r} (cmdb.api = {api!r}) answers with a page, not CMDB's API: the gateway's "
            "base URL ends in /api/bk-cmdb/<stage> (e.g. https://bkapi.example.com/api/bk-cmdb/prod, api 'apigw'); "
            "the ESB's is the PaaS host (api 'esb')")


def _generic_fix(exc: BaseException) -> str:
    if isinstance(exc, CmdbTransientError):
        return "run doctor again; if it persists the gateway or CMDB backend is failing"
    return "see the error; check cmdb.* against the CMDB version (README \"Connecting to a real CMDB\")"


async def diagnose(config: Config, resources: list[str] | None = None) -> Report:
    """Every check, in order; ``resources`` defaults to the enabled ones."""
    chosen = resources or config.watch.enabled
    async with CmdbClient(config.cmdb) as client:
        return await Doctor(config, client, chosen).run()
