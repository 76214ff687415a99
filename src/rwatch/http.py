"""The HTTP server: liveness, readiness, Prometheus metrics, ``/status`` and its page on one port (``[http] listen``).

Extra GET routes (prom_sd's ``/sd``, see ``rwatch.sinks.prom_sd.sd_routes``) are mounted through ``routes``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
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
            return web.Response(text=STATUS_PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})

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


# The status page: self-contained (no external assets), it renders /status every 2 s. Cells are filled with
# textContent, never innerHTML, so an error message cannot inject markup. Rows carry data-resource and the lag
# cell data-lag (seconds) for tools and tests.
STATUS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rwatch status</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem; color: #1d2430; background: #f7f8fa; }
h1 { font-size: 1.35rem; margin: 0 0 .2rem; }
h2 { font-size: 1.05rem; margin: 1.5rem 0 .4rem; }
#meta { color: #5b6472; }
#state.bad { margin-left: .5rem; }
table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.06); }
th, td { padding: .3rem .75rem; border-bottom: 1px solid #e3e6eb; text-align: left; white-space: nowrap; }
th { background: #eef0f4; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { white-space: normal; max-width: 60rem; word-break: break-word; }
tr.alarm td { background: #fde8e8; }
.bad { color: #b42318; font-weight: 600; }
.muted { color: #8a93a0; }
</style>
</head>
<body>
<h1>rwatch</h1>
<div><span id="meta">loading&hellip;</span><span id="state"></span></div>
<noscript><p class="bad">This page needs JavaScript; the same data is at <a href="status">/status</a>.</p></noscript>
<h2>Resources</h2>
<table id="resources">
<thead><tr><th>resource</th><th>mode</th><th>leader</th><th>lag</th><th>cursor age</th><th>last poll</th>
<th>rate/s</th><th>received</th><th>published</th><th>gaps</th><th>alarm</th></tr></thead>
<tbody></tbody>
</table>
<h2>Sinks</h2>
<table id="sinks">
<thead><tr><th>sink</th><th>kind</th><th>queue depth</th><th>applied</th><th>dead letters</th></tr></thead>
<tbody></tbody>
</table>
<h2>Recent errors</h2>
<table id="errors">
<thead><tr><th>time</th><th>event</th><th>resource</th><th>error</th></tr></thead>
<tbody></tbody>
</table>
<script>
"use strict";
const NONE = "\u2013";

function duration(s) {
  if (s === null || s === undefined) return NONE;
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  const h = Math.floor(m / 60);
  if (h < 48) return h + "h " + String(m % 60).padStart(2, "0") + "m";
  return Math.floor(h / 24) + "d " + (h % 24) + "h";
}

function show(value) {
  return value === null || value === undefined ? NONE : String(value);
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function note(columns, text) {
  const tr = document.createElement("tr");
  cell(tr, text, "muted").colSpan = columns;
  return [tr];
}

function fill(id, rows) {
  document.querySelector("#" + id + " tbody").replaceChildren(...rows);
}

function resourceRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.resource = r.resource;
  if (r.retention_alarm) tr.className = "alarm";
  cell(tr, r.resource);
  cell(tr, show(r.mode));
  cell(tr, r.leader ? "yes" : "no", r.leader ? "" : "muted");
  cell(tr, duration(r.lag_s), "n lag").dataset.lag = r.lag_s === null ? "" : String(r.lag_s);
  cell(tr, duration(r.cursor_age_s), "n");
  cell(tr, r.polled_ago_s === null ? NONE : duration(r.polled_ago_s) + " ago", "n");
  cell(tr, r.rate_per_s === null ? NONE : r.rate_per_s.toFixed(2), "n");
  cell(tr, show(r.events_received), "n");
  cell(tr, show(r.events_published), "n");
  cell(tr, show(r.gaps_open), r.gaps_open ? "n bad" : "n");
  cell(tr, r.retention_alarm ? "LAG ALARM" : "ok", r.retention_alarm ? "bad" : "muted");
  return tr;
}

function sinkRow(s) {
  const tr = document.createElement("tr");
  tr.dataset.sink = s.sink;
  cell(tr, s.sink);
  cell(tr, s.kind);
  let depth;
  if (s.queue_depth === null) depth = "unknown: " + show(s.queue_error);
  else depth = Object.entries(s.queue_depth).map(([res, n]) => res + " " + show(n)).join(", ") || NONE;
  if (s.dead_queue_depth !== null && s.dead_queue_depth !== undefined) {
    depth += " (dead queue " + s.dead_queue_depth + ")";
  }
  cell(tr, depth, s.queue_depth === null ? "wrap bad" : "wrap");
  cell(tr, show(s.applied), "n");
  cell(tr, show(s.dead), s.dead > 0 || s.dead_queue_depth > 0 ? "n bad" : "n");
  return tr;
}

function errorRow(e) {
  const tr = document.createElement("tr");
  cell(tr, show(e.time));
  cell(tr, show(e.event));
  cell(tr, show(e.resource));
  cell(tr, show(e.error), "wrap");
  return tr;
}

function render(s) {
  document.getElementById("meta").textContent =
    "version " + s.version + " \u00b7 role " + s.role + " \u00b7 up " + duration(s.uptime_s) +
    " \u00b7 started " + s.started_at;
  fill("resources", s.resources.length ? s.resources.map(resourceRow) : note(11, "no resource followed here"));
  fill("sinks", s.sinks.length ? s.sinks.map(sinkRow) : note(5, "no sink in this process"));
  fill("errors", s.recent_errors.length ? s.recent_errors.map(errorRow) : note(4, "none"));
}

async function refresh() {
  const state = document.getElementById("state");
  try {
    const response = await fetch("status", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    state.textContent = "";
    state.className = "";
  } catch (err) {
    state.textContent = "\u00b7 status unavailable (" + err.message + "), retrying";
    state.className = "bad";
  } finally {
    setTimeout(refresh, 2000);
  }
}

refresh();
</script>
</body>
</html>
"""
