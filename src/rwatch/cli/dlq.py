"""``rwatch dlq list|replay``: see the dead letters a sink refused for good, and send them back to be applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from rwatch.cli.common import ConfigOption, load
from rwatch.errors import RwatchError

T = TypeVar("T")

dlq_app = typer.Typer(help="Dead letters: events a sink refused for good.", no_args_is_help=True)


@dlq_app.command("list")
def dlq_list(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(help="only this sink")] = None,
    limit: Annotated[int, typer.Option(help="show at most this many")] = 1000,
) -> None:
    """List dead letters (they stay in their queue)."""
    import asyncio

    from rwatch.bus.dlq import list_dead

    cfg = load(config)
    letters = _dlq_call(lambda: asyncio.run(list_dead(cfg, sink, limit)))
    typer.echo(f"{'sink':<12} {'resource':<16} {'action':<7} {'failed at':<27} {'event id':<16} {'attempts':>8}  "
               "reason")
    for d in letters:
        attempts = "-" if d.attempts is None else str(d.attempts)
        typer.echo(f"{d.sink:<12} {d.resource:<16} {d.action:<7} {d.failed_at:<27} {d.event_id[:16]:<16} "
                   f"{attempts:>8}  {d.reason}")
    typer.echo(f"{len(letters)} dead letter(s)")


@dlq_app.command("replay")
def dlq_replay(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(help="only this sink")] = None,
    resource: Annotated[str | None, typer.Option(help="only this resource")] = None,
) -> None:
    """Move dead letters back to their sink's queue, to be applied again."""
    import asyncio

    from rwatch.bus.dlq import replay

    cfg = load(config)
    moved = _dlq_call(lambda: asyncio.run(replay(cfg, sink, resource)))
    typer.echo(f"replayed {moved} dead letter(s)")


def _dlq_call(call: Callable[[], T]) -> T:
    try:
        return call()
    except ValueError as exc:
        typer.echo(f"rwatch dlq: {exc}", err=True)
        raise typer.Exit(2) from None
    except (OSError, ConnectionError) as exc:
        typer.echo(f"rwatch dlq: cannot reach the broker: {exc}", err=True)
        raise typer.Exit(1) from None
    except RwatchError as exc:  # e.g. the broker's queues disagree with the configuration
        typer.echo(f"rwatch dlq: {exc}", err=True)
        raise typer.Exit(1) from None
