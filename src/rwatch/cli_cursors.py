"""``rwatch cursors list|reset``: see and move the saved positions in the cursor store.

``rwatch cursors list [--config] [--json]``
    One row per resource of the tenant (``cmdb.tenant``): every enabled resource, plus any resource with a
    saved position, an open gap or a lease row. Columns:

    * **mode**: where the next watcher term starts: ``cursor`` (a CMDB cursor is saved), ``start_from`` (a reset
      left a start time), ``now`` (a reset to now: CMDB's newest event on), ``none`` (nothing saved: the watcher
      starts from now, recording the bootstrap gap [0, now) first when ``watch.bootstrap = "resync"``).
    * **position**: the cluster time the saved cursor stands for (the newest event delivered), or the first
      second a start time replays.
    * **cursor age** = now − that time; **saved** = now − when it was written. Neither is *lag*: an idle
      resource's cursor ages while its watcher is fully caught up, and the watcher saves only when events come.
      Lag (time since a watcher last knew it was at the head of the stream) lives in the running daemon
      only: ``/status`` and ``rwatch_watch_lag_seconds``. What the store can vouch for is the cursor age: if
      it nears ``watch.retention`` while a watcher is down, resuming will lose history.
    * **gaps**: open gaps (history known lost, waiting for a resync to fill it): count and seconds.
    * **lease**: the replica following the resource (``owner``, ``fence``) and when its lease expires; an
      expired lease row shows as free.

    ``--json`` prints the same as one JSON document (times as Unix seconds and ISO-8601 UTC, ages in seconds).

``rwatch cursors reset RESOURCE (--to-now | --to-time T | --by-duration D) [--execute] [--json]``
    Computes the new position and prints the change (old → new); a dry run unless ``--execute``.

    * ``--to-time T``: ISO-8601 (``2024-11-26T10:00:00Z``, an offset, or none = UTC) or Unix seconds.
      ``--by-duration D``: a duration as in the config (``90s``, ``30m``, ``1h30m``), meaning now − D.
      The new position replays every event from T's second on: CMDB returns the events *strictly after*
      ``bk_start_from`` (to the second), so ``bk_start_from = ⌊T⌋ − 1``: a few events of T's own second before T
      may come again, none after T is missed.
    * That start must lie inside the retention window as the watcher sees it: not before
      now − ``watch.retention`` + 60 s (the watcher's ``RESUME_MARGIN``), and not in the future; otherwise exit 2
      with the window.
    * ``--to-now``: the watcher starts "from now" (CMDB's newest event on), as with nothing saved, but without
      the bootstrap gap a missing row means under ``bootstrap = "resync"``: the skip is the operator's choice.
      Skipped history is not recorded as a gap; ``rwatch resync -r RESOURCE`` brings the mirror level.

    Stored form (no schema change, ``CursorState.from_now`` / ``CursorState.starting_at``): "from now" is a
    row with an empty cursor; a start time is a row whose cursor is ``rwatch:start_from:<bk_start_from>`` with
    ``event_time = bk_start_from``. The watcher reads ``CursorState.start_from`` in ``_initial_position`` and
    resumes with ``bk_start_from`` exactly there; an empty cursor sends no ``bk_cursor`` (``watch_body``), which
    *is* "from now".

    ``--execute`` is race-free against running daemons: it takes the resource's lease itself
    (``CursorStore.acquire`` with a unique owner and a 30 s ttl), writes the new position fenced by that lease,
    and releases it. While another owner's lease is live (``expires_at > now``) the reset is refused (exit 1,
    naming the holder and when its lease expires): stop every ``rwatch run`` following the resource (a standby
    takes the lease over within ``lease_ttl``) and run it again. A watcher that starts meanwhile waits for the
    lease, then loads the new position.

Exit codes (DESIGN.md): 0 ok (dry runs included); 1 runtime failure (store unreachable, reset refused by a live
lease); 2 bad usage or configuration (unknown resource, unreadable or out-of-window time, no or several targets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from rwatch.errors import ConfigError, LeaseLost, StoreError

if TYPE_CHECKING:
    from rwatch.config import Config
    from rwatch.store.backends import SqlCursorStore
    from rwatch.store.records import CursorState, Gap, Lease, ResyncRecord

T = TypeVar("T")

cursors_app = typer.Typer(help="See and reset the saved cursors.", no_args_is_help=True)

# The same option as rwatch.cli's (not imported: rwatch.cli imports this module while it loads).
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="RWATCH_CONFIG",
                 help="TOML file (default: ./config.toml when it exists, else built-in defaults)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print a JSON document instead of text")]

RESET_LEASE_TTL = 30.0  # how long the reset's own lease lives if it cannot release it (it releases at once)


class _Usage(Exception):
    """Bad usage: the message goes to stderr and the command exits 2."""


# --- shared plumbing --------------------------------------------------------------------------------------


def _load(path: Path | None) -> Config:
    from rwatch.cli import _load as load

    return load(path)


@contextlib.contextmanager
def _cli_logging(cfg: Config) -> Iterator[None]:
    """Library logs (the store's ``store_opened``...) on stderr, warnings and up: stdout is the report's. The
    root logger's handlers come back afterwards, for callers that run the command in-process."""
    from rwatch.logs import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("error" if cfg.log.level == "error" else "warning", cfg.log.format, sys.stderr)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _run(cfg: Config, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one async step; its errors become an exit code with one line on stderr."""
    try:
        with _cli_logging(cfg):
            return asyncio.run(make())
    except _Usage as exc:
        typer.echo(f"rwatch cursors: {exc}", err=True)
        raise typer.Exit(2) from None
    except ConfigError as exc:
        typer.echo(f"rwatch cursors: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    except LeaseLost as exc:  # our own lease taken over between acquire and save: clocks far apart
        typer.echo(f"rwatch cursors: {exc}", err=True)
        raise typer.Exit(1) from None
    except (StoreError, TimeoutError, OSError) as exc:
        from rwatch.config import mask_url

        what = str(exc) if str(exc) else type(exc).__name__
        typer.echo(f"rwatch cursors: the cursor store {mask_url(cfg.store.url.get_secret_value())} "
                   f"cannot be used: {what}", err=True)
        raise typer.Exit(1) from None


def _no_store(cfg: Config) -> bool:
    """Whether the store is a SQLite file that does not exist yet: nothing is saved, and reading must not
    leave an empty database behind (a mistyped path would then look like a store with nothing in it)."""
    from rwatch.store.backends import SqliteCursorStore
    from rwatch.store.base import open_store

    store = open_store(cfg.store.url.get_secret_value())
    return isinstance(store, SqliteCursorStore) and bool(store.path) and not Path(str(store.path)).exists()


@contextlib.asynccontextmanager
async def _store(cfg: Config, *, create: bool) -> AsyncIterator[SqlCursorStore | None]:
    """The opened store; None without ``create`` when the SQLite file does not exist (``_no_store``)."""
    from rwatch.store.base import open_store

    if not create and await asyncio.to_thread(_no_store, cfg):
        yield None
        return
    store = open_store(cfg.store.url.get_secret_value())
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    from rwatch.events import iso_utc

    return iso_utc(seconds)


def _span(seconds: float) -> str:
    """A duration for people: ``42s``, ``12m05s``, ``3h05m``, ``2d04h``."""
    s = round(abs(seconds))
    sign = "-" if seconds < 0 and s else ""
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}h"


# --- reading the store ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Snapshot:
    states: dict[str, CursorState] = field(default_factory=dict)
    gaps: dict[str, list[Gap]] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    resyncs: dict[str, ResyncRecord] = field(default_factory=dict)


async def _read(store: SqlCursorStore | None, tenant: str) -> _Snapshot:
    snap = _Snapshot()
    if store is None:
        return snap
    snap.states = {s.resource: s for s in await store.states(tenant)}
    for gap in await store.gaps(tenant, open_only=True):
        snap.gaps.setdefault(gap.resource, []).append(gap)
    snap.leases = {lease.resource: lease for lease in await store.leases(tenant)}
    snap.resyncs = {r.resource: r for r in await store.resyncs(tenant)}
    return snap


def _position_time(state: CursorState | None) -> float | None:
    """The cluster time a saved position stands for: the event a cursor follows, or a start time's second."""
    if state is None:
        return None
    start = state.start_from
    return float(start) if start is not None else state.event_time


def _lease_view(lease: Lease | None, now: float) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {"owner": lease.owner, "fence": lease.fence, "expires_at": lease.expires_at,
            "expires_at_iso": _iso(lease.expires_at) if lease.expires_at > 0 else None,
            "live": lease.expires_at > now, "expires_in": round(lease.expires_at - now, 3)}


def _state_view(state: CursorState | None, now: float) -> dict[str, Any]:
    from rwatch.cmdb.protocol import NO_EVENT_CURSOR

    at = _position_time(state)
    return {
        "mode": state.mode if state is not None else "none",
        "cursor": state.cursor if state is not None else None,
        "oldest_retained": state is not None and state.cursor == NO_EVENT_CURSOR,
        "start_from": state.start_from if state is not None else None,
        "event_time": at,
        "event_time_iso": _iso(at),
        "cursor_age": round(now - at, 3) if at is not None else None,
        "saved_at": state.saved_at if state is not None else None,
        "saved_at_iso": _iso(state.saved_at) if state is not None else None,
        "saved_ago": round(now - state.saved_at, 3) if state is not None else None,
    }


def _rows(cfg: Config, snap: _Snapshot, now: float) -> list[dict[str, Any]]:
    enabled = cfg.watch.enabled
    extra = sorted((set(snap.states) | set(snap.gaps) | set(snap.leases)) - set(enabled))
    rows = []
    for resource in [*enabled, *extra]:
        gaps = snap.gaps.get(resource, [])
        rows.append({
            "resource": resource,
            "enabled": resource in enabled,
            **_state_view(snap.states.get(resource), now),
            "gaps_open": len(gaps),
            "gap_seconds": round(sum(g.end - g.start for g in gaps), 3),
            "gaps": [{"id": g.id, "start": g.start, "end": g.end, "start_iso": _iso(g.start), "end_iso": _iso(g.end),
                      "seconds": round(g.end - g.start, 3), "reason": g.reason, "recorded_at": g.recorded_at}
                     for g in gaps],
            "lease": _lease_view(snap.leases.get(resource), now),
            "last_resync": _resync_view(snap.resyncs.get(resource)),
        })
    return rows


def _resync_view(record: ResyncRecord | None) -> dict[str, Any] | None:
    """The last resync: why a gap is still open when it is (an unproved listing, a sweep held by the guard)."""
    if record is None:
        return None
    return {"outcome": record.outcome, "reasons": list(record.reasons), "at": record.at, "at_iso": _iso(record.at),
            "listed": record.listed}


# --- rwatch cursors list ----------------------------------------------------------------------------------


@cursors_app.command("list")
def list_cmd(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show every resource's saved position, cursor age, open gaps and lease holder."""
    cfg = _load(config)
    tenant = cfg.cmdb.tenant

    async def main() -> _Snapshot:
        async with _store(cfg, create=False) as store:
            return await _read(store, tenant)

    snap = _run(cfg, main)
    now = time.time()
    rows = _rows(cfg, snap, now)
    if as_json:
        from rwatch.config import mask_url

        typer.echo(json.dumps({"now": now, "now_iso": _iso(now), "tenant": tenant,
                               "store": mask_url(cfg.store.url.get_secret_value()),
                               "retention": cfg.watch.retention, "resources": rows}, indent=2))
        return
    _print_list(cfg, rows)


def _second(seconds: float | None) -> str:
    """ISO-8601 UTC to the second, for the table (the JSON keeps the fractions)."""
    return _iso(math.floor(seconds)) or "-" if seconds is not None else "-"


def _position_cell(row: dict[str, Any]) -> str:
    mode = row["mode"]
    if mode == "none":
        return "-"
    if mode == "now":
        return "newest event on"
    if mode == "start_from":
        return f"from {_second(row['start_from'] + 1)}"
    if row["oldest_retained"]:
        return "oldest retained event"
    return _second(row["event_time"]) if row["event_time"] is not None else "? (cursor not decoded)"


def _gaps_cell(row: dict[str, Any]) -> str:
    n = row["gaps_open"]
    if not n:
        return "0"
    # A bootstrap gap runs from 1970: "everything before", not a number of seconds.
    everything = [g for g in row["gaps"] if g["start"] <= 0]
    timed = sum(g["seconds"] for g in row["gaps"] if g["start"] > 0)
    parts = [_span(timed)] if timed or not everything else []
    if everything:
        parts.append(f"all before {_second(max(g['end'] for g in everything))}")
    return f"{n} ({', '.join(parts)})"


def _lease_cells(lease: dict[str, Any] | None) -> tuple[str, str]:
    if lease is None or not lease["live"]:
        return ("free", "-") if lease is not None else ("-", "-")
    return f"{lease['owner']} (fence {lease['fence']})", f"in {_span(lease['expires_in'])}"


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
            _span(age) if age is not None else "-",
            f"{_span(row['saved_ago'])} ago" if row["saved_ago"] is not None else "-",
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


# --- rwatch cursors reset ---------------------------------------------------------------------------------


def parse_time(text: str) -> float:
    """Unix seconds from ISO-8601 (``Z``, an offset, or none for UTC) or from a number of Unix seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise _Usage(f"--to-time {text!r}: not ISO-8601 (e.g. 2024-11-26T10:00:00Z) nor Unix seconds") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        seconds = parsed.timestamp()
    if not math.isfinite(seconds):
        raise _Usage(f"--to-time {text!r}: not a time")
    return seconds


@dataclass(frozen=True, slots=True)
class Target:
    """The new position: ``start_from`` None means "from now"."""

    start_from: int | None
    requested: float | None  # the time asked for (T, or now − D)

    def state(self, tenant: str, resource: str, saved_at: float) -> CursorState:
        from rwatch.store.records import CursorState

        if self.start_from is None:
            return CursorState.from_now(tenant, resource, saved_at)
        return CursorState.starting_at(tenant, resource, self.start_from, saved_at)


def choose_target(cfg: Config, *, to_now: bool, to_time: str | None, by_duration: str | None,
                  now: float) -> Target:
    """The new position from exactly one of the options, checked against the retention window."""
    from rwatch.config import parse_duration
    from rwatch.watch.watcher import RESUME_MARGIN

    given = [name for name, value in (("--to-now", to_now), ("--to-time", to_time is not None),
                                      ("--by-duration", by_duration is not None)) if value]
    if len(given) != 1:
        raise _Usage("give exactly one of --to-now, --to-time T, --by-duration D"
                     + (f" (not {' and '.join(given)})" if given else ""))
    if to_now:
        return Target(None, None)
    if to_time is not None:
        option, wanted = f"--to-time {to_time}", parse_time(to_time)
    else:
        assert by_duration is not None
        try:
            back = parse_duration(by_duration)
        except ValueError as exc:
            raise _Usage(f"--by-duration {by_duration!r}: {exc}") from None
        option, wanted = f"--by-duration {by_duration}", now - back
    if wanted > now:
        raise _Usage(f"{option}: {_second(wanted)} is in the future (now is {_second(now)})")
    # CMDB returns the events strictly after bk_start_from, to the second: one second earlier replays all of
    # T's second (a few events at most from before T) and never misses one after T.
    start_from = math.floor(wanted) - 1
    retention = cfg.watch.retention
    oldest = now - retention + RESUME_MARGIN
    if start_from < oldest:
        raise _Usage(
            f"{option}: {_second(wanted)} is outside the retention window: CMDB keeps {_span(retention)} of events "
            f"(watch.retention), so the earliest start is {_iso(math.ceil(oldest) + 1)} (now − {_span(retention)} "
            f"+ {int(RESUME_MARGIN)} s); older history is gone: use --to-now and `rwatch resync`")
    return Target(start_from, wanted)


def _effect(old: CursorState | None, target: Target, now: float) -> tuple[str, float | None]:
    """What the move does to delivery: ("replay" | "skip" | "unknown", seconds)."""
    if old is None or old.mode == "now":
        return "unknown", None
    was = _position_time(old)
    if was is None:
        return "unknown", None
    new = float(target.start_from) if target.start_from is not None else now
    return ("replay", was - new) if new <= was else ("skip", new - was)


def _describe(view: dict[str, Any], *, saved: bool = True) -> str:
    mode = view["mode"]
    when = f", saved {_span(view['saved_ago'])} ago" if saved and view["saved_ago"] is not None else ""
    if mode == "none":
        return "nothing saved (a watcher starts from now)"
    if mode == "now":
        return f"from now (CMDB's newest event on){when}"
    if mode == "start_from":
        return f"start_from {view['start_from']}: events from {_iso(view['start_from'] + 1)} on{when}"
    if view["oldest_retained"]:
        at = "the oldest retained event"
    elif view["event_time_iso"]:
        at = f"event time {view['event_time_iso']} ({_span(view['cursor_age'])} old)"
    else:
        at = "an undecodable event time"
    return f"cursor at {at}{when}"


@dataclass(slots=True)
class _Outcome:
    old: CursorState | None
    lease: Lease | None  # another owner's live lease (refused), or the current lease row (dry run)
    applied: bool = False
    release_error: str | None = None


def _owner() -> str:
    return f"rwatch-cursors-reset:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


async def _reset(cfg: Config, resource: str, target: Target, *, execute: bool) -> _Outcome:
    tenant = cfg.cmdb.tenant
    async with _store(cfg, create=execute) as store:
        if store is None:
            return _Outcome(None, None)

        async def lease_row() -> Lease | None:
            return next((lease for lease in await store.leases(tenant) if lease.resource == resource), None)

        if not execute:
            return _Outcome(await store.load(tenant, resource), await lease_row())
        owner = _owner()
        fence = await store.acquire(tenant, resource, owner, RESET_LEASE_TTL)
        if fence is None:
            return _Outcome(await store.load(tenant, resource), await lease_row())
        outcome = _Outcome(None, None)
        try:
            outcome.old = await store.load(tenant, resource)
            # Fenced: written only while our lease holds, whatever the clocks of the other replicas say.
            await store.save(target.state(tenant, resource, time.time()), fence=fence)
            outcome.applied = True
        finally:
            try:
                await store.release(tenant, resource, owner)
            except StoreError as exc:
                outcome.release_error = str(exc)
        return outcome


@cursors_app.command("reset")
def reset_cmd(
    resource: Annotated[str, typer.Argument(help="the resource whose position moves, e.g. host")],
    to_now: Annotated[bool, typer.Option("--to-now", help="start from CMDB's newest event (no bootstrap gap)")] = False,
    to_time: Annotated[str | None, typer.Option(
        "--to-time", metavar="T", help="replay from T: ISO-8601 (UTC when no offset) or Unix seconds")] = None,
    by_duration: Annotated[str | None, typer.Option(
        "--by-duration", metavar="D", help="replay from now − D, e.g. 30m, 2h, 1h30m")] = None,
    execute: Annotated[bool, typer.Option(
        "--execute", help="apply it (default: a dry run that only prints the change)")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move RESOURCE's saved position; a dry run unless --execute, refused while a running rwatch holds it."""
    cfg = _load(config)
    if resource not in cfg.watch.resources:
        typer.echo(f"rwatch cursors: unknown resource {resource!r} (known: {', '.join(cfg.watch.resources)})",
                   err=True)
        raise typer.Exit(2)
    now = time.time()
    try:
        target = choose_target(cfg, to_now=to_now, to_time=to_time, by_duration=by_duration, now=now)
    except _Usage as exc:
        typer.echo(f"rwatch cursors reset: {exc}", err=True)
        raise typer.Exit(2) from None
    outcome = _run(cfg, lambda: _reset(cfg, resource, target, execute=execute))
    now = time.time()
    refused = execute and not outcome.applied
    holder = outcome.lease if outcome.lease is not None and outcome.lease.expires_at > now else None
    new = target.state(cfg.cmdb.tenant, resource, now)
    old_view, new_view = _state_view(outcome.old, now), _state_view(new, now)
    effect, seconds = _effect(outcome.old, target, now)
    if as_json:
        typer.echo(json.dumps({
            "tenant": cfg.cmdb.tenant, "resource": resource, "enabled": resource in cfg.watch.enabled,
            "execute": execute, "applied": outcome.applied, "refused": refused,
            "requested": target.requested, "requested_iso": _iso(target.requested),
            "old": old_view, "new": {k: new_view[k] for k in ("mode", "cursor", "start_from", "event_time",
                                                              "event_time_iso")},
            "effect": effect, "effect_seconds": round(seconds, 3) if seconds is not None else None,
            "lease": _lease_view(holder, now),
        }, indent=2))
    else:
        note = "" if resource in cfg.watch.enabled else " (not enabled in [watch.resources])"
        title = "reset" if outcome.applied else "reset REFUSED" if refused else "reset plan"
        typer.echo(f"{resource}{note}: {title} (tenant {cfg.cmdb.tenant})")
        typer.echo(f"  old: {_describe(old_view)}")
        typer.echo(f"  new: {_describe(new_view, saved=False)}")
        if effect == "replay":
            typer.echo(f"  effect: replays {_span(seconds or 0.0)} of events (consumers apply them idempotently)")
        elif effect == "skip":
            typer.echo(f"  effect: skips {_span(seconds or 0.0)} of history, recorded nowhere: run "
                       f"`rwatch resync -r {resource}` if consumers need it")
        if holder is not None and not refused:
            typer.echo(f"  lease: held by {holder.owner} until {_second(holder.expires_at)}: --execute is refused "
                       "while a running rwatch holds it")
    if refused:
        who = (f"{holder.owner} holds the lease of {resource} until {_second(holder.expires_at)} "
               f"(in {_span(holder.expires_at - now)})") if holder is not None else f"{resource}'s lease is held"
        typer.echo(f"rwatch cursors reset: refused: {who}; stop every rwatch following {resource} and run it "
                   "again", err=True)
        raise typer.Exit(1)
    if outcome.release_error is not None:
        typer.echo(f"rwatch cursors reset: warning: the reset's lease was not released ({outcome.release_error}); "
                   f"it expires within {int(RESET_LEASE_TTL)} s", err=True)
    if not execute and not as_json:
        typer.echo("dry run: pass --execute to apply")
