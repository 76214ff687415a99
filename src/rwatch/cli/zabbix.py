"""``rwatch zabbix-sync``: one full reconcile of a zabbix sink from its mirror, now (an initial sync or a repair)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated

import typer

from rwatch.cli.common import ConfigOption, existing_mirror, load


def zabbix_sync(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(help="the zabbix sink (default: the only enabled one)")] = None,
    json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Make Zabbix's managed groups and hosts equal to the mirror's topology now, whatever the daemon is doing
    (safe beside it: every write is idempotent). Exit 0 when Zabbix is equal, 1 when it could not be made so."""
    import asyncio

    import orjson

    from rwatch.config import MirrorSinkConfig, ZabbixSinkConfig
    from rwatch.errors import RwatchError
    from rwatch.logs import setup_logging
    from rwatch.sinks.zabbix.sink import ZabbixSink

    cfg = load(config)
    setup_logging(cfg.log.level, cfg.log.format, sys.stderr)
    zabbixes = [n for n in cfg.enabled_sinks if isinstance(cfg.sinks[n], ZabbixSinkConfig)]
    if sink is None and len(zabbixes) != 1:
        named = ", ".join(zabbixes) or "none"
        typer.echo(f"rwatch zabbix-sync: --sink: name one of the enabled zabbix sinks ({named})", err=True)
        raise typer.Exit(2)
    name = sink or zabbixes[0]
    settings = cfg.sinks.get(name)
    if not isinstance(settings, ZabbixSinkConfig):
        typer.echo(f"rwatch zabbix-sync: --sink {name!r}: no zabbix sink of that name", err=True)
        raise typer.Exit(2)
    source = cfg.sinks[settings.source]
    assert isinstance(source, MirrorSinkConfig)  # config validation: a projection's source is a mirror

    async def main() -> dict[str, object]:
        # Never a new, empty mirror from a wrong path: its full reconcile would only list every host as unproven.
        mirror = existing_mirror(settings.source, source)
        await mirror.open()
        zabbix = ZabbixSink(name, settings, mirror)
        try:
            return asdict(await zabbix.sync())
        finally:
            await zabbix.close()
            await mirror.close()

    try:
        summary = asyncio.run(main())
    except RwatchError as exc:
        typer.echo(f"rwatch zabbix-sync: {exc}", err=True)
        raise typer.Exit(1) from None
    if json:
        typer.echo(orjson.dumps(summary).decode())
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in summary.items()))
    if summary["conflicts"]:
        raise typer.Exit(1)
