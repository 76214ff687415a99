"""Verify: compare a mirror sink with CMDB, object by object, and optionally repair what differs.

For each resource the CMDB side is a resync snapshot (``Resyncer.snapshot``: head version ``V``, then every
object listed and projected exactly as watch events are), kept as key -> sha256 of its canonical JSON. The
mirror side is its live rows, restricted to the snapshot's scope (what the lists could see). A mirror row (or
tombstone) newer than ``V`` changed after the head: the listing may or may not show that change, so the key
is left out of the comparison on both sides and counted as ``ignored``. Differences are ``missing`` (in CMDB,
not in the mirror), ``extra`` (in the mirror, not in CMDB) and ``changed`` (both, other data); counts and a
checksum are reported per business where the resource has one. The command (``rwatch.cli.jobs.verify``) runs
the passes, and with ``repair`` resyncs each drifting resource and verifies again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson

from rwatch import metrics as m
from rwatch.config import Config, MirrorSinkConfig
from rwatch.errors import ConfigError, RwatchError
from rwatch.events import Event, ResyncMark
from rwatch.logs import get_logger
from rwatch.retry import sleep_or_stop
from rwatch.sinks.mirror import MirrorSink
from rwatch.store.base import CursorStore
from rwatch.store.records import VerifyResult
from rwatch.watch.guard import Guard, guard
from rwatch.watch.resync import Resyncer
from rwatch.watch.scopes import HIDDEN_REASON
from rwatch.watch.snapshot import Scope

log = get_logger("rwatch.verify")

GROUPED: Final = frozenset({"set", "module", "host_relation"})  # grouped by data["bk_biz_id"]
ALL: Final = "*"
Entry = tuple[bytes, str]  # (sha256 of the canonical JSON, group)


@dataclass(slots=True)
class GroupReport:
    group: str
    cmdb: int
    mirror: int
    cmdb_checksum: str
    mirror_checksum: str

    @property
    def equal(self) -> bool:
        return self.cmdb_checksum == self.mirror_checksum


@dataclass(slots=True)
class ResourceReport:
    resource: str
    version: tuple[int, int]
    scope: Scope
    cmdb: int
    mirror: int
    ignored: int  # mirror rows newer than the snapshot: changed after the head, not compared
    out_of_scope: int  # live mirror rows the lists could not see
    hidden: int  # live mirror rows in businesses hidden from the user (not listed, so not compared)
    # Mirror rows CMDB does not list while some businesses are hidden from the user: deleted, or moved into a
    # hidden business; neither side can tell, so they are neither drift nor equal (hosts: they have no business).
    unproven: list[str]
    groups: list[GroupReport]
    missing: list[str]
    extra: list[str]
    changed: list[str]
    seconds: float
    hidden_businesses: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why the listing is not proved complete (empty: it is)
    # What a resync's sweep would delete now (the extra rows), and whether the mass-delete guard would hold it.
    guard: Guard | None = None

    @property
    def drift(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.changed)


@dataclass(slots=True)
class VerifyReport:
    sink: str
    tenant: str
    cmdb_url: str
    resources: list[ResourceReport]
    skipped: dict[str, str]
    finished_at: float
    repaired: list[str] = field(default_factory=list)  # resources resynced by --repair
    after: VerifyReport | None = None  # the verify that followed the repair

    @property
    def drift(self) -> int:
        return sum(r.drift for r in self.resources)

    @property
    def final(self) -> VerifyReport:
        return self.after if self.after is not None else self

    def to_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in asdict(self).items() if k not in ("after", "repaired")}
        for res, report in zip(doc["resources"], self.resources, strict=True):
            res["version"] = list(report.version)
            res["drift"] = report.drift
            res["guard"] = report.guard.to_dict() if report.guard is not None else None
            for group, g in zip(res["groups"], report.groups, strict=True):
                group["equal"] = g.equal
        doc["drift"] = self.drift
        if self.after is None:
            return doc
        return {"before": doc, "repaired": self.repaired, "after": self.after.to_dict(),
                "drift": self.after.drift}


def choose(config: Config, sink: str | None, resources: Sequence[str] | None) -> tuple[str, list[str], dict[str, str]]:
    """The mirror sink, the resources to verify and those skipped (with why). ConfigError / ResyncUnsupported
    for bad usage."""
    if sink is None:
        sink = next((n for n in config.enabled_sinks if isinstance(config.sinks[n], MirrorSinkConfig)), None)
        if sink is None:
            raise ConfigError("no enabled sink of kind 'mirror' to verify", key="sinks")
    elif not isinstance(config.sinks.get(sink), MirrorSinkConfig) or not config.sinks[sink].enabled:
        raise ConfigError(f"{sink!r} is not an enabled mirror sink", key=f"sinks.{sink}")
    taken = config.sink_resources(sink)
    if resources:
        for name in resources:
            if name not in config.watch.resources:
                raise ConfigError(f"unknown resource {name!r}", key="watch.resources")
            Resyncer.check(name)
            if name not in config.watch.enabled:
                raise ConfigError(f"{name!r} is not enabled", key=f"watch.resources.{name}.enabled")
            if name not in taken:
                raise ConfigError(f"sink {sink!r} does not take {name!r} (it takes: {', '.join(taken)})",
                                  key=f"sinks.{sink}.resources")
        return sink, list(dict.fromkeys(resources)), {}
    chosen = [r for r in taken if r in Resyncer.SUPPORTED]
    return sink, chosen, {r: "no list API covers every object" for r in taken if r not in Resyncer.SUPPORTED}


async def remember(store: CursorStore, report: VerifyReport) -> None:
    """Keep the result in the store: the daemon's /metrics shows the last verify (this process ends now)."""
    results = [VerifyResult(report.tenant, report.sink, r.resource, len(r.missing), len(r.extra), len(r.changed),
                            report.finished_at) for r in report.resources]
    try:
        await store.record_verify(results)
    except RwatchError as exc:  # the report stands; only the daemon's metric misses it
        log.warning("verify_not_recorded", **exc.fields())


