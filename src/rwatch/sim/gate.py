"""Who may reach the simulated CMDB: the gateway's checks in the order its plugins run, then CMDB's own.

Every CMDB request passes ``admit`` before anything else looks at it, so a refused request changes nothing:
it uses up no fault, draws nothing from a random generator and counts only in ``Stats.refused``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from rwatch.sim.wire import GW_ERRORS, check_auth, gateway_error

if TYPE_CHECKING:
    from rwatch.sim.server import Simulator

WATCH_API: Final = "resource_watch"  # the gateway resource (and ESB component) name of the watch API


def admit(sim: Simulator, request: web.Request, body: Any, api: str) -> web.Response | None:
    """None when ``api`` may be served, else the refusal (counted under its reason)."""
    options = sim.options
    failed = check_auth(request, body, options.app_code, options.app_secret)
    if failed is not None:
        code, reason = failed
        return _refuse(sim, api, "auth", gateway_error(request, GW_ERRORS[code], reason))
    return None


def _refuse(sim: Simulator, api: str, reason: str, response: web.Response) -> web.Response:
    sim.stats.record_refused(api, reason)
    return response
