"""``rwatch sim``: serve the CMDB simulator (resource_watch, the resync list APIs, an admin API, load and faults)."""

from __future__ import annotations

from typing import Annotated

import typer

from rwatch.cli.common import stop_on_signals


def sim(
    listen: Annotated[str, typer.Option(help="host:port to serve on (port 0 picks one)")] = "127.0.0.1:8089",
    hold: Annotated[float, typer.Option(help="seconds a cursor-mode long-poll is held (CMDB: 20)")] = 20.0,
    retention: Annotated[str, typer.Option(help="event window, e.g. 6h (CMDB's code), 3h (its docs)")] = "6h",
    error_delay: Annotated[float, typer.Option(help="pause before every error reply (CMDB: 0.5)")] = 0.5,
    app_code: Annotated[str | None, typer.Option(help="require this app code (default: accept any)")] = None,
    app_secret: Annotated[str | None, typer.Option(envvar="RWATCH_SIM_APP_SECRET",
                                                   help="require this app secret")] = None,
    seed: Annotated[int, typer.Option(help="seeds the topology, load and random faults")] = 0,
    bizs: Annotated[int, typer.Option(help="businesses in the initial topology")] = 2,
    sets_per_biz: Annotated[int, typer.Option(help="sets per business")] = 2,
    modules_per_set: Annotated[int, typer.Option(help="modules per set")] = 2,
    hosts: Annotated[int, typer.Option(help="hosts in the initial topology")] = 20,
    load_rate: Annotated[float, typer.Option(help="random changes per second (0 = off)")] = 0.0,
    load_mix: Annotated[str | None, typer.Option(
        help='operation weights as JSON, e.g. \'{"host.update": 5, "host.move": 1}\'')] = None,
    detail_mode: Annotated[str, typer.Option(help="snapshot (CMDB <= 3.13) or latest (3.14+)")] = "snapshot",
    deny: Annotated[list[str] | None, typer.Option(help="answer 9900403 for this resource (repeatable)")] = None,
    deny_api: Annotated[list[str] | None, typer.Option(
        help="the app is not granted this API on the gateway: 403 1640301 (repeatable; resource_watch, a list "
             "API name, or * for all)")] = None,
    tenant_mode: Annotated[str, typer.Option(
        help="single (X-Bk-Tenant-Id ignored) or multi (checked: 403 1640302 at the gateway, 1100005 at CMDB)")
    ] = "single",
    tenant: Annotated[str, typer.Option(help="the tenant whose data the simulator holds (multi mode)")] = "default",
    app_tenant: Annotated[str | None, typer.Option(
        help="the calling app's tenant in multi mode (default: an app valid in every tenant)")] = None,
    gateway_error_rate: Annotated[float, typer.Option(
        help="probability of a gateway error (429/502/503/504; ESB: HTTP 200, or 1306201) on any CMDB request")
    ] = 0.0,
    hide_biz: Annotated[list[int] | None, typer.Option(
        help="the user may not view this business in IAM: lists leave it out or answer 9900403 (repeatable)")
    ] = None,
    log_format: Annotated[str, typer.Option(help="json or console")] = "json",
) -> None:
    """Run the CMDB simulator: resource_watch, the resync list APIs, an admin API, load and faults."""
    import asyncio
    import json

    from rwatch.cmdb.protocol import RESOURCES
    from rwatch.config import parse_duration
    from rwatch.logs import setup_logging
    from rwatch.sim.gate import WATCH_API
    from rwatch.sim.lists import APIS
    from rwatch.sim.parts import SimOptions
    from rwatch.sim.permissions import ALL_APIS
    from rwatch.sim.server import serve

    def bad(option: str, why: str) -> typer.Exit:
        typer.echo(f"rwatch sim: {option}: {why}", err=True)
        return typer.Exit(2)

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise bad("--listen", f"{listen!r} is not host:port")
    try:
        retention_s = parse_duration(retention)
    except ValueError as exc:
        raise bad("--retention", str(exc)) from None
    mix = None
    if load_mix:
        try:
            mix = json.loads(load_mix)
        except json.JSONDecodeError as exc:
            raise bad("--load-mix", f"not JSON: {exc}") from None
        if not isinstance(mix, dict) or not all(isinstance(v, int | float) for v in mix.values()):
            raise bad("--load-mix", "must be an object of operation -> weight")
    if detail_mode not in ("snapshot", "latest"):
        raise bad("--detail-mode", "choose snapshot or latest")
    if log_format not in ("json", "console"):
        raise bad("--log-format", "choose json or console")
    for name in deny or ():
        if name not in RESOURCES:
            raise bad("--deny", f"unknown resource {name!r}")
    apis = {ALL_APIS, WATCH_API, *APIS}
    for name in deny_api or ():
        if name not in apis:
            raise bad("--deny-api", f"unknown API {name!r}; choose from {', '.join(sorted(apis))}")
    if tenant_mode not in ("single", "multi"):
        raise bad("--tenant-mode", "choose single or multi")
    if not 0 <= gateway_error_rate <= 1:
        raise bad("--gateway-error-rate", "must be between 0 and 1")
    options = SimOptions(
        host=host.strip("[]") or "127.0.0.1", port=int(port), hold=hold, retention=retention_s,
        error_delay=error_delay, app_code=app_code, app_secret=app_secret, seed=seed, bizs=bizs,
        sets_per_biz=sets_per_biz, modules_per_set=modules_per_set, hosts=hosts, load_rate=load_rate,
        load_mix=mix, detail_mode="latest" if detail_mode == "latest" else "snapshot",
        denied_resources=frozenset(deny or ()), denied_apis=frozenset(deny_api or ()),
        tenant_mode="multi" if tenant_mode == "multi" else "single", tenant=tenant, app_tenant=app_tenant,
        gateway_error_rate=gateway_error_rate, hidden_bizs=frozenset(hide_biz or ()),
    )
    setup_logging("info", log_format)  # the simulator logs sim_started (with its url) and sim_stopped

    async def main() -> None:
        stop = stop_on_signals()
        await serve(options, stop)

    try:
        asyncio.run(main())
    except ValueError as exc:  # options the simulator itself refuses (e.g. an unknown load operation)
        raise bad("options", str(exc)) from None
    except OSError as exc:
        typer.echo(f"rwatch sim: cannot listen on {listen}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
