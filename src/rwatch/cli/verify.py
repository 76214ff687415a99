"""``rwatch verify``: compare a mirror sink with CMDB object by object, and print the drift as a table or JSON."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rwatch.cli.common import ConfigOption, load
from rwatch.errors import ConfigError, RwatchError


def verify_cmd(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(help="the mirror sink to check (default: the first enabled one)")] = None,
    resource: Annotated[list[str] | None, typer.Option(
        "--resource", "-r", help="check this resource (repeatable; default: every enabled resyncable one)")] = None,
    repair: Annotated[bool, typer.Option(help="resync every drifting resource, then verify again")] = False,
    wait: Annotated[float, typer.Option(
        min=0, help="--repair with bus.kind amqp: seconds to wait for the daemon's consumers to apply it")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON document instead of a table")] = False,
    allow_mass_delete: Annotated[bool, typer.Option(
        "--allow-mass-delete", help="--repair: let through a sweep the mass-delete guard would hold")] = False,
) -> None:
    """Compare a mirror sink with CMDB object by object. Exit 0: equal, 1: drift (or a failure)."""
    import asyncio
    import json

    from rwatch.cli.jobs import verify
    from rwatch.errors import ResyncUnsupported
    from rwatch.logs import setup_logging

    cfg = load(config)
    setup_logging(cfg.log.level, cfg.log.format, sys.stderr)  # stdout is the report's
    try:
        report = asyncio.run(verify(cfg, sink=sink, resources=resource, repair=repair, wait=wait,
                                    allow_mass_delete=allow_mass_delete))
    except (ConfigError, ResyncUnsupported) as exc:
        typer.echo(f"rwatch verify: {exc}", err=True)
        raise typer.Exit(2) from None
    except (RwatchError, OSError) as exc:
        typer.echo(f"rwatch verify: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_verify(report)
    raise typer.Exit(0 if report.final.drift == 0 else 1)


def _print_verify(report: object) -> None:
    from rwatch.watch.verify import VerifyReport

    assert isinstance(report, VerifyReport)
    passes = [("", report)] if report.after is None else [("before repair", report), ("after repair", report.after)]
    for title, one in passes:
        if title == "after repair":
            typer.echo(f"\nrepaired by a full resync: {', '.join(report.repaired)}")
        head = ["resource", "business", "cmdb", "mirror", "checksum", "missing", "extra", "changed", "ignored"]
        rows: list[list[str]] = []
        for r in one.resources:
            for i, g in enumerate(r.groups if len(r.groups) > 1 else []):
                rows.append([r.resource if i == 0 else "", g.group, str(g.cmdb), str(g.mirror),
                             "equal" if g.equal else "DIFFERS", "", "", "", ""])
            rows.append([r.resource if len(r.groups) < 2 else "", "all", str(r.cmdb), str(r.mirror),
                         "equal" if not r.drift else "DIFFERS", str(len(r.missing)), str(len(r.extra)),
                         str(len(r.changed)), str(r.ignored)])
        caption = f"mirror sink {one.sink!r} vs CMDB {one.cmdb_url} (tenant {one.tenant})"
        caption = f"{caption}, {title}" if title else caption
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # pragma: no cover - rich comes with typer
            widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
            typer.echo(caption)
            for row in (head, *rows):
                cells = zip(row, widths, strict=True)
                typer.echo("  ".join(c.rjust(w) if c.isdigit() else c.ljust(w) for c, w in cells).rstrip())
        else:
            table = Table(title=caption, title_justify="left")
            for name in head:
                table.add_column(name, justify="right" if name not in ("resource", "business", "checksum") else "left")
            for row in rows:
                table.add_row(*row, style="red" if "DIFFERS" in row else None)
            Console(width=max(120, len(caption) + 2), soft_wrap=True).print(table)
        for r in one.resources:
            for kind, keys in (("missing", r.missing), ("extra", r.extra), ("changed", r.changed)):
                if keys:
                    more = f" ... and {len(keys) - 20} more" if len(keys) > 20 else ""
                    typer.echo(f"{r.resource} {kind} ({len(keys)}): {' '.join(keys[:20])}{more}")
        for name, why in one.skipped.items():
            typer.echo(f"skipped {name}: {why}")
        for r in one.resources:
            if r.hidden_businesses:
                typer.echo(f"{r.resource}: {r.hidden} mirror rows in {len(r.hidden_businesses)} businesses hidden "
                           f"from the user, not compared: {' '.join(map(str, r.hidden_businesses[:20]))}")
            if r.guard is not None and r.guard.over:
                typer.echo(f"{r.resource}: a resync now: {r.guard.describe()}")
            if r.unproven:
                typer.echo(f"{r.resource}: {len(r.unproven)} mirror rows CMDB does not list, deleted or moved into a "
                           f"hidden business (cannot tell): {' '.join(r.unproven[:20])}")
            for reason in r.reasons:
                typer.echo(f"{r.resource}: CMDB's listing is not proved complete: {reason}")
        typer.echo("no drift" if not one.drift else f"drift: {one.drift} object(s) in "
                   f"{', '.join(r.resource for r in one.resources if r.drift)}")
