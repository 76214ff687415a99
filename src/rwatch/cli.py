"""The ``rwatch`` command. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import tomli_w
import typer

from rwatch import __version__
from rwatch.config import Config, load_config
from rwatch.errors import ConfigError, RwatchError

T = TypeVar("T")

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
    role: Annotated[str, typer.Option(help="watcher (CMDB -> bus), consumer (bus -> sinks) or all")] = "all",
) -> None:
    """Run the daemon."""
    from rwatch.app import run as run_daemon
    from rwatch.logs import setup_logging

    if role not in ("watcher", "consumer", "all"):
        typer.echo(f"rwatch: --role {role!r}: choose watcher, consumer or all", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    # A jsonl sink on stdout owns stdout: the logs move to stderr so the two streams never interleave.
    events_on_stdout = any(s.kind == "jsonl" and s.enabled and getattr(s, "path", None) == "-"
                           for s in cfg.sinks.values())
    setup_logging(cfg.log.level, cfg.log.format, sys.stderr if events_on_stdout else None)
    try:
        run_daemon(cfg, role="watcher" if role == "watcher" else "consumer" if role == "consumer" else "all")
    except ConfigError as exc:
        typer.echo(f"rwatch: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def sim(
    listen: Annotated[str, typer.Option(help="host:port to serve on (port 0 picks one)")] = "127.0.0.1:8089",
    hold: Annotated[float, typer.Option(help="seconds a cursor-mode long-poll is held (CMDB: 20)")] = 20.0,
    retention: Annotated[str, typer.Option(help="event window, e.g. 6h (CMDB's code), 3h (its docs)")] = "6h",
    error_delay: Annotated[float, typer.Option(help="pause before every error reply (CMDB: 0.5)")] = 0.5,
    app_code: Annotated[str | None, typer.Option(help="require this app code (default: accept any)")] = None,
    app_secret: Annotated[str | None, typer.Option(envvar="RWATCH_SIM_APP_SECRET",
                                                   help="require this app secret")] = None,
    seed: Annotated[int, typer.Option(help="seeds the topology, load and random faults")] = 0,
    bizs: Annotated[int, typer.Option(help="businesses in the initial topology")] = 2,
    sets_per_biz: Annotated[int, typer.Option(help="sets per business")] = 2,
    modules_per_set: Annotated[int, typer.Option(help="modules per set")] = 2,
    hosts: Annotated[int, typer.Option(help="hosts in the initial topology")] = 20,
    load_rate: Annotated[float, typer.Option(help="random changes per second (0 = off)")] = 0.0,
    load_mix: Annotated[str | None, typer.Option(
        help='operation weights as JSON, e.g. \'{"host.update": 5, "host.move": 1}\'')] = None,
    detail_mode: Annotated[str, typer.Option(help="snapshot (CMDB <= 3.13) or latest (3.14+)")] = "snapshot",
    deny: Annotated[list[str] | None, typer.Option(help="answer 9900403 for this resource (repeatable)")] = None,
    deny_api: Annotated[list[str] | None, typer.Option(
        help="the app is not granted this API on the gateway: 403 1640301 (repeatable; resource_watch, a list "
             "API name, or * for all)")] = None,
    tenant_mode: Annotated[str, typer.Option(
        help="single (X-Bk-Tenant-Id ignored) or multi (checked: 403 1640302 at the gateway, 1100005 at CMDB)")
    ] = "single",
    tenant: Annotated[str, typer.Option(help="the tenant whose data the simulator holds (multi mode)")] = "default",
    app_tenant: Annotated[str | None, typer.Option(
        help="the calling app's tenant in multi mode (default: an app valid in every tenant)")] = None,
    gateway_error_rate: Annotated[float, typer.Option(
        help="probability of a gateway error (429/502/503/504; ESB: HTTP 200, or 1306201) on any CMDB request")
    ] = 0.0,
    hide_biz: Annotated[list[int] | None, typer.Option(
        help="the user may not view this business in IAM: lists leave it out or answer 9900403 (repeatable)")
    ] = None,
    log_format: Annotated[str, typer.Option(help="json or console")] = "json",
) -> None:
    """Run the CMDB simulator: resource_watch, the resync list APIs, an admin API, load and faults."""
    import asyncio
    import json
    import signal

    from rwatch.cmdb.protocol import RESOURCES
    from rwatch.config import parse_duration
    from rwatch.logs import setup_logging
    from rwatch.sim.gate import WATCH_API
    from rwatch.sim.lists import APIS
    from rwatch.sim.parts import SimOptions
    from rwatch.sim.permissions import ALL_APIS
    from rwatch.sim.server import serve

    def bad(option: str, why: str) -> typer.Exit:
        typer.echo(f"rwatch sim: {option}: {why}", err=True)
        return typer.Exit(2)

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise bad("--listen", f"{listen!r} is not host:port")
    try:
        retention_s = parse_duration(retention)
    except ValueError as exc:
        raise bad("--retention", str(exc)) from None
    mix = None
    if load_mix:
        try:
            mix = json.loads(load_mix)
        except json.JSONDecodeError as exc:
            raise bad("--load-mix", f"not JSON: {exc}") from None
        if not isinstance(mix, dict) or not all(isinstance(v, int | float) for v in mix.values()):
            raise bad("--load-mix", "must be an object of operation -> weight")
    if detail_mode not in ("snapshot", "latest"):
        raise bad("--detail-mode", "choose snapshot or latest")
    if log_format not in ("json", "console"):
        raise bad("--log-format", "choose json or console")
    for name in deny or ():
        if name not in RESOURCES:
            raise bad("--deny", f"unknown resource {name!r}")
    apis = {ALL_APIS, WATCH_API, *APIS}
    for name in deny_api or ():
        if name not in apis:
            raise bad("--deny-api", f"unknown API {name!r}; choose from {', '.join(sorted(apis))}")
    if tenant_mode not in ("single", "multi"):
        raise bad("--tenant-mode", "choose single or multi")
    if not 0 <= gateway_error_rate <= 1:
        raise bad("--gateway-error-rate", "must be between 0 and 1")
    options = SimOptions(
        host=host.strip("[]") or "127.0.0.1", port=int(port), hold=hold, retention=retention_s,
        error_delay=error_delay, app_code=app_code, app_secret=app_secret, seed=seed, bizs=bizs,
        sets_per_biz=sets_per_biz, modules_per_set=modules_per_set, hosts=hosts, load_rate=load_rate,
        load_mix=mix, detail_mode="latest" if detail_mode == "latest" else "snapshot",
        denied_resources=frozenset(deny or ()), denied_apis=frozenset(deny_api or ()),
        tenant_mode="multi" if tenant_mode == "multi" else "single", tenant=tenant, app_tenant=app_tenant,
        gateway_error_rate=gateway_error_rate, hidden_bizs=frozenset(hide_biz or ()),
    )
    setup_logging("info", log_format)  # the simulator logs sim_started (with its url) and sim_stopped

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(options, stop)

    try:
        asyncio.run(main())
    except ValueError as exc:  # options the simulator itself refuses (e.g. an unknown load operation)
        raise bad("options", str(exc)) from None
    except OSError as exc:
        typer.echo(f"rwatch sim: cannot listen on {listen}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None


@app.command("check-config")
def check_config(
    config: ConfigOption = None,
    role: Annotated[str, typer.Option(help="also check it can run with this --role: watcher, consumer or all")] = "all",
) -> None:
    """Validate the configuration and print it, effective and with secrets masked."""
    if role not in ("watcher", "consumer", "all"):
        typer.echo(f"rwatch: --role {role!r}: choose watcher, consumer or all", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    try:
        cfg.check_role(role)
    except ConfigError as exc:
        typer.echo(f"rwatch: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None
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
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"rwatch: {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if ok else 1)


dlq_app = typer.Typer(help="Dead letters: events a sink refused for good.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(help="only this sink")] = None,
    limit: Annotated[int, typer.Option(help="show at most this many")] = 1000,
) -> None:
    """List dead letters (they stay in their queue)."""
    import asyncio

    from rwatch.bus.dlq import list_dead

    cfg = _load(config)
    letters = _dlq_call(lambda: asyncio.run(list_dead(cfg, sink, limit)))
    typer.echo(f"{'sink':<12} {'resource':<16} {'action':<7} {'failed at':<27} {'event id':<16} {'attempts':>8}  "
               "reason")
    for d in letters:
        attempts = "-" if d.attempts is None else str(d.attempts)
        typer.echo(f"{d.sink:<12} {d.resource:<16} {d.action:<7} {d.failed_at:<27} {d.event_id[:16]:<16} "
                   f"{attempts:>8}  {d.reason}")
    typer.echo(f"{len(letters)} dead letter(s)")


@dlq_app.command("replay")
def dlq_replay(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(help="only this sink")] = None,
    resource: Annotated[str | None, typer.Option(help="only this resource")] = None,
) -> None:
    """Move dead letters back to their sink's queue, to be applied again."""
    import asyncio

    from rwatch.bus.dlq import replay

    cfg = _load(config)
    moved = _dlq_call(lambda: asyncio.run(replay(cfg, sink, resource)))
    typer.echo(f"replayed {moved} dead letter(s)")


