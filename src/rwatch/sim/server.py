"""The CMDB simulator's HTTP server: resource_watch on the gateway, direct and ESB paths, with faults.

``Simulator`` is an async context manager that owns the state, the fault plan, the load generator and an
aiohttp server; ``serve`` runs one until a stop event is set (the CLI wires the signals).
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Callable
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from rwatch.cmdb.protocol import (
    CODE_JSON_DECODE,
    CODE_NO_PERMISSION,
    RESOURCE_TYPES,
)
from rwatch.logs import get_logger
from rwatch.sim import admin, lists
from rwatch.sim.faults import Fault, FaultPlan
from rwatch.sim.gate import WATCH_API, admit
from rwatch.sim.inject import inject, unwatch
from rwatch.sim.load import LoadGenerator, build_topology
from rwatch.sim.parts import SimOptions
from rwatch.sim.permissions import Permissions
from rwatch.sim.state import SimState
from rwatch.sim.stats import Stats
from rwatch.sim.watch import (
    Mode,
    WatchAnswer,
    WatchError,
    WatchRequest,
    answer_now,
    answer_start_from,
    body_mode,
    locate,
    parse_watch,
    placeholder,
    scan,
)
from rwatch.sim.wire import MESSAGES, envelope, is_esb, watch_permission

log = get_logger("rwatch.sim")

WATCH_PATHS = (
    "/api/bk-cmdb/{stage}/api/v3/event/watch/resource/{resource}",
    "/api/v3/event/watch/resource/{resource}",
)
ESB_WATCH_PATH = "/api/c/compapi/v2/cc/resource_watch/"


class Simulator:
    """A running simulated CMDB: ``async with Simulator(options) as sim: ... sim.url ...``."""

    def __init__(self, options: SimOptions) -> None:
        if options.tenant_mode not in ("single", "multi"):
            raise ValueError(f"tenant_mode must be single or multi, not {options.tenant_mode!r}")
        if not options.tenant or options.app_tenant == "":
            raise ValueError("tenant and app_tenant must not be empty")
        self.options = options
        self.state = SimState(retention=options.retention, detail_mode=options.detail_mode, seed=options.seed)
        build_topology(
            self.state,
            bizs=options.bizs,
            sets_per_biz=options.sets_per_biz,
            modules_per_set=options.modules_per_set,
            hosts=options.hosts,
        )
        self.faults = FaultPlan(options.seed, self.state.faults, options.gateway_error_rate)
        self.load = LoadGenerator(self.state, seed=options.seed, mix=options.load_mix)
        self.stats = Stats()
        self.permissions = Permissions(frozenset({WATCH_API, *lists.APIS}))
        self.permissions.update(
            {"deny": options.denied_resources, "deny_apis": options.denied_apis, "hide_bizs": options.hidden_bizs}
        )
        self.url = ""
        self._wakers: dict[str, asyncio.Event] = {}
        self._closing = False
        self._runner: web.AppRunner | None = None
        self.state.listeners.append(self._wake)

    @property
    def denied(self) -> set[str]:
        """The resources whose watch IAM refuses (``permissions.deny``), for callers that edit it in place."""
        return self.permissions.deny

    # --- lifecycle -----------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        for path in WATCH_PATHS:
            app.router.add_post(path, self._watch)
        app.router.add_post(ESB_WATCH_PATH, self._watch)
        lists.add_routes(app, self)
        admin.add_routes(app, self)
        app.on_response_prepare.append(self._set_date)
        return app

    async def __aenter__(self) -> Simulator:
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        if self.options.load_rate > 0:
            self.load.start(self.options.load_rate)
        log.info(
            "sim_started",
            url=self.url,
            hold=self.options.hold,
            retention=self.options.retention,
            events=self.state.events_total,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Long-polls answer at once (placeholder) instead of holding the shutdown for up to `hold`.
        self._closing = True
        for event in self._wakers.values():
            event.set()
        await self.load.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("sim_stopped", events=self.state.events_total, requests=self.stats.watch_count())

    def _wake(self, resource: str) -> None:
        event = self._wakers.pop(resource, None)
        if event is not None:
            event.set()

    async def _set_date(self, request: web.Request, response: web.StreamResponse) -> None:
        # The server's clock, so a client can see it after a jump (RFC 7231 date, whole seconds).
        response.headers["Date"] = email.utils.formatdate(self.state.clock.now(), usegmt=True)

    # --- resource_watch ------------------------------------------------------------------------------

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        esb = is_esb(request)
        if esb:
            resource = str(body.get("bk_resource") or "") if isinstance(body, dict) else ""
        else:
            resource = request.match_info["resource"]
        refused = admit(self, request, body, WATCH_API)
        if refused is not None:
            return refused
        mode: str = body_mode(body) if isinstance(body, dict) else "invalid"
        self.stats.begin(resource)
        try:
            if not isinstance(body, dict):
                return await self._error(
                    request, resource, mode, CODE_JSON_DECODE, MESSAGES[CODE_JSON_DECODE]
                )
            fault = self.faults.take("watch", resource, mode, self._is_newest(resource, body))
            if fault is not None:
                response = await inject(self, request, fault, resource)
                if response is not None:
                    self.stats.record_watch(resource, mode, f"fault:{fault.kind}")
                    return response
            bend = fault if fault is not None and fault.kind == "unwatched_with_events" else None
            if resource in self.permissions.deny:
                self._give_back(bend)
                return await self._error(
                    request,
                    resource,
                    mode,
                    CODE_NO_PERMISSION,
                    MESSAGES[CODE_NO_PERMISSION],
                    watch_permission(resource),
                )
            try:
                answer = await self._answer(parse_watch(resource, body))
            except WatchError as err:
                self._give_back(bend)
                return await self._error(request, resource, mode, err.code, err.message)
            except BaseException:  # the long-poll cancelled (client gone, shutdown): nothing was answered
                self._give_back(bend)
                raise
            data = answer.to_json()
            if bend is not None:
                bent = unwatch(data)
                if bent is not None:
                    self.stats.record_watch(resource, mode, f"fault:{bend.kind}")
                    return envelope(request, data=bent)
                self._give_back(bend)  # a placeholder: the fault waits for an answer with events
            self.stats.record_watch(resource, mode, "events" if answer.watched else "placeholder")
            return envelope(request, data=data)
        finally:
            self.stats.end(resource)

    def _give_back(self, fault: Fault | None) -> None:
        if fault is not None:
            self.faults.give_back(fault)

    def _is_newest(self, resource: str, body: dict[str, Any]) -> bool:
        newest = self.state.chain_of(resource).newest if resource in RESOURCE_TYPES else None
        return newest is not None and body.get("bk_cursor") == newest.cursor

    async def _error(
        self, request: web.Request, resource: str, mode: str, code: int, message: str, perm: Any = None
    ) -> web.Response:
        self.stats.record_watch(resource, mode, f"error:{code}")
        await asyncio.sleep(self.options.error_delay)  # the cache service throttles bad callers (SVC)
        return envelope(request, code=code, message=message, permission=perm)

    async def _answer(self, req: WatchRequest) -> WatchAnswer:
        mode: Mode = req.mode
        if mode == "now":
            return answer_now(self.state, req)
        if mode == "start_from":
            return answer_start_from(self.state, req)
        return await self._long_poll(req, locate(self.state, req))

    async def _long_poll(self, req: WatchRequest, start: int) -> WatchAnswer:
        """Hold until a matching event follows ``start`` or ``hold`` passes; then rescan once (WATCH)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.hold
        scanned = start
        while True:  # ends with a matching event, at the hold's deadline, or when the simulator closes
            # Take the waker before scanning: nothing can slip in between (no await until the wait).
            waker = self._wakers.setdefault(req.resource, asyncio.Event())
            events, scanned = scan(self.state, req, scanned)
            if events:
                return WatchAnswer(True, events)
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                break
            try:
                await asyncio.wait_for(waker.wait(), remaining)
            except TimeoutError:
                break
        events, scanned = scan(self.state, req, scanned)
        if events:
            return WatchAnswer(True, events)
        newest = self.state.chain_of(req.resource).newest
        if scanned > start and newest is not None:
            return placeholder(newest.cursor, req.resource)  # only non-matching nodes: skip past them
        return placeholder(req.cursor, req.resource)


async def serve(
    options: SimOptions, stop: asyncio.Event, on_started: Callable[[Simulator], None] | None = None
) -> None:
    """Run a simulator until ``stop`` is set; ``on_started`` gets it once it listens (to learn the url)."""
    async with Simulator(options) as sim:
        if on_started is not None:
            on_started(sim)
        await stop.wait()
