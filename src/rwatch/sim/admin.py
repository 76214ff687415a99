"""The admin API (JSON under ``/admin``): drive a simulator that runs in another process.

Errors are ``{"error": "..."}`` with HTTP 400 (bad input), 404 (unknown object) or 409 (the change would
break the topology).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from rwatch.cmdb.protocol import RESOURCE_TYPES
from rwatch.sim.parts import SimParts
from rwatch.sim.state import SimError
from rwatch.sim.wire import json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SimError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise SimError("the body must be a JSON object")
    return body


def _guard(fn: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except SimError as err:
            return json_response({"error": str(err)}, status=err.status)
        except (ValueError, TypeError, KeyError) as err:
            return json_response({"error": f"{type(err).__name__}: {err}"}, status=400)

    return handle


def add_routes(app: web.Application, sim: SimParts) -> None:
    state = sim.state
    routes = web.RouteTableDef()

    @routes.get("/admin/health")
    async def health(request: web.Request) -> web.StreamResponse:
        return json_response({"ok": True, "url": sim.url, "events_total": state.events_total})

    @routes.get("/admin/objects/{resource}")
    async def list_objects(request: web.Request) -> web.StreamResponse:
        return json_response(state.objects(request.match_info["resource"]))

    @routes.post("/admin/objects/{resource}")
    async def create(request: web.Request) -> web.StreamResponse:
        return json_response(state.create(request.match_info["resource"], await _body(request)), status=201)

    @routes.get("/admin/objects/{resource}/{key}")
    async def get(request: web.Request) -> web.StreamResponse:
        return json_response(state.get(request.match_info["resource"], request.match_info["key"]))

    @routes.patch("/admin/objects/{resource}/{key}")
    async def update(request: web.Request) -> web.StreamResponse:
        info = request.match_info
        return json_response(state.update(info["resource"], info["key"], await _body(request)))

    @routes.delete("/admin/objects/{resource}/{key}")
    async def delete(request: web.Request) -> web.StreamResponse:
        return json_response(state.delete(request.match_info["resource"], request.match_info["key"]))

    @routes.post("/admin/hosts/{host_id}/move")
    async def move(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        module_ids = body.get("module_ids")
        if not isinstance(module_ids, list):
            raise SimError("module_ids must be a list")
        return json_response(state.move_host(int(request.match_info["host_id"]), module_ids))

    @routes.get("/admin/chain/{resource}")
    async def chain(request: web.Request) -> web.StreamResponse:
        """Chain nodes with seq >= ``since`` (default 0), at most ``limit`` (default all)."""
        resource = request.match_info["resource"]
        if resource not in RESOURCE_TYPES:
            raise SimError(f"unknown resource {resource!r}", 404)
        since = int(request.query.get("since", 0))
        limit = int(request.query.get("limit", 0)) or None
        nodes = [n.to_json() for n in state.chain_of(resource).iter_from(since)]
        return json_response({"nodes": nodes[:limit], "end": state.chain_of(resource).end})

    @routes.get("/admin/clock")
    async def clock(request: web.Request) -> web.StreamResponse:
        return json_response({"now": state.clock.now(), "offset": state.clock.offset})

    @routes.post("/admin/clock")
    async def jump(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        now = state.clock.jump(float(body.get("jump", 0)))
        return json_response({"now": now, "offset": state.clock.offset})

    @routes.get("/admin/faults")
    async def faults(request: web.Request) -> web.StreamResponse:
        return json_response(sim.faults.to_json())

    @routes.post("/admin/faults")
    async def schedule(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            spec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SimError("the body is not JSON") from None
        sim.faults.schedule(spec)
        return json_response(sim.faults.to_json())

    @routes.delete("/admin/faults")
    async def clear_faults(request: web.Request) -> web.StreamResponse:
        sim.faults.clear()
        return json_response(sim.faults.to_json())

    @routes.get("/admin/load")
    async def load_status(request: web.Request) -> web.StreamResponse:
        return json_response(
            {"rate": sim.load.rate, "running": sim.load.running, "applied": sim.load.applied}
        )

    @routes.post("/admin/load")
    async def load(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        sim.load.start(float(body.get("rate", 0)), mix=body.get("mix"), seed=body.get("seed"))
        return json_response({"rate": sim.load.rate, "running": sim.load.running})

    @routes.post("/admin/load/run")
    async def load_run(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        if body.get("mix") is not None:
            sim.load.set_mix(body["mix"])
        if body.get("seed") is not None:
            sim.load.rng.seed(body["seed"])
        before = state.events_total
        applied = sim.load.run(int(body.get("ops", 1)))
        return json_response({"applied": applied, "events": state.events_total - before})

    @routes.get("/admin/stats")
    async def stats(request: web.Request) -> web.StreamResponse:
        snap = sim.stats.snapshot()
        snap["events_total"] = state.events_total
        snap["events_dropped"] = state.events_dropped
        snap["chains"] = {
            r: {"end": state.chain_of(r).end, "retained": len(state.chain_of(r))} for r in RESOURCE_TYPES
        }
        snap["faults_fired"] = dict(sim.faults.fired)
        return json_response(snap)

    @routes.delete("/admin/stats")
    async def reset_stats(request: web.Request) -> web.StreamResponse:
        sim.stats.reset()
        return json_response(sim.stats.snapshot())

    @routes.get("/admin/permissions")
    async def permissions(request: web.Request) -> web.StreamResponse:
        return json_response(sim.permissions.to_json())

    @routes.post("/admin/permissions")
    async def set_permissions(request: web.Request) -> web.StreamResponse:
        sim.permissions.update(await _body(request))
        return json_response(sim.permissions.to_json())

    for route in routes:
        assert isinstance(route, web.RouteDef)
        app.router.add_route(route.method, route.path, _guard(route.handler))