async def export_verify_metrics(store: CursorStore, tenant: str, stop: asyncio.Event, every: float = 30.0) -> None:
    """In the daemon: the last verify results from the store as ``rwatch_verify_*`` gauges, refreshed every
    ``every`` seconds until ``stop``. Not a retry: a refresh that failed waits for the next like one that did not."""
    stopped = False
    while not stopped:
        try:
            for result in await store.verify_results(tenant):
                m.VERIFY_DRIFT.labels(result.sink, result.resource).set(result.drift)
                m.VERIFY_LAST_RUN.labels(result.sink).set(result.checked_at)
        except RwatchError as exc:
            log.warning("verify_metrics_failed", **exc.fields())
        stopped = await sleep_or_stop(every, stop)


def mirror_settings(config: Config, sink: str) -> MirrorSinkConfig:
    settings = config.sinks[sink]
    assert isinstance(settings, MirrorSinkConfig)
    return settings


async def verify_pass(resyncer: Resyncer, mirror: MirrorSink, sink: str, resources: list[str],
                      skipped: dict[str, str]) -> VerifyReport:
    """One comparison of the mirror with CMDB for ``resources``, its drift set as the ``rwatch_verify_*`` gauges."""
    reports = [await _resource(resyncer, mirror, r) for r in resources]
    report = VerifyReport(sink, resyncer.tenant, resyncer.config.cmdb.base_url, reports, skipped, time.time())
    for r in reports:
        m.VERIFY_DRIFT.labels(sink, r.resource).set(r.drift)
    m.VERIFY_LAST_RUN.labels(sink).set(report.finished_at)
    log.info("verify_finished", sink=sink, drift=report.drift, skipped=sorted(skipped), resources={
        r.resource: {"missing": len(r.missing), "extra": len(r.extra), "changed": len(r.changed),
                     "cmdb": r.cmdb, "mirror": r.mirror, "ignored": r.ignored} for r in reports})
    return report


