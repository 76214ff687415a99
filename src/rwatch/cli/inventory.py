"""``rwatch inventory``: the mirror as an Ansible dynamic inventory script (``--list``, ``--host NAME``).

Ansible runs an executable inventory with ``--list`` (and, as ``_meta`` is in that answer, never ``--host``), so a
one-line wrapper that execs ``rwatch inventory --config PATH "$@"`` makes ``ansible -i wrapper`` read the mirror.
Only JSON goes to stdout; logs (warnings and up) go to stderr, which Ansible shows when the script fails.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from rwatch.cli.common import ConfigOption, bad_config, existing_mirror, load
from rwatch.errors import ConfigError

if TYPE_CHECKING:
    from rwatch.config import Config, MirrorSinkConfig
    from rwatch.sinks.ansible import InventoryOptions
    from rwatch.sinks.mirror import MirrorSink


def choose(config: Config, sink: str | None) -> tuple[str, MirrorSinkConfig, InventoryOptions]:
    """The mirror to read and the options: those of the ``ansible_inventory`` sink ``sink`` (or of the first enabled
    one), or a mirror sink's with default options; ConfigError naming the key otherwise."""
    from rwatch.config import AnsibleInventorySinkConfig, MirrorSinkConfig
    from rwatch.sinks.ansible import InventoryOptions

    if sink is None:
        kinds = (AnsibleInventorySinkConfig, MirrorSinkConfig)
        sink = next((n for kind in kinds for n in config.enabled_sinks if isinstance(config.sinks[n], kind)), None)
        if sink is None:
            raise ConfigError("no enabled sink of kind 'ansible_inventory' or 'mirror' to read", key="sinks")
    settings = config.sinks.get(sink)
    options = InventoryOptions()
    mirror = sink
    if isinstance(settings, AnsibleInventorySinkConfig):
        options, mirror = InventoryOptions.of(settings), settings.source
        settings = config.sinks.get(mirror)
    if not isinstance(settings, MirrorSinkConfig):
        raise ConfigError(f"{sink!r} is neither an ansible_inventory nor a mirror sink", key=f"sinks.{sink}")
    return mirror, settings, options


def inventory_cmd(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(
        help="an ansible_inventory sink (its options and mirror) or a mirror sink (default options); default: the "
             "first enabled ansible_inventory sink, else the first enabled mirror")] = None,
    list_: Annotated[bool, typer.Option("--list", help="print the whole inventory")] = False,
    host: Annotated[str | None, typer.Option("--host", help="print this host's variables ({} when unknown)")] = None,
) -> None:
    """Print the mirror as Ansible dynamic inventory JSON. Exit 0: printed, 1: the mirror unreadable, 2: bad usage."""
    import asyncio
    import json

    from rwatch.errors import RwatchError
    from rwatch.logs import setup_logging

    if list_ == (host is not None):
        typer.echo("rwatch inventory: give --list or --host NAME (one of them)", err=True)
        raise typer.Exit(2)
    cfg = load(config)
    # Ansible runs this for every command: stay quiet on stderr unless something is wrong (or debug is asked for).
    setup_logging("debug" if cfg.log.level == "debug" else "warning", cfg.log.format, sys.stderr)
    try:
        name, settings, options = choose(cfg, sink)
        document = asyncio.run(_read(existing_mirror(name, settings), options))
    except ConfigError as exc:
        raise bad_config(exc) from None
    except (RwatchError, OSError) as exc:
        typer.echo(f"rwatch inventory: cannot read the mirror: {exc}", err=True)
        raise typer.Exit(1) from None
    if host is not None:
        from rwatch.sinks.ansible import host_vars

        document = host_vars(document, host)
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


async def _read(mirror: MirrorSink, options: InventoryOptions) -> dict[str, object]:
    from rwatch.sinks.ansible import read_inventory

    await mirror.open()
    try:
        return await read_inventory(mirror, options)
    finally:
        await mirror.close()
