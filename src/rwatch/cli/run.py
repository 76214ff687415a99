"""``rwatch run``, ``check-config`` and ``health``: run the daemon, check its configuration, ask it whether it lives."""

from __future__ import annotations

import sys
from typing import Annotated

import tomli_w
import typer

from rwatch.cli.common import ConfigOption, bad_config, check_role, load
from rwatch.errors import ConfigError


def run(
    config: ConfigOption = None,
    role: Annotated[str, typer.Option(help="watcher (CMDB -> bus), consumer (bus -> sinks) or all")] = "all",
) -> None:
    """Run the daemon."""
    from rwatch.app import run as run_daemon
    from rwatch.logs import setup_logging

    check_role(role)
    cfg = load(config)
    # A jsonl sink on stdout owns stdout: the logs move to stderr so the two streams never interleave.
    events_on_stdout = any(s.kind == "jsonl" and s.enabled and getattr(s, "path", None) == "-"
                           for s in cfg.sinks.values())
    setup_logging(cfg.log.level, cfg.log.format, sys.stderr if events_on_stdout else None)
    try:
        run_daemon(cfg, role="watcher" if role == "watcher" else "consumer" if role == "consumer" else "all")
    except ConfigError as exc:
        raise bad_config(exc) from None


def check_config(
    config: ConfigOption = None,
    role: Annotated[str, typer.Option(help="also check it can run with this --role: watcher, consumer or all")] = "all",
) -> None:
    """Validate the configuration and print it, effective and with secrets masked."""
    check_role(role)
    cfg = load(config)
    try:
        cfg.check_role(role)
    except ConfigError as exc:
        raise bad_config(exc) from None
    typer.echo(tomli_w.dumps(cfg.masked()), nl=False)


def health(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 3.0,
) -> None:
    """Exit 0 when the running rwatch answers /healthz, else 1 (for container health checks)."""
    import urllib.error
    import urllib.request

    cfg = load(config)
    host, _, port = cfg.http.listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"rwatch: {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if ok else 1)
