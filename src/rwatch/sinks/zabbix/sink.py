"""The zabbix sink: a projection of a mirror's topology that keeps Zabbix's managed groups and hosts equal to it.

After each commit of its mirror (debounced, ``debounce``) it reads the topology and the mirror's host rows,
computes the desired state (``desired``), and reconciles (``reconcile``) only the hosts whose desired state changed
since the last reconcile that succeeded: a batch that moved three hosts costs a few calls whatever the size of
Zabbix. A rename of a biz, set or module changes every host below it, so they all come into that scope, and their
group is renamed in place. The first reconcile after start, then one every ``full_every``, covers everything: it
repairs what an operator changed by hand on managed objects and what a crash left half-written.

Deletes need proof. A managed host leaves Zabbix (per ``on_delete``) only when the mirror holds CMDB's delete of it
(a tombstone); a host missing from the mirror without one (a new or restored mirror file) is left as it is, logged
as ``zabbix_removal_unproven``. And the mass-delete guard (``watch.mass_delete_share`` / ``mass_delete_floor``)
holds a removal larger than that share of the managed hosts until ``rwatch zabbix-sync --allow-mass-delete``.

In steady state the reads of one projection overlap the reconcile of the one before: while changes keep coming,
a projection reads the mirror and computes the desired state, then waits for the reconcile still running, and
leaves its own running while the next one reads. Reconciles still run one at a time and in order; the scope is
taken against what the last one that succeeded applied. The first projection, ``sync()`` and the last one at close
wait for their reconcile.

Zabbix being down never stops rwatch: the projection fails, is counted and logged, and is tried again after a pause
that doubles (the mirror keeps applying meanwhile); the next reconcile carries every change since.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Protocol

from rwatch.config import ZabbixSinkConfig
from rwatch.metrics import ZABBIX_API_CALLS, ZABBIX_ERRORS, ZABBIX_HELD, ZABBIX_HOSTS, ZABBIX_LAG, ZABBIX_RECONCILES
from rwatch.sinks.projection import Projection
from rwatch.sinks.zabbix.api import ZabbixApi
from rwatch.sinks.zabbix.desired import DesiredState, TemplateRule, ZabbixOptions, desired_state
from rwatch.sinks.zabbix.reconcile import Summary, reconcile

if TYPE_CHECKING:
    from rwatch.sinks.base import TopologyRow
    from rwatch.sinks.mirror import HostFacts


class ZabbixSource(Protocol):
    """What the zabbix sink needs of its mirror."""

    def add_listener(self, callback: Callable[[], None]) -> None: ...

    async def topology(self, tenant: str | None = None) -> list[TopologyRow]: ...

    async def host_facts(self, tenant: str | None = None) -> dict[int, HostFacts]: ...


def options_of(settings: ZabbixSinkConfig) -> ZabbixOptions:
    """What the reconcile makes of the topology, from the sink's table."""
    return ZabbixOptions(
        group_prefix=settings.group_prefix, visible_name=settings.visible_name,
        technical_name=settings.technical_name,
        template_rules=tuple(TemplateRule(tuple(r.templates), r.module, r.os_type) for r in settings.templates),
        proxies={int(k): v for k, v in settings.proxies.items()}, disable_idle=settings.disable_idle,
        idle_modules=frozenset(settings.idle_modules), on_delete=settings.on_delete, agent_port=settings.agent_port,
        managed_tag=settings.managed_tag)


def changed_hosts(before: DesiredState, after: DesiredState) -> set[int]:
    """The bk_host_ids whose desired Zabbix host differs (added, changed, or gone)."""
    ids = set(before.hosts) | set(after.hosts)
    return {i for i in ids if before.hosts.get(i) != after.hosts.get(i)}


