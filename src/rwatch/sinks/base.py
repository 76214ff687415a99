"""The Sink protocol: what a downstream system must offer for rwatch to keep it equal to CMDB.

Every apply is idempotent and version-fenced (DESIGN.md invariant 2): an event older than, or as old as,
what the sink already holds for that object changes nothing, so redeliveries and replays are harmless.
Events of one resource arrive in stream order; across resources in any order (invariant 3).

After a resync's snapshot comes its ``ResyncMark`` on the same queue: ``sweep`` ends what the snapshot did not
contain (see ``rwatch.watch.resync`` and the README's "Resync"). ``rwatch.sinks.registry`` makes a sink from its
configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rwatch.events import Event, ResyncMark


class Sink(Protocol):
    name: str

    async def open(self) -> None:
        """Connect / create what the sink needs. Raises TransientError subclasses while unreachable."""

    async def apply(self, events: Sequence[Event]) -> None:
        """Apply a batch (events of one resource, in stream order) before returning.

        Raises ``SinkUnavailable`` (or another TransientError) when the batch should be retried as a whole,
        ``SinkRejected`` when events are refused for good: with ``event_ids`` when the sink knows which
        (the others were applied), without when the whole batch was refused.
        """

    async def sweep(self, mark: ResyncMark) -> int:
        """A resync's snapshot of ``mark.resource`` has been applied: end every object the sink still holds
        with a version older than ``mark.version`` (and inside ``mark.scope``) as a delete at that version;
        the number swept. Idempotent (a replayed mark finds nothing left to sweep); same errors as apply."""

    async def close(self) -> None: ...


def first_ip(value: str | None) -> str | None:
    """CMDB keeps several inner IPs comma-separated (``bk_host_innerip``); the first one is the host's address."""
    return next((ip for part in (value or "").split(",") if (ip := part.strip())), None)


@dataclass(frozen=True, slots=True)
class TopologyRow:
    """One row of the mirror's ``rwatch_topology`` view: a host in a module, with the module's set and biz.

    Built from live rows only; a relation whose host, module, set or biz is not (yet) mirrored still shows,
    with the missing side's columns as None (CMDB gives no order across resources).
    """

    tenant: str
    bk_biz_id: int | None
    bk_biz_name: str | None
    bk_set_id: int | None
    bk_set_name: str | None
    bk_module_id: int
    bk_module_name: str | None
    bk_host_id: int
    bk_host_innerip: str | None
    bk_cloud_id: int | None
    bk_host_name: str | None
