"""``rwatch resync``: list resources through CMDB's list APIs and publish them as a snapshot, with a progress bar."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rwatch.cli.common import ConfigOption, load, stop_on_signals
from rwatch.errors import RwatchError


def resync_cmd(
    config: ConfigOption = None,
    resource: Annotated[list[str] | None, typer.Option(
        "--resource", "-r", help="resync this resource (repeatable; default: every enabled resyncable one)")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar (default: when stderr is a terminal)")] = (
        sys.stderr.isatty()),
    allow_mass_delete: Annotated[bool, typer.Option(
        "--allow-mass-delete", help="let through a sweep the mass-delete guard would hold (after looking)")] = False,
) -> None:
    """List resources through CMDB's list APIs and publish them as a snapshot (list, then sweep); fills the
    gaps recorded before it started. Safe beside a running daemon. Exit 0: every resource resynced."""
    import asyncio

    from rwatch.cli.jobs import resync_now
    from rwatch.errors import ResyncUnsupported
    from rwatch.logs import setup_logging
    from rwatch.watch.resync import Resyncer, ResyncResult

    cfg = load(config)
    setup_logging(cfg.log.level, cfg.log.format, sys.stderr)
    chosen = list(resource or [r for r in cfg.watch.enabled if r in Resyncer.SUPPORTED])
    for name in chosen:
        if name not in cfg.watch.resources:
            typer.echo(f"rwatch resync: --resource {name!r}: no such resource", err=True)
            raise typer.Exit(2)
        try:
            Resyncer.check(name)
        except ResyncUnsupported as exc:
            typer.echo(f"rwatch resync: --resource {name!r}: {exc}", err=True)
            raise typer.Exit(2) from None
    if not chosen:
        typer.echo("rwatch resync: no enabled resource can be resynced", err=True)
        raise typer.Exit(2)

    async def main() -> dict[str, ResyncResult | BaseException]:
        stop = stop_on_signals()
        if not progress:
            return await resync_now(cfg, chosen, stop, allow_mass_delete=allow_mass_delete)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # On stderr: stdout carries the summary, one line per resource.
        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bar:
            tasks = {name: bar.add_task(name, total=None) for name in chosen}

            def update(name: str, listed: int, total: int | None) -> None:
                bar.update(tasks[name], completed=listed, total=max(total, listed) if total is not None else None)

            return await resync_now(cfg, chosen, stop, progress=update, allow_mass_delete=allow_mass_delete)

    try:
        outcome = asyncio.run(main())
    except RwatchError as exc:
        typer.echo(f"rwatch resync: {exc}", err=True)
        raise typer.Exit(1) from None
    failed = False
    for name in chosen:
        result = outcome.get(name)
        if isinstance(result, ResyncResult):
            typer.echo(f"{name}: {result.listed} objects at version {list(result.version)}, "
                       f"{sum(result.requests.values())} list requests, {result.seconds:.1f} s"
                       + ("" if result.complete else ", INCOMPLETE: nothing swept, gaps stay open"))
            if result.guard is not None:
                typer.echo(f"{name}: {result.guard.describe()}")
            for reason in result.reasons:
                failed = True
                typer.echo(f"{name}: {'held' if result.guard and result.guard.held else 'not proved complete'}: "
                           f"{reason}", err=True)
        else:
            failed = True
            typer.echo(f"{name}: FAILED: {result!r}" if result is not None else f"{name}: stopped", err=True)
    raise typer.Exit(1 if failed else 0)
