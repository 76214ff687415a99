"""``rwatch cursors list``: each resource's saved position, cursor age, gaps and lease holder, as a table or JSON."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import typer

from rwatch.cli.common import ConfigOption, load
from rwatch.cli.cursors.common import JsonOption, cursor_store, iso, run_step, second, span
from rwatch.cli.cursors.views import Snapshot, read_snapshot, table_rows

if TYPE_CHECKING:
    from rwatch.config import Config


def list_cmd(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show every resource's saved position, cursor age, open gaps and lease holder."""
    cfg = load(config)
    tenant = cfg.cmdb.tenant

    async def main() -> Snapshot:
        async with cursor_store(cfg, create=False) as store:
            return await read_snapshot(store, tenant)

    snap = run_step(cfg, main)
    now = time.time()
    rows = table_rows(cfg, snap, now)
    if as_json:
        from rwatch.config import mask_url

        typer.echo(json.dumps({"now": now, "now_iso": iso(now), "tenant": tenant,
                               "store": mask_url(cfg.store.url.get_secret_value()),
                               "retention": cfg.watch.retention, "resources": rows}, indent=2))
        return
    _print_list(cfg, rows)


def _position_cell(row: dict[str, Any]) -> str:
    mode = row["mode"]
    if mode == "none":
        return "-"
    if mode == "now":
        return "newest event on"
    if mode == "start_from":
        return f"from {second(row['start_from'] + 1)}"
    if row["oldest_retained"]:
        return "oldest retained event"
    return second(row["event_time"]) if row["event_time"] is not None else "? (cursor not decoded)"


def _gaps_cell(row: dict[str, Any]) -> str:
    n = row["gaps_open"]
    if not n:
        return "0"
    # A bootstrap gap runs from 1970: "everything before", not a number of seconds.
    everything = [g for g in row["gaps"] if g["start"] <= 0]
    timed = sum(g["seconds"] for g in row["gaps"] if g["start"] > 0)
    parts = [span(timed)] if timed or not everything else []
    if everything:
        parts.append(f"all before {second(max(g['end'] for g in everything))}")
    return f"{n} ({', '.join(parts)})"


def _lease_cells(lease: dict[str, Any] | None) -> tuple[str, str]:
    if lease is None or not lease["live"]:
        return ("free", "-") if lease is not None else ("-", "-")
    return f"{lease['owner']} (fence {lease['fence']})", f"in {span(lease['expires_in'])}"


def _print_list(cfg: Config, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from rwatch.config import mask_url

    retention = cfg.watch.retention
    table = Table(title=f"cursor store {mask_url(cfg.store.url.get_secret_value())} (tenant {cfg.cmdb.tenant})",
                  title_justify="left",
                  caption="cursor age = now − position; saved = when written. Lag is the running daemon's "
                          "(/status, rwatch_watch_lag_seconds).", caption_justify="left")
    for name in ("resource", "mode", "position", "cursor age", "saved", "gaps", "lease holder", "expires"):
        table.add_column(name, justify="right" if name in ("cursor age", "saved", "expires") else "left", no_wrap=True)
    for row in rows:
        age = row["cursor_age"]
        style = None
        if age is not None and age > retention * 2 / 3:
            style = "red"  # resuming soon may lose history
        elif row["gaps_open"]:
            style = "yellow"
        table.add_row(
            row["resource"] if row["enabled"] else f"{row['resource']} (disabled)",
            row["mode"],
            _position_cell(row),
            span(age) if age is not None else "-",
            f"{span(row['saved_ago'])} ago" if row["saved_ago"] is not None else "-",
            _gaps_cell(row),
            *_lease_cells(row["lease"]),
            style=style,
        )
    Console(width=max(160, Console().width), soft_wrap=True).print(table)
    for row in rows:  # why an open gap is still open: the last resync did not fill it
        last = row["last_resync"]
        if row["gaps_open"] and last is not None and last["outcome"] != "ok":
            typer.echo(f"{row['resource']}: gaps stay open: last resync {last['outcome']} at {last['at_iso']}: "
                       f"{'; '.join(last['reasons']) or 'see the log'}")
