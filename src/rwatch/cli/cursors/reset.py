"""``rwatch cursors reset``: move a resource's saved position; a dry run unless ``--execute``, fenced by a lease."""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rwatch.cli.common import ConfigOption, load
from rwatch.cli.cursors.common import JsonOption, Usage, cursor_store, iso, run_step, second, span
from rwatch.cli.cursors.views import lease_view, position_time, state_view
from rwatch.errors import StoreError

if TYPE_CHECKING:
    from rwatch.config import Config
    from rwatch.store.records import CursorState, Lease

RESET_LEASE_TTL = 30.0  # how long the reset's own lease lives if it cannot release it (it releases at once)


def parse_time(text: str) -> float:
    """Unix seconds from ISO-8601 (``Z``, an offset, or none for UTC) or from a number of Unix seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise Usage(f"--to-time {text!r}: not ISO-8601 (e.g. 2024-11-26T10:00:00Z) nor Unix seconds") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        seconds = parsed.timestamp()
    if not math.isfinite(seconds):
        raise Usage(f"--to-time {text!r}: not a time")
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
    from rwatch.watch.resume import RESUME_MARGIN

    given = [name for name, value in (("--to-now", to_now), ("--to-time", to_time is not None),
                                      ("--by-duration", by_duration is not None)) if value]
    if len(given) != 1:
        raise Usage("give exactly one of --to-now, --to-time T, --by-duration D"
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
            raise Usage(f"--by-duration {by_duration!r}: {exc}") from None
        option, wanted = f"--by-duration {by_duration}", now - back
    if wanted > now:
        raise Usage(f"{option}: {second(wanted)} is in the future (now is {second(now)})")
    # CMDB returns the events strictly after bk_start_from, to the second: one second earlier replays all of
    # T's second (a few events at most from before T) and never misses one after T.
    start_from = math.floor(wanted) - 1
    retention = cfg.watch.retention
    oldest = now - retention + RESUME_MARGIN
    if start_from < oldest:
        raise Usage(
            f"{option}: {second(wanted)} is outside the retention window: CMDB keeps {span(retention)} of events "
            f"(watch.retention), so the earliest start is {iso(math.ceil(oldest) + 1)} (now − {span(retention)} "
            f"+ {int(RESUME_MARGIN)} s); older history is gone: use --to-now and `rwatch resync`")
    return Target(start_from, wanted)


def _effect(old: CursorState | None, target: Target, now: float) -> tuple[str, float | None]:
    """What the move does to delivery: ("replay" | "skip" | "unknown", seconds)."""
    if old is None or old.mode == "now":
        return "unknown", None
    was = position_time(old)
    if was is None:
        return "unknown", None
    new = float(target.start_from) if target.start_from is not None else now
    return ("replay", was - new) if new <= was else ("skip", new - was)


def _describe(view: dict[str, Any], *, saved: bool = True) -> str:
    mode = view["mode"]
    when = f", saved {span(view['saved_ago'])} ago" if saved and view["saved_ago"] is not None else ""
    if mode == "none":
        return "nothing saved (a watcher starts from now)"
    if mode == "now":
        return f"from now (CMDB's newest event on){when}"
    if mode == "start_from":
        return f"start_from {view['start_from']}: events from {iso(view['start_from'] + 1)} on{when}"
    if view["oldest_retained"]:
        at = "the oldest retained event"
    elif view["event_time_iso"]:
        at = f"event time {view['event_time_iso']} ({span(view['cursor_age'])} old)"
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
    async with cursor_store(cfg, create=execute) as store:
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
    cfg = load(config)
    if resource not in cfg.watch.resources:
        typer.echo(f"rwatch cursors: unknown resource {resource!r} (known: {', '.join(cfg.watch.resources)})",
                   err=True)
        raise typer.Exit(2)
    now = time.time()
    try:
        target = choose_target(cfg, to_now=to_now, to_time=to_time, by_duration=by_duration, now=now)
    except Usage as exc:
        typer.echo(f"rwatch cursors reset: {exc}", err=True)
        raise typer.Exit(2) from None
    outcome = run_step(cfg, lambda: _reset(cfg, resource, target, execute=execute))
    now = time.time()
    refused = execute and not outcome.applied
    holder = outcome.lease if outcome.lease is not None and outcome.lease.expires_at > now else None
    new = target.state(cfg.cmdb.tenant, resource, now)
    old_view, new_view = state_view(outcome.old, now), state_view(new, now)
    effect, seconds = _effect(outcome.old, target, now)
    if as_json:
        typer.echo(json.dumps({
            "tenant": cfg.cmdb.tenant, "resource": resource, "enabled": resource in cfg.watch.enabled,
            "execute": execute, "applied": outcome.applied, "refused": refused,
            "requested": target.requested, "requested_iso": iso(target.requested),
            "old": old_view, "new": {k: new_view[k] for k in ("mode", "cursor", "start_from", "event_time",
                                                              "event_time_iso")},
            "effect": effect, "effect_seconds": round(seconds, 3) if seconds is not None else None,
            "lease": lease_view(holder, now),
        }, indent=2))
    else:
        note = "" if resource in cfg.watch.enabled else " (not enabled in [watch.resources])"
        title = "reset" if outcome.applied else "reset REFUSED" if refused else "reset plan"
        typer.echo(f"{resource}{note}: {title} (tenant {cfg.cmdb.tenant})")
        typer.echo(f"  old: {_describe(old_view)}")
        typer.echo(f"  new: {_describe(new_view, saved=False)}")
        if effect == "replay":
            typer.echo(f"  effect: replays {span(seconds or 0.0)} of events (consumers apply them idempotently)")
        elif effect == "skip":
            typer.echo(f"  effect: skips {span(seconds or 0.0)} of history, recorded nowhere: run "
                       f"`rwatch resync -r {resource}` if consumers need it")
        if holder is not None and not refused:
            typer.echo(f"  lease: held by {holder.owner} until {second(holder.expires_at)}: --execute is refused "
                       "while a running rwatch holds it")
    if refused:
        who = (f"{holder.owner} holds the lease of {resource} until {second(holder.expires_at)} "
               f"(in {span(holder.expires_at - now)})") if holder is not None else f"{resource}'s lease is held"
        typer.echo(f"rwatch cursors reset: refused: {who}; stop every rwatch following {resource} and run it "
                   "again", err=True)
        raise typer.Exit(1)
    if outcome.release_error is not None:
        typer.echo(f"rwatch cursors reset: warning: the reset's lease was not released ({outcome.release_error}); "
                   f"it expires within {int(RESET_LEASE_TTL)} s", err=True)
    if not execute and not as_json:
        typer.echo("dry run: pass --execute to apply")
