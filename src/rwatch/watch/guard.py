"""The mass-delete guard: a sweep that would delete more than a share of its scope waits for an operator.

Even a listing that proved itself complete can be wrong: a backend that answers an empty page with a count to
match, a user who lost view rights overnight. Argo CD refuses to prune everything when its source comes back
empty; rwatch refuses to sweep more than ``watch.mass_delete_share`` of the live objects in a resync's scope
(and more than ``watch.mass_delete_floor`` objects, so that small topologies still sync) until an operator has
looked and run ``rwatch resync --resource R --allow-mass-delete``.

What a sweep would delete is counted before the mark is published, from each mirror sink that takes the
resource (exactly: its live rows in the marks' scopes, older than the head, that the listing did not show), or,
where no mirror takes it, from the last complete listing of the resource (the drop in its count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rwatch.config import Config, MirrorSinkConfig
from rwatch.events import ResyncMark
from rwatch.sinks.mirror import MirrorSink
from rwatch.store.base import CursorStore
from rwatch.watch.snapshot import Scope, Snapshot


@dataclass(slots=True)
class Guard:
    """The guard's figures for one sweep, and its decision."""

    resource: str
    would_delete: int
    live: int  # live objects held in the sweep's scope
    source: str  # where the figures come from: "mirror <name>", "last listing", or "none"
    share_limit: float
    floor: int
    allowed: bool = False  # released by the operator (--allow-mass-delete)
    sample: list[str] = field(default_factory=list)  # a few keys the sweep would delete

    @property
    def share(self) -> float:
        return self.would_delete / self.live if self.live else (1.0 if self.would_delete else 0.0)

    @property
    def over(self) -> bool:
        return self.would_delete > self.floor and self.share > self.share_limit

    @property
    def held(self) -> bool:
        return self.over and not self.allowed

    def describe(self) -> str:
        verdict = ("held: nothing deleted until an operator runs rwatch resync --resource "
                   f"{self.resource} --allow-mass-delete" if self.held
                   else "released by --allow-mass-delete" if self.over else "within the guard")
        return (f"the sweep would delete {self.would_delete} of {self.live} live {self.resource} objects "
                f"({self.share:.0%}; limit {self.share_limit:.0%} beyond {self.floor}) by {self.source}: {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share": round(self.share, 4), "held": self.held}


def guard(config: Config, resource: str, would_delete: int, live: int, source: str, *, allowed: bool = False,
          sample: Sequence[str] = ()) -> Guard:
    watch = config.watch
    return Guard(resource, would_delete, live, source, watch.mass_delete_share, watch.mass_delete_floor, allowed,
                 list(sample)[:10])


def mirrors_of(config: Config, resource: str) -> list[str]:
    """The enabled mirror sinks that take ``resource``."""
    return [name for name in config.queue_sinks
            if isinstance(config.sinks[name], MirrorSinkConfig) and resource in config.sink_resources(name)]


async def preview(config: Config, resource: str, tenant: str, version: tuple[int, int], scopes: Sequence[Scope],
                  listed: set[str], *, allowed: bool = False) -> Guard | None:
    """The worst of the mirrors' figures for the sweep of this snapshot; None when no mirror takes the resource."""
    worst: Guard | None = None
    for name in mirrors_of(config, resource):
        settings = config.sinks[name]
        assert isinstance(settings, MirrorSinkConfig)
        async with MirrorSink(name, settings) as mirror:
            rows = await mirror.objects(resource, tenant)
        marks = [ResyncMark.model_construct(id="", resource=resource, version=version, resync_id="guard", scope=scope,
                                            started_at="", observed_at="") for scope in scopes]
        held = [key for key, row in rows.items() if any(m.in_scope(row.data or {}) for m in marks)]
        gone = sorted(key for key in held if key not in listed and rows[key].version <= version)
        figures = guard(config, resource, len(gone), len(held), f"mirror {name}", allowed=allowed, sample=gone)
        if worst is None or figures.would_delete > worst.would_delete:
            worst = figures
    return worst


async def judge(config: Config, store: CursorStore | None, snap: Snapshot, *, allowed: bool) -> Guard | None:
    """The guard's figures for this snapshot's sweep: from the mirrors that take the resource, else from the last
    complete listing; None with neither (a first resync, nothing held downstream to compare)."""
    tenant = config.cmdb.tenant
    figures = await preview(config, snap.resource, tenant, snap.version, [snap.scope, *snap.also], snap.keys,
                            allowed=allowed)
    if figures is None and store is not None:
        last = next((r for r in await store.resyncs(tenant) if r.resource == snap.resource), None)
        if last is not None and last.listed is not None:
            figures = guard(config, snap.resource, max(0, last.listed - snap.listed), last.listed,
                            "the last complete listing", allowed=allowed)
    return figures
