"""``rwatch doctor``: check a real CMDB before ``rwatch run`` and print a verdict and a fix per line."""

from __future__ import annotations

import io
import sys
from typing import Annotated, Final

import typer

from rwatch.cli.common import ConfigOption, load
from rwatch.doctor.report import Report


def doctor(
    config: ConfigOption = None,
    resource: Annotated[list[str] | None, typer.Option(
        "--resource", "-r", help="check this resource (repeatable; default: every enabled one)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON document instead of a table")] = False,
) -> None:
    """Check a real CMDB before `rwatch run`: reachability, channel, credentials, tenant, clock, the gateway grant
    and IAM action of every resource, the list APIs of resyncs, and businesses hidden from the user. A verdict and
    a fix per line. Exit 0: rwatch can run, 1: it cannot."""
    import asyncio
    import json
    import shutil

    from rwatch.doctor.checks import diagnose
    from rwatch.logs import setup_logging

    cfg = load(config)
    setup_logging("error", cfg.log.format, sys.stderr)  # stdout is the report's
    for name in resource or ():
        if name not in cfg.watch.resources:
            typer.echo(f"rwatch doctor: --resource {name!r}: no such resource", err=True)
            raise typer.Exit(2)
    report = asyncio.run(diagnose(cfg, list(resource) if resource else None))
    width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else render(report, width=width))
    raise typer.Exit(0 if report.ok else 1)


_STYLES: Final = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def render(report: Report, width: int = 160) -> str:
    """The report as a table for people (``--json`` is for automation): one row per check, the fix under the
    detail of every line that is not ok."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cmdb = report.cmdb
    tenant = f"tenant {cmdb['tenant_id']!r}" if cmdb["tenant_id"] else "single-tenant"
    title = (f"rwatch doctor: {cmdb['base_url']} ({cmdb['api']}, app {cmdb['app_code']!r}, user "
             f"{cmdb['username']!r}, {tenant})")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("verdict", "check", "subject", "detail and fix"):
        table.add_column(name, overflow="fold", no_wrap=name in ("verdict", "check"))
    for c in report.checks:
        text = c.detail + (f"\n[bold]fix:[/] {c.fix}" if c.fix and c.verdict != "ok" else "")
        table.add_row(f"[{_STYLES[c.verdict]}]{c.verdict}[/]", c.check, c.subject, text)
    console = Console(width=width, record=True, file=io.StringIO())  # recorded and returned, not printed
    console.print(table)
    failed = sum(c.verdict == "fail" for c in report.checks)
    warned = sum(c.verdict == "warn" for c in report.checks)
    console.print("rwatch can run" + (f" ({warned} warning(s) to read)" if warned else "") if report.ok
                  else f"rwatch cannot run: {failed} check(s) failed; each says what to fix")
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()).rstrip()