class ZabbixSink(Projection):
    """``ZabbixSink(name, settings, mirror)``; ``sync()`` runs one full reconcile at once (the CLI's zabbix-sync)."""

    kind = "zabbix"

    def __init__(self, name: str, settings: ZabbixSinkConfig, source: ZabbixSource, *,
                 mass_delete_share: float = 0.1, mass_delete_floor: int = 20, api: ZabbixApi | None = None) -> None:
        super().__init__(name, source, debounce=settings.debounce, renders=ZABBIX_RECONCILES, errors=ZABBIX_ERRORS)
        self._facts_source = source
        self.settings = settings
        self.options = options_of(settings)
        self.api = api or ZabbixApi(
            settings.url, token=settings.token.get_secret_value() if settings.token else None,
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None, timeout=settings.timeout)
        self._connected = False
        self._applied: DesiredState | None = None  # what Zabbix was last made equal to; None: a full reconcile is due
        self._proven: set[int] = set()  # the tombstoned hosts at that reconcile
        self._full_due = False  # the next reconcile covers everything (full_every, sync)
        self._timer: asyncio.Task[None] | None = None
        self._overlap = False  # may a projection leave its reconcile running (the steady-state loop only)
        self._reconciling: asyncio.Task[None] | None = None
        self.share, self.floor = mass_delete_share, mass_delete_floor
        self.allow_mass_delete = False
        self.last: Summary | None = None
        self._calls = (ZABBIX_API_CALLS.labels(name, "read"), ZABBIX_API_CALLS.labels(name, "write"))
        self._lag = ZABBIX_LAG.labels(name)

    async def open(self) -> None:
        await super().open()
        self._overlap = True
        self._timer = asyncio.create_task(self._full_timer(), name=f"zabbix-full:{self.name}")

    async def close(self) -> None:
        self._overlap = False
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        try:
            await super().close()
            try:
                await self._finish()
            except Exception as exc:  # the last reconcile failed; the next start's full reconcile repairs it
                self._failed(f"{self.kind}_failed", exc)
        finally:
            if self._connected:
                self._connected = False
                await self.api.close()

    async def sync(self) -> Summary:
        """One full reconcile now, never beside the loop's own; raises what it met."""
        async with self._projecting:
            try:
                await self._finish()
            except Exception as exc:  # the loop's last reconcile: this full one repairs what it left
                self._failed(f"{self.kind}_failed", exc)
            self._full_due = True
            await self.project()
            await self._finish()
        assert self.last is not None
        return self.last

    async def _full_timer(self) -> None:
        """Every ``full_every``, the next projection covers everything."""
        while True:  # ends when close() cancels it
            await asyncio.sleep(self.settings.full_every)
            self._full_due = True
            self.mark_dirty()

    async def _finish(self) -> None:
        """Wait for the reconcile a projection left running; raise what it met (once)."""
        task, self._reconciling = self._reconciling, None
        if task is not None:
            await task

    async def project(self) -> None:
        if not self._connected:
            await self.api.open()
            self._connected = True
        # Two reads of one mirror, side by side (a file mirror reads each on its own connection).
        rows, facts = await asyncio.gather(self._source.topology(), self._facts_source.host_facts())
        live = [i for i, f in facts.items() if not f.deleted]
        proven = {i for i, f in facts.items() if f.deleted}
        os_types = {i: f.os_type for i, f in facts.items()}
        # Pure, but 10,000 hosts take a while: off the loop, so /healthz and the consumers keep going.
        desired = await asyncio.to_thread(desired_state, rows, self.options, live, os_types)
        # The previous reconcile ran while this projection read. Its failure is raised here, as this projection's:
        # the changes it carried are still in the difference from what was last applied, so the retry carries them.
        await self._finish()
        full, self._full_due = self._full_due, False
        # A new tombstone changes no desired host, yet it is the proof an unproven host waited for.
        scope = (None if full or self._applied is None
                 else changed_hosts(self._applied, desired) | (proven - self._proven))
        if scope is not None and not scope:
            return  # nothing Zabbix shows changed (a commit of another resource, a redelivery)
        task = asyncio.create_task(self._reconcile(desired, proven, scope), name=f"zabbix-reconcile:{self.name}")
        self._reconciling = task
        if not self._overlap:
            await self._finish()

    async def _reconcile(self, desired: DesiredState, proven: set[int], scope: set[int] | None) -> None:
        """Make Zabbix equal to ``desired`` (for ``scope``; None: everything), then remember it as applied."""
        reads, writes = self.api.total_calls - self.api.write_calls, self.api.write_calls
        total = len(desired.hosts)
        try:
            summary = await reconcile(self.api, desired, self.options, scope=scope, proven=proven,
                                      guard=lambda count, _: self._guard(count, total),
                                      guard_threshold=self.floor)
        except BaseException:
            self._full_due |= scope is None  # a full reconcile cut short is owed again
            raise
        finally:
            self._calls[0].inc(self.api.total_calls - self.api.write_calls - reads)
            self._calls[1].inc(self.api.write_calls - writes)
        self._applied, self._proven = desired, proven
        self.last = summary
        ZABBIX_HOSTS.labels(self.name).set(total)
        for reason, count in (("unplaced", summary.hosts_held), ("unproven", summary.hosts_unproven),
                              ("guarded", summary.hosts_guarded)):
            ZABBIX_HELD.labels(self.name, reason).set(count)
        if summary.hosts_guarded or summary.hosts_unproven or summary.conflicts:
            self._log.warning("zabbix_reconcile_incomplete", scope="full" if scope is None else len(scope),
                              **asdict(summary))

    def _guard(self, count: int, desired: int) -> bool:
        """The mass-delete guard: more than ``share`` of the managed hosts (and more than ``floor``) waits for an
        operator's ``--allow-mass-delete``."""
        return self.allow_mass_delete or count <= self.share * (desired + count)

    def projected(self, since: float | None) -> None:
        task = self._reconciling
        if task is None:
            if since is not None:
                self._lag.observe(max(0.0, time.monotonic() - since))
            return

        def done(task: asyncio.Task[None]) -> None:
            # Counted when Zabbix shows it; a failure is seen by the next projection, which this wakes.
            if task.cancelled() or task.exception() is not None:
                self._restore(since)
                self.mark_dirty()
            elif since is not None:
                self._lag.observe(max(0.0, time.monotonic() - since))

        task.add_done_callback(done)
