"""The zabbix sink: a projection of a mirror's topology that keeps Zabbix's managed groups and hosts equal to it.

After each commit of its mirror (debounced, ``debounce``) it reads the topology and the mirror's host rows,
computes the desired state (``desired``), and reconciles (``reconcile``) only the hosts whose desired state changed
since the last reconcile that succeeded: a batch that moved three hosts costs a few calls whatever the size of
Zabbix. A rename of a biz, set or module changes every host below it, so they all come into that scope, and their
group is renamed in place. The first reconcile after start, then one every ``full_every``, covers everything: it
repairs what an operator changed by hand on managed objects and what a crash left half-written.

Deletes need proof. A managed host leaves Zabbix (per ``on_delete``) only when the mirror holds CMDB's delete of it
(a tombstone); a host missing from the mirror without one (a new or restored mirror file) is left as it is, logged
as ``zabbix_removal_unproven``. A tombstone is either CMDB's own delete event or a resync's sweep, and a sweep
reaches the mirror only past the mass-delete guard (``watch.mass_delete_share``, released with ``rwatch resync
--allow-mass-delete``): so every removal here is one CMDB proved, and none needs a second guard. (One would hold
CMDB's real deletes whenever rwatch catches up after downtime, wedging Zabbix behind a question nobody asked.)

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
    _source: ZabbixSource  # the projection's source, with the host facts the proof of a delete needs

    def __init__(self, name: str, settings: ZabbixSinkConfig, source: ZabbixSource, *,
                 api: ZabbixApi | None = None) -> None:
        super().__init__(name, source, debounce=settings.debounce, renders=ZABBIX_RECONCILES, errors=ZABBIX_ERRORS)
        self.settings = settings
        self.options = options_of(settings)
        self.api = api or ZabbixApi(
            settings.url, token=settings.token.get_secret_value() if settings.token else None,
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None, timeout=settings.timeout)
        self._connected = False
        self._applied: DesiredState | None = None  # what Zabbix was last made equal to; None: a full reconcile is due
        self._proven: set[int] = set()  # the tombstoned hosts at that reconcile
        self._timer: asyncio.Task[None] | None = None
        self.last: Summary | None = None
        self._calls = (ZABBIX_API_CALLS.labels(name, "read"), ZABBIX_API_CALLS.labels(name, "write"))
        self._lag = ZABBIX_LAG.labels(name)

    async def open(self) -> None:
        await super().open()
        self._timer = asyncio.create_task(self._full_timer(), name=f"zabbix-full:{self.name}")

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        try:
            await super().close()
        finally:
            if self._connected:
                self._connected = False
                await self.api.close()

    async def sync(self) -> Summary:
        """One full reconcile now, never beside the loop's own; raises what it met."""
        async with self._projecting:
            self._applied = None
            await self.project()
        assert self.last is not None
        return self.last

    async def _full_timer(self) -> None:
        """Every ``full_every``, the next projection covers everything."""
        while True:  # ends when close() cancels it
            await asyncio.sleep(self.settings.full_every)
            self._applied = None
            self.mark_dirty()

    async def project(self) -> None:
        if not self._connected:
            await self.api.open()
            self._connected = True
        started = time.monotonic()
        # Two reads of one mirror, side by side (a file mirror reads each on its own connection).
        rows, facts = await asyncio.gather(self._source.topology(), self._source.host_facts())
        live = [i for i, f in facts.items() if not f.deleted]
        proven = {i for i, f in facts.items() if f.deleted}
        os_types = {i: f.os_type for i, f in facts.items()}
        # Pure, but 10,000 hosts take a while: off the loop, so /healthz and the consumers keep going.
        desired = await asyncio.to_thread(desired_state, rows, self.options, live, os_types)
        # A new tombstone changes no desired host, yet it is the proof an unproven host waited for.
        scope = None if self._applied is None else changed_hosts(self._applied, desired) | (proven - self._proven)
        self.local_seconds = time.monotonic() - started  # the rest is mostly waiting on Zabbix's answers
        if scope is not None and not scope:
            return  # nothing Zabbix shows changed (a commit of another resource, a redelivery)
        reads, writes = self.api.total_calls - self.api.write_calls, self.api.write_calls
        total = len(desired.hosts)
        try:
            summary = await reconcile(self.api, desired, self.options, scope=scope, proven=proven)
        finally:
            self._calls[0].inc(self.api.total_calls - self.api.write_calls - reads)
            self._calls[1].inc(self.api.write_calls - writes)
        self._applied, self._proven = desired, proven
        self.last = summary
        ZABBIX_HOSTS.labels(self.name).set(total)
        for reason, count in (("unplaced", summary.hosts_held), ("unproven", summary.hosts_unproven)):
            ZABBIX_HELD.labels(self.name, reason).set(count)
        if summary.hosts_unproven or summary.conflicts:
            self._log.warning("zabbix_reconcile_incomplete", scope="full" if scope is None else len(scope),
                              **asdict(summary))

    def projected(self, since: float | None) -> None:
        if since is not None:
            self._lag.observe(max(0.0, time.monotonic() - since))