async def _resource(resyncer: Resyncer, mirror: MirrorSink, resource: str) -> ResourceReport:
    clock = time.monotonic()
    cmdb: dict[str, Entry] = {}

    async def collect(events: list[Event]) -> None:
        for ev in events:
            cmdb[ev.key] = _entry(resource, ev.data)

    snap = await resyncer.snapshot(resource, collect)
    # Read after the listing: whatever the mirror took since the head is newer than the snapshot.
    rows = await mirror.objects(resource, resyncer.tenant, include_deleted=True)
    # What CMDB lists is visible, whatever stale rows of the mirror say about its business.
    hidden_keys = await _in_hidden(mirror, resyncer.tenant, resource, rows, set(snap.hidden)) - cmdb.keys()
    # in_scope: the very rule the sweeps of a resync apply (a row is covered when one of its marks covers it)
    marks = [ResyncMark.model_construct(id="", resource=resource, version=snap.version, resync_id="verify",
                                        scope=scope, started_at="", observed_at="")
             for scope in (snap.scope, *snap.also)]
    ignored = {k for k, row in rows.items() if row.version > snap.version}
    held: dict[str, Entry] = {}
    out_of_scope = 0
    for key, row in rows.items():
        if row.deleted or key in ignored or key in hidden_keys:
            continue
        if not any(mark.in_scope(row.data or {}) for mark in marks):
            out_of_scope += 1
            continue
        held[key] = _entry(resource, row.data or {})
    for key in ignored:
        cmdb.pop(key, None)
    extra = _sorted(held.keys() - cmdb.keys())
    unproven: list[str] = []
    if any(r.startswith(HIDDEN_REASON) for r in snap.proof.reasons):
        unproven, extra = extra, []
        for key in unproven:
            held.pop(key)
    figures = None if snap.proof.reasons else guard(
        resyncer.config, resource, len(extra), len(held), f"mirror {mirror.name}", allowed=resyncer.allow_mass_delete,
        sample=extra)
    return ResourceReport(
        resource, snap.version, snap.scope, len(cmdb), len(held), len(ignored), out_of_scope,
        sum(1 for k in hidden_keys if not rows[k].deleted), unproven, _groups(cmdb, held),
        _sorted(cmdb.keys() - held.keys()), extra,
        _sorted(k for k in cmdb.keys() & held.keys() if cmdb[k][0] != held[k][0]),
        round(time.monotonic() - clock, 3), list(snap.hidden),
        [r for r in snap.proof.reasons if not r.startswith(HIDDEN_REASON)], figures)


async def _in_hidden(mirror: MirrorSink, tenant: str, resource: str, rows: dict[str, Any],
                     hidden: set[int]) -> set[str]:
    """The mirror's keys that belong to businesses hidden from the user: the lists cannot show them, so they are
    neither compared nor counted as drift (hosts belong to a business through their host_relation rows)."""
    if not hidden:
        return set()
    if resource == "biz":
        return {k for k in rows if k.isdigit() and int(k) in hidden}
    if resource == "host":
        relations = await mirror.objects("host_relation", tenant)
        return {str(r.data.get("bk_host_id")) for r in relations.values()
                if r.data and r.data.get("bk_biz_id") in hidden} & rows.keys()
    return {k for k, row in rows.items() if row.data and row.data.get("bk_biz_id") in hidden}


def _entry(resource: str, data: dict[str, Any]) -> Entry:
    digest = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).digest()
    return digest, str(data.get("bk_biz_id")) if resource in GROUPED else ALL


def _groups(cmdb: dict[str, Entry], held: dict[str, Entry]) -> list[GroupReport]:
    def split(side: dict[str, Entry]) -> dict[str, list[tuple[str, bytes]]]:
        out: dict[str, list[tuple[str, bytes]]] = {}
        for key, (digest, group) in side.items():
            out.setdefault(group, []).append((key, digest))
        return out

    def checksum(items: list[tuple[str, bytes]]) -> str:
        h = hashlib.sha256()
        for key, digest in sorted(items):
            h.update(f"{key}\t{digest.hex()}\n".encode())
        return h.hexdigest()

    theirs, ours = split(cmdb), split(held)
    return [GroupReport(g, len(theirs.get(g, ())), len(ours.get(g, ())), checksum(theirs.get(g, [])),
                        checksum(ours.get(g, []))) for g in _sorted(theirs.keys() | ours.keys())]


def _sorted(keys: Any) -> list[str]:
    """Keys in natural order ("2" before "10", "3:7" by host then module)."""
    def natural(key: str) -> list[tuple[int, int, str]]:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(":")]
    return sorted(keys, key=natural)
