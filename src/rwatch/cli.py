"""The ``rwatch`` command. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import tomli_w
import typer

from rwatch import __version__
from rwatch.config import Config, load_config
from rwatch.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Follow BlueKing CMDB's resource_watch stream and keep ops systems in step.",
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="RWATCH_CONFIG",
                 help="TOML file (default: ./config.toml when it exists, else built-in defaults)"),
]


def _load(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"rwatch: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigOption = None,
    role: Annotated[str, typer.Option(help="watcher (CMDB -> bus) or all")] = "all",
) -> None:
    """Run the daemon."""
    from rwatch.app import run as run_daemon
    from rwatch.logs import setup_logging

    if role not in ("watcher", "all"):
        typer.echo(f"rwatch: --role {role!r}: choose watcher or all", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    setup_logging(cfg.log.level, cfg.log.format)
    try:
        run_daemon(cfg, role="watcher" if role == "watcher" else "all")
    except ConfigError as exc:
        typer.echo(f"rwatch: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate the configuration and print it, effective and with secrets masked."""
    cfg = _load(config)
    typer.echo(tomli_w.dumps(cfg.masked()), nl=False)


@app.command()
def health(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 3.0,
) -> None:
    """Exit 0 when the running rwatch answers /healthz, else 1 (for container health checks)."""
    import urllib.error
    import urllib.request

    cfg = _load(config)
    host, _, port = cfg.http.listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own endpoint
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"rwatch: {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if ok else 1)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C before the loop installed its handlers
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
