"""What every ``rwatch`` command shares: the ``--config`` option, loading the configuration, the ``--role`` check."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from rwatch.config import Config, load_config
from rwatch.errors import ConfigError

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
