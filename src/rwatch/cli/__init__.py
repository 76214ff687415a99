"""The ``rwatch`` command. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration."""

from __future__ import annotations

import sys

import typer

from rwatch import __version__
from rwatch.cli.cursors import cursors_app
from rwatch.cli.demo import demo
from rwatch.cli.dlq import dlq_app
from rwatch.cli.doctor import doctor
from rwatch.cli.inventory import inventory_cmd
from rwatch.cli.resync import resync_cmd
from rwatch.cli.run import check_config, health, run
from rwatch.cli.sim import sim
from rwatch.cli.verify import verify_cmd
from rwatch.cli.zabbix import zabbix_sync

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Follow BlueKing CMDB's resource_watch stream and keep ops systems in step.",
    pretty_exceptions_enable=False,
)


def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# In the order `rwatch --help` lists them.
app.command()(run)
app.command()(sim)
app.command("check-config")(check_config)
app.command()(health)
app.add_typer(dlq_app, name="dlq")
app.command("resync")(resync_cmd)
app.command("verify")(verify_cmd)
app.command("inventory")(inventory_cmd)
app.command()(doctor)
app.command()(version)
app.add_typer(cursors_app, name="cursors")
app.command("demo")(demo)
app.command("zabbix-sync")(zabbix_sync)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C before the loop installed its handlers
        sys.exit(130)
