"""``rwatch demo``: the simulator and rwatch in one process, with a live view of the events flowing.

Nothing to configure: a small simulated CMDB (3 businesses, ~50 hosts) with a change generator, rwatch on
the memory bus (or on RabbitMQ with ``--amqp-url``, under an exchange and queues of its own that are deleted
at exit), a SQLite mirror and a Prometheus ``file_sd`` file in one folder. The watchers start at the oldest
event CMDB retains (the NoEventCursor, never saved by rwatch itself), so the mirror holds the whole
topology, resource pool included, within a second or two. With ``--zabbix URL``, a zabbix sink follows the
mirror into that real Zabbix, under a prefix of the demo's own (``rwatch.cli.demo.zabbix``). Ctrl-C (or
SIGTERM, or ``--seconds``) stops rwatch cleanly, then the simulator, and exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from rwatch.cli.demo.options import DEFAULT_PORT, DemoError, DemoFiles, DemoOptions, choose_port
from rwatch.cli.demo.runner import run_demo
from rwatch.cli.demo.zabbix import DEFAULT_PASSWORD, DEFAULT_PREFIX, DEFAULT_USER, DemoZabbix, api_url


def demo(
    amqp_url: Annotated[str | None, typer.Option(
        "--amqp-url", help="go through this RabbitMQ (own exchange and queues, deleted at exit) instead of the "
                           "in-process memory bus, e.g. amqp://guest:guest@127.0.0.1:5672/")] = None,
    rate: Annotated[float, typer.Option(min=0, help="simulated CMDB changes per second")] = 5.0,
    seconds: Annotated[float, typer.Option(min=0, help="stop after this many seconds (0 = until Ctrl-C)")] = 0.0,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, show_default=False,
        help=f"status page port on 127.0.0.1 (0 = any free port); by default {DEFAULT_PORT}, or any free port when "
             f"{DEFAULT_PORT} is taken")] = None,
    directory: Annotated[Path | None, typer.Option(
        "--dir", file_okay=False, help="folder for the mirror, file_sd output, state and log (default: a new "
                                       "temporary folder); the demo's own files in it are replaced")] = None,
    zabbix: Annotated[str | None, typer.Option(
        "--zabbix", show_default=False,
        help="also keep this real Zabbix in step: its frontend's URL (http://127.0.0.1:8080/) or its "
             "api_jsonrpc.php")] = None,
    zabbix_token: Annotated[str | None, typer.Option(
        "--zabbix-token", envvar="RWATCH_DEMO_ZABBIX_TOKEN", show_default=False,
        help="log in to Zabbix with this API token (or the environment, kept out of ps and shell history)")] = None,
    zabbix_user: Annotated[str | None, typer.Option(
        "--zabbix-user", show_default=False,
        help=f"log in to Zabbix as this user (default {DEFAULT_USER}, the account a fresh Zabbix comes with)")] = None,
    zabbix_password: Annotated[str | None, typer.Option(
        "--zabbix-password", envvar="RWATCH_DEMO_ZABBIX_PASSWORD", show_default=False,
        help=f"that user's password (default {DEFAULT_PASSWORD}, a fresh Zabbix's; change it on any Zabbix that "
             "others can reach)")] = None,
    zabbix_prefix: Annotated[str, typer.Option(
        "--zabbix-prefix", help="the demo's host groups are <prefix>/<biz>/<set>/<module>; what the demo made under "
                                "it is removed at start and at exit")] = DEFAULT_PREFIX,
    zabbix_keep: Annotated[bool, typer.Option(
        "--zabbix-keep", help="leave the demo's hosts and groups in Zabbix at exit, to look at them after")] = False,
) -> None:
    """See rwatch work in one command: a simulated CMDB, rwatch, a SQLite mirror and file_sd, live (and a real
    Zabbix with --zabbix)."""
    target = _zabbix(zabbix, zabbix_token, zabbix_user, zabbix_password, zabbix_prefix, zabbix_keep)
    try:
        chosen = choose_port(port)
    except OSError as exc:
        typer.echo(f"rwatch demo: --port {port}: cannot listen on 127.0.0.1:{port}: {exc.strerror} "
                   "(--port 0 picks a free port)", err=True)
        raise typer.Exit(1) from None
    folder = (directory or Path(tempfile.mkdtemp(prefix="rwatch-demo-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = DemoFiles(folder)
    files.clear()
    with files.log.open("w", encoding="utf-8") as log_stream:
        from rwatch.logs import setup_logging

        setup_logging("info", "json", log_stream)  # the view owns the terminal; the JSON logs go to the file
        options = DemoOptions(amqp_url=amqp_url, rate=rate, seconds=seconds, port=chosen, files=files,
                              live=sys.stdout.isatty(), zabbix=target)
        try:
            code = asyncio.run(run_demo(options, sys.stdout))
        except DemoError as exc:
            typer.echo(f"rwatch demo: {exc}", err=True)
            code = 1
        finally:
            logging.getLogger().handlers.clear()  # nothing may write to the file once it is closed
    raise typer.Exit(code)


def _zabbix(url: str | None, token: str | None, user: str | None, password: str | None, prefix: str,
            keep: bool) -> DemoZabbix | None:
    """The --zabbix options, checked as usage (exit 2) before anything starts."""
    from rwatch.config.sinks import check_zabbix_names

    if url is None:
        if token or user or password or keep or prefix != DEFAULT_PREFIX:
            raise typer.BadParameter("the --zabbix-* options need --zabbix URL", param_hint="--zabbix")
        return None
    try:
        endpoint = api_url(url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--zabbix") from None
    try:
        check_zabbix_names(prefix)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix("group_prefix: "), param_hint="--zabbix-prefix") from None
    if token and (user or password):
        raise typer.BadParameter("give --zabbix-token, or --zabbix-user and --zabbix-password, not both",
                                 param_hint="--zabbix-token")
    if token:
        return DemoZabbix(endpoint, prefix, token=token, username=None, password=None, keep=keep)
    return DemoZabbix(endpoint, prefix, username=user or DEFAULT_USER, password=password or DEFAULT_PASSWORD,
                      keep=keep)
