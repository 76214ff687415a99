"""What every ``rwatch`` command shares: the ``--config`` option, loading the configuration, the ``--role`` check."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rwatch.config import Config, load_config
from rwatch.errors import ConfigError

if TYPE_CHECKING:
    from rwatch.config import MirrorSinkConfig
    from rwatch.sinks.mirror import MirrorSink

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="RWATCH_CONFIG",
                 help="TOML file (default: ./config.toml when it exists, else built-in defaults)"),
]
ROLES = ("watcher", "consumer", "all")


def load(path: Path | None) -> Config:
    """The configuration at ``path``; a bad one ends the command with exit 2 and the reason on stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise bad_config(exc) from None


def bad_config(exc: ConfigError) -> typer.Exit:
    """Say on stderr why the configuration is refused; the caller raises the exit 2 returned."""
    typer.echo(f"rwatch: bad configuration: {exc}", err=True)
    return typer.Exit(2)


def existing_mirror(name: str, settings: MirrorSinkConfig) -> MirrorSink:
    """The mirror sink a command reads (not open yet); SinkUnavailable for a SQLite file that does not exist."""
    from rwatch.errors import SinkUnavailable
    from rwatch.sinks.mirror import MirrorSink

    mirror = MirrorSink(name, settings)
    database = mirror.url.database
    if mirror.backend == "sqlite" and database not in (None, "", ":memory:") and not Path(database).is_file():
        # Opening would create an empty mirror, and a wrong path would read as an empty topology.
        raise SinkUnavailable(f"{database} does not exist (has `rwatch run` filled mirror sink {name!r} yet?)",
                              sink=name)
    return mirror


def check_role(role: str) -> None:
    """Exit 2 unless ``--role`` names one of the roles."""
    if role not in ROLES:
        typer.echo(f"rwatch: --role {role!r}: choose watcher, consumer or all", err=True)
        raise typer.Exit(2)


def stop_on_signals() -> asyncio.Event:
    """The command's stop signal, set by SIGINT or SIGTERM; called inside the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
