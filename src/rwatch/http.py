"""The HTTP server: liveness, readiness, Prometheus metrics, ``/status`` and its page on one port (``[http] listen``).

Extra GET routes (prom_sd's ``/sd``, see ``rwatch.sinks.prom_sd.sd_routes``) are mounted through ``routes``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Routes = Sequence[tuple[str, Handler]]
# name -> {"ok": bool, ...facts}; every check must pass for 200
Readiness = Callable[[], Awaitable[dict[str, dict[str, Any]]]]
# The /status document (rwatch.status.Status.snapshot); None: no /status, no page
StatusDoc = Callable[[], Awaitable[dict[str, Any]]]


# Checks that fail as "degraded": the process works, but falls behind (lag), cannot see everything (hidden),
# or holds a sweep for an operator (the mass-delete guard).
DEGRADED = ("lag:", "hidden_businesses", "sweep_held:")


@functools.cache
def status_page() -> str:
    """The status page (``status.html`` beside this module, shipped as package data): self-contained (no external
    assets), it renders /status every 2 s. Cells are filled with textContent, never innerHTML, so an error message
    cannot inject markup. Rows carry data-resource and the lag cell data-lag (seconds) for tools and tests."""
    return resources.files("rwatch").joinpath("status.html").read_text(encoding="utf-8")


async def _always_ready() -> dict[str, dict[str, Any]]:
    return {}


def make_app(alive: Callable[[], bool], routes: Routes = (), ready: Readiness = _always_ready,
             status: StatusDoc | None = None) -> web.Application:
    """The app; ``routes`` are extra ``(path, handler)`` pairs answered on GET (and HEAD)."""

    async def readyz(_: web.Request) -> web.Response:
        # Readiness: the dependencies answer and no resource is about to lose history. 503 names what failed;
        # a lag past two thirds of retention alone reports "degraded" (the process works, but falls behind).
        checks = await ready()
        failing = sorted(name for name, check in checks.items() if not check.get("ok"))
        if not failing:
            return web.json_response({"status": "ready", "checks": checks})
        status = "degraded" if all(name.startswith(DEGRADED) for name in failing) else "not_ready"
        return web.json_response({"status": status, "failing": failing, "checks": checks}, status=503)

    async def healthz(_: web.Request) -> web.Response:
        # Liveness only: the loop answers and no supervised task died. Dependencies are /readyz's job.
        if alive():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "dead"}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if status is not None:
        document = status

        async def status_json(_: web.Request) -> web.Response:
            return web.json_response(await document(), headers={"Cache-Control": "no-store"})

        async def page(_: web.Request) -> web.Response:
            return web.Response(text=status_page(), content_type="text/html", headers={"Cache-Control": "no-store"})

        app.router.add_get("/status", status_json)
        app.router.add_get("/", page)
    for path, handler in routes:
        app.router.add_get(path, handler)
    return app


async def serve_http(listen: str, alive: Callable[[], bool], stop: asyncio.Event,
                     bound: asyncio.Future[int] | None = None, *, routes: Routes = (),
                     ready: Readiness = _always_ready, status: StatusDoc | None = None) -> None:
    """Serve until ``stop`` is set; ``bound`` receives the port (useful with port 0)."""
    host, _, port = listen.rpartition(":")
    app = make_app(alive, routes, ready, status)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host.strip("[]") or None, int(port))
        await site.start()
        if bound is not None and not bound.done():
            bound.set_result(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()