def _dlq_call(call: Callable[[], T]) -> T:
    try:
        return call()
    except ValueError as exc:
        typer.echo(f"rwatch dlq: {exc}", err=True)
        raise typer.Exit(2) from None
    except (OSError, ConnectionError) as exc:
        typer.echo(f"rwatch dlq: cannot reach the broker: {exc}", err=True)
        raise typer.Exit(1) from None
    except RwatchError as exc:  # e.g. the broker's queues disagree with the configuration
        typer.echo(f"rwatch dlq: {exc}", err=True)
        raise typer.Exit(1) from None


# --- rwatch resync ---------------------------------------------------------------------------------------


@app.command("resync")
def resync_cmd(
    config: ConfigOption = None,
    resource: Annotated[list[str] | None, typer.Option(
        "--resource", "-r", help="resync this resource (repeatable; default: every enabled resyncable one)")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar (default: when stderr is a terminal)")] = (
        sys.stderr.isatty()),
    allow_mass_delete: Annotated[bool, typer.Option(
        "--allow-mass-delete", help="let through a sweep the mass-delete guard would hold (after looking)")] = False,
) -> None:
    """List resources through CMDB's list APIs and publish them as a snapshot (list, then sweep); fills the
    gaps recorded before it started. Safe beside a running daemon. Exit 0: every resource resynced."""
    import asyncio
    import signal

    from rwatch.cli_resync import resync_now
    from rwatch.errors import ResyncUnsupported
    from rwatch.logs import setup_logging
    from rwatch.watch.resync import Resyncer, ResyncResult

    cfg = _load(config)
    setup_logging(cfg.log.level, cfg.log.format, sys.stderr)
    chosen = list(resource or [r for r in cfg.watch.enabled if r in Resyncer.SUPPORTED])
    for name in chosen:
        if name not in cfg.watch.resources:
            typer.echo(f"rwatch resync: --resource {name!r}: no such resource", err=True)
            raise typer.Exit(2)
        try:
            Resyncer.check(name)
        except ResyncUnsupported as exc:
            typer.echo(f"rwatch resync: --resource {name!r}: {exc}", err=True)
            raise typer.Exit(2) from None
    if not chosen:
        typer.echo("rwatch resync: no enabled resource can be resynced", err=True)
        raise typer.Exit(2)

    async def main() -> dict[str, ResyncResult | BaseException]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if not progress:
            return await resync_now(cfg, chosen, stop, allow_mass_delete=allow_mass_delete)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # On stderr: stdout carries the summary, one line per resource.
        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bar:
            tasks = {name: bar.add_task(name, total=None) for name in chosen}

            def update(name: str, listed: int, total: int | None) -> None:
                bar.update(tasks[name], completed=listed, total=max(total, listed) if total is not None else None)

            return await resync_now(cfg, chosen, stop, progress=update, allow_mass_delete=allow_mass_delete)

    try:
        outcome = asyncio.run(main())
    except RwatchError as exc:
        typer.echo(f"rwatch resync: {exc}", err=True)
        raise typer.Exit(1) from None
    failed = False
    for name in chosen:
        result = outcome.get(name)
        if isinstance(result, ResyncResult):
            typer.echo(f"{name}: {result.listed} objects at version {list(result.version)}, "
                       f"{sum(result.requests.values())} list requests, {result.seconds:.1f} s"
                       + ("" if result.complete else ", INCOMPLETE: nothing swept, gaps stay open"))
            if result.guard is not None:
                typer.echo(f"{name}: {result.guard.describe()}")
            for reason in result.reasons:
                failed = True
                typer.echo(f"{name}: {'held' if result.guard and result.guard.held else 'not proved complete'}: "
                           f"{reason}", err=True)
        else:
            failed = True
            typer.echo(f"{name}: FAILED: {result!r}" if result is not None else f"{name}: stopped", err=True)
    raise typer.Exit(1 if failed else 0)


