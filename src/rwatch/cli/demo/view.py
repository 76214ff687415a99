"""The demo's live view: per resource, events published and applied, mirror rows and the newest event's time; with
``--zabbix``, one line for the zabbix sink."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from rwatch.cli.demo.options import ACTIONS, SINK, DemoOptions
from rwatch.cli.demo.zabbix import ZabbixWatch

if TYPE_CHECKING:
    from rich.table import Table

    from rwatch.config import Config
    from rwatch.sim.server import Simulator


def say(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


@dataclass
class Row:
    resource: str
    published: int = 0
    applied: int = 0
    rows: int | None = None
    last_event: float | None = None  # CMDB time of the newest event applied to the mirror


class View:
    """Per resource: events published, applied to the mirror, live mirror rows and the newest event's time,
    read from the process's own counters and from the mirror file."""

    def __init__(self, config: Config, options: DemoOptions, sim: Simulator) -> None:
        self.resources: list[str] = list(config.watch.enabled)
        self.options = options
        self.sim = sim
        self.started = time.monotonic()
        self.history: list[tuple[float, int]] = []  # (monotonic, total applied) for the rate
        self.zabbix = ZabbixWatch() if options.zabbix is not None else None

    @staticmethod
    def _counter(name: str, labels: dict[str, str]) -> int:
        from prometheus_client import REGISTRY

        total = 0.0
        for action in ACTIONS:
            total += REGISTRY.get_sample_value(name, {**labels, "action": action}) or 0.0
        return int(total)

    def _mirror(self) -> dict[str, tuple[int, float | None]]:
        path = self.options.files.mirror
        if not path.exists():
            return {}
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.25)
        except sqlite3.Error:
            return {}
        try:
            found = conn.execute(
                "SELECT resource, SUM(CASE WHEN deleted THEN 0 ELSE 1 END), MAX(version_s) FROM rwatch_objects "
                "GROUP BY resource").fetchall()
        except sqlite3.Error:  # not created yet, or busy for a moment: next tick
            return {}
        finally:
            conn.close()
        return {str(r): (int(n or 0), float(v) if v is not None else None) for r, n, v in found}

    async def sample(self) -> list[Row]:
        mirror = await asyncio.to_thread(self._mirror)
        rows = []
        for resource in self.resources:
            row = Row(resource,
                      published=self._counter("rwatch_events_published_total", {"resource": resource}),
                      applied=self._counter("rwatch_events_applied_total", {"sink": SINK, "resource": resource}))
            if resource in mirror:
                row.rows, row.last_event = mirror[resource]
            rows.append(row)
        if self.zabbix is not None:
            self.zabbix.sample()
        now = time.monotonic()
        self.history.append((now, sum(r.applied for r in rows)))
        self.history = [h for h in self.history if now - h[0] <= 5.0]
        return rows

    def rate(self) -> float:
        if len(self.history) < 2 or self.history[-1][0] - self.history[0][0] <= 0:
            return 0.0
        (t0, n0), (t1, n1) = self.history[0], self.history[-1]
        return (n1 - n0) / (t1 - t0)

    def changes(self) -> int:
        return sum(self.sim.load.applied.values())

    async def run(self, stop: asyncio.Event, daemon: asyncio.Task[None], out: TextIO, *,
                  deadline: float | None) -> None:
        """Refresh until ``stop``, the deadline (monotonic) or rwatch's end."""
        if self.options.live:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=out)
            with Live(self.table(await self.sample()), console=console, auto_refresh=False,
                      transient=False) as live:
                while not await self._tick(stop, daemon, deadline, 0.5):
                    live.update(self.table(await self.sample()), refresh=True)
                live.update(self.table(await self.sample()), refresh=True)
        else:
            while not await self._tick(stop, daemon, deadline, 1.0):
                say(out, self.line(await self.sample()))

    async def _tick(self, stop: asyncio.Event, daemon: asyncio.Task[None], deadline: float | None,
                    every: float) -> bool:
        """Wait one refresh period; True when it is time to stop."""
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiter, daemon}, timeout=every, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        return stop.is_set() or daemon.done() or (deadline is not None and time.monotonic() >= deadline)

    def line(self, rows: list[Row]) -> str:
        """One plain summary line (stdout is not a terminal)."""
        parts = [f"{r.resource} published={r.published} applied={r.applied} rows={'-' if r.rows is None else r.rows}"
                 for r in rows]
        elapsed = time.monotonic() - self.started
        if self.zabbix is not None:
            parts.append(self.zabbix.state.text())
        return f"[{elapsed:5.0f}s] changes={self.changes()} applied/s={self.rate():.1f} | " + " | ".join(parts)

    def table(self, rows: list[Row]) -> Table:
        from rich.table import Table

        elapsed = time.monotonic() - self.started
        table = Table(title=f"rwatch demo, {elapsed:.0f} s: {self.changes()} simulated changes, "
                            f"{self.rate():.1f} events applied/s", title_justify="left",
                      caption="Ctrl-C stops" if self.zabbix is None else f"{self.zabbix.state.text()}\nCtrl-C stops",
                      caption_justify="left")
        table.add_column("resource")
        for name in ("published", "applied", "mirror rows"):
            table.add_column(name, justify="right")
        table.add_column("last event", justify="right")
        now = time.time()
        for r in rows:
            last = "-" if r.last_event is None else (
                f"{time.strftime('%H:%M:%S', time.localtime(r.last_event))} ({max(0.0, now - r.last_event):.0f} s ago)")
            behind = r.applied < r.published
            table.add_row(r.resource, str(r.published), str(r.applied), "-" if r.rows is None else str(r.rows), last,
                          style="yellow" if behind else None)
        table.add_row("total", str(sum(r.published for r in rows)), str(sum(r.applied for r in rows)),
                      str(sum(r.rows or 0 for r in rows)), "", style="bold")
        return table