# --- rwatch verify (self-contained block) ----------------------------------------------------------------


@app.command("verify")
def verify_cmd(
    config: ConfigOption = None,
    sink: Annotated[str | None, typer.Option(help="the mirror sink to check (default: the first enabled one)")] = None,
    resource: Annotated[list[str] | None, typer.Option(
        "--resource", "-r", help="check this resource (repeatable; default: every enabled resyncable one)")] = None,
    repair: Annotated[bool, typer.Option(help="resync every drifting resource, then verify again")] = False,
    wait: Annotated[float, typer.Option(
        min=0, help="--repair with bus.kind amqp: seconds to wait for the daemon's consumers to apply it")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON document instead of a table")] = False,
    allow_mass_delete: Annotated[bool, typer.Option(
        "--allow-mass-delete", help="--repair: let through a sweep the mass-delete guard would hold")] = False,
) -> None:
    """Compare a mirror sink with CMDB object by object. Exit 0: equal, 1: drift (or a failure)."""
    import asyncio
    import json

    from rwatch.cli_resync import verify
    from rwatch.errors import ResyncUnsupported
    from rwatch.logs import setup_logging

    cfg = _load(config)
    setup_logging(cfg.log.level, cfg.log.format, sys.stderr)  # stdout is the report's
    try:
        report = asyncio.run(verify(cfg, sink=sink, resources=resource, repair=repair, wait=wait,
                                    allow_mass_delete=allow_mass_delete))
    except (ConfigError, ResyncUnsupported) as exc:
        typer.echo(f"rwatch verify: {exc}", err=True)
        raise typer.Exit(2) from None
    except (RwatchError, OSError) as exc:
        typer.echo(f"rwatch verify: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_verify(report)
    raise typer.Exit(0 if report.final.drift == 0 else 1)


def _print_verify(report: object) -> None:
    from rwatch.watch.verify import VerifyReport

    assert isinstance(report, VerifyReport)
    passes = [("", report)] if report.after is None else [("before repair", report), ("after repair", report.after)]
    for title, one in passes:
        if title == "after repair":
            typer.echo(f"\nrepaired by a full resync: {', '.join(report.repaired)}")
        head = ["resource", "business", "cmdb", "mirror", "checksum", "missing", "extra", "changed", "ignored"]
        rows: list[list[str]] = []
        for r in one.resources:
            for i, g in enumerate(r.groups if len(r.groups) > 1 else []):
                rows.append([r.resource if i == 0 else "", g.group, str(g.cmdb), str(g.mirror),
                             "equal" if g.equal else "DIFFERS", "", "", "", ""])
            rows.append([r.resource if len(r.groups) < 2 else "", "all", str(r.cmdb), str(r.mirror),
                         "equal" if not r.drift else "DIFFERS", str(len(r.missing)), str(len(r.extra)),
                         str(len(r.changed)), str(r.ignored)])
        caption = f"mirror sink {one.sink!r} vs CMDB {one.cmdb_url} (tenant {one.tenant})"
        caption = f"{caption}, {title}" if title else caption
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # pragma: no cover - rich comes with typer
            widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
            typer.echo(caption)
            for row in (head, *rows):
                cells = zip(row, widths, strict=True)
                typer.echo("  ".join(c.rjust(w) if c.isdigit() else c.ljust(w) for c, w in cells).rstrip())
        else:
            table = Table(title=caption, title_justify="left")
            for name in head:
                table.add_column(name, justify="right" if name not in ("resource", "business", "checksum") else "left")
            for row in rows:
                table.add_row(*row, style="red" if "DIFFERS" in row else None)
            Console(width=max(120, len(caption) + 2), soft_wrap=True).print(table)
        for r in one.resources:
            for kind, keys in (("missing", r.missing), ("extra", r.extra), ("changed", r.changed)):
                if keys:
                    more = f" ... and {len(keys) - 20} more" if len(keys) > 20 else ""
                    typer.echo(f"{r.resource} {kind} ({len(keys)}): {' '.join(keys[:20])}{more}")
        for name, why in one.skipped.items():
            typer.echo(f"skipped {name}: {why}")
        for r in one.resources:
            if r.hidden_businesses:
                typer.echo(f"{r.resource}: {r.hidden} mirror rows in {len(r.hidden_businesses)} businesses hidden "
                           f"from the user, not compared: {' '.join(map(str, r.hidden_businesses[:20]))}")
            if r.guard is not None and r.guard.over:
                typer.echo(f"{r.resource}: a resync now: {r.guard.describe()}")
            if r.unproven:
                typer.echo(f"{r.resource}: {len(r.unproven)} mirror rows CMDB does not list, deleted or moved into a "
                           f"hidden business (cannot tell): {' '.join(r.unproven[:20])}")
            for reason in r.reasons:
                typer.echo(f"{r.resource}: CMDB's listing is not proved complete: {reason}")
        typer.echo("no drift" if not one.drift else f"drift: {one.drift} object(s) in "
                   f"{', '.join(r.resource for r in one.resources if r.drift)}")


# --- end of rwatch verify --------------------------------------------------------------------------------


@app.command()
def doctor(
    config: ConfigOption = None,
    resource: Annotated[list[str] | None, typer.Option(
        "--resource", "-r", help="check this resource (repeatable; default: every enabled one)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON document instead of a table")] = False,
) -> None:
    """Check a real CMDB before `rwatch run`: reachability, channel, credentials, tenant, clock, the gateway grant
    and IAM action of every resource, the list APIs of resyncs, and businesses hidden from the user. A verdict and
    a fix per line. Exit 0: rwatch can run, 1: it cannot."""
    import asyncio
    import json
    import shutil

    from rwatch.doctor import diagnose, render
    from rwatch.logs import setup_logging

    cfg = _load(config)
    setup_logging("error", cfg.log.format, sys.stderr)  # stdout is the report's
    for name in resource or ():
        if name not in cfg.watch.resources:
            typer.echo(f"rwatch doctor: --resource {name!r}: no such resource", err=True)
            raise typer.Exit(2)
    report = asyncio.run(diagnose(cfg, list(resource) if resource else None))
    width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else render(report, width=width))
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# Commands with modules of their own.
from rwatch.cli_cursors import cursors_app  # noqa: E402
from rwatch.cli_demo import demo  # noqa: E402

app.add_typer(cursors_app, name="cursors")
app.command("demo")(demo)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C before the loop installed its handlers
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
