"""The recording webhook receiver: every delivery kept, deduped by webhook-id, version-fenced, swept by marks.

It is the harness ``Receiver`` (signature verified with the independent standardwebhooks library, a gate
to stall it) with a ledger the oracle reads:

- ``raw_duplicates``: deliveries whose webhook-id was already applied. Expected after crashes and replays
  (delivery is at-least-once); the dedupe absorbs them.
- ``fenced``: first deliveries not newer than what the receiver holds for the object (a resync row older
  than a live change, a replay after a cursor loss): the version fence absorbs them.
- ``effective_duplicates``: the same CMDB change (a watch event: resource, key, version, action) arriving
  under a *second* webhook-id. The id dedupe that the webhook contract relies on cannot absorb it: a receiver
  that dedupes by webhook-id, as the README tells it to, applies that change twice. Snapshot rows are
  observations, not changes: two resyncs at the same head list an object twice, under two ids by design (the
  sweep tells its own snapshot's rows apart by them), and the version fence's tie rule absorbs the repeat.
- ``order_violations``: per object, a first delivery of a watch event older than a watch event already
  delivered (invariant 3 as a sink sees it; resync rows are exempt: they are fenced by design).

The effective state (``live``) applies first deliveries newer than the held version (a snapshot row also on a
tie), and a resync mark (``type: resync_end``) sweeps what the receiver holds inside its scope that is older
than the mark, or of the mark's version but not from the mark's own snapshot, as the README asks receivers to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rwatch.events import resync_event_id
from tests.integration.harness import Receiver

Version = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Delivery:
    webhook_id: str
    resource: str
    key: str | None  # None for a resync mark
    version: Version
    origin: str  # watch, resync, mark
    outcome: str  # applied, duplicate, fenced, swept


class ChaosReceiver(Receiver):
    def __init__(self) -> None:
        super().__init__()
        self.ledger: list[Delivery] = []
        self.applied_ids: set[str] = set()
        self.raw_duplicates = 0
        self.fenced = 0
        self.swept = 0
        self.effective_duplicates: list[str] = []
        self.order_violations: list[str] = []
        self.held: dict[tuple[str, str], tuple[Version, bool, Any]] = {}
        self.held_ids: dict[tuple[str, str], str] = {}  # the webhook-id of what ``held`` holds
        self.refused = 0  # deliveries answered with ``refuse``'s status
        self.poisoned: set[str] = set()  # webhook-ids refused that way: they come back by replay, late
        self.cursors: set[tuple[str, str]] = set()  # (resource, cursor) of every watch event delivered
        self._changes: dict[tuple[Any, ...], str] = {}
        self._watch_high: dict[tuple[str, str], Version] = {}

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        event = self.webhook.verify(body, dict(request.headers))  # raises on a bad signature: a 500 here
        await self.gate.wait()
        status = self.refuse(event)  # the poison fault: one payload answered 500 for ever
        if status is not None:
            self.refused += 1
            self.poisoned.add(request.headers["webhook-id"])
            return web.Response(status=status, text="refused by the chaos round")
        webhook_id = request.headers["webhook-id"]
        self.deliveries.append(webhook_id)
        self.record(webhook_id, event)
        self.changed.set()
        return web.Response(status=204)

    def record(self, webhook_id: str, event: dict[str, Any]) -> None:
        resource = str(event["resource"])
        version: Version = (int(event["version"][0]), int(event["version"][1]))
        is_mark = event.get("type") == "resync_end"
        key = None if is_mark else str(event["key"])
        origin = "mark" if is_mark else str(event.get("origin", "watch"))
        if webhook_id in self.applied_ids:
            self.raw_duplicates += 1
            self.ledger.append(Delivery(webhook_id, resource, key, version, origin, "duplicate"))
            return
        self.applied_ids.add(webhook_id)
        if key is None:
            swept = self._sweep(resource, version, event.get("scope"), str(event.get("resync_id")))
            self.ledger.append(Delivery(webhook_id, resource, None, version, origin, f"swept {swept}"))
            return
        ident = (resource, key)
        if event.get("cursor"):
            self.cursors.add((resource, str(event["cursor"])))
        change = (resource, key, version, event["action"]) if origin == "watch" else (webhook_id,)
        first = self._changes.setdefault(change, webhook_id)
        if first != webhook_id:
            self.effective_duplicates.append(f"{resource} {key} v{list(version)} {origin}: ids {first[:12]}, "
                                             f"{webhook_id[:12]}")
        if origin == "watch" and webhook_id not in self.poisoned:
            # (A poisoned event comes back by ``rwatch dlq replay``, after its object's later events: the version
            # fence keeps the newest, and the replay is the operator's, not the stream's order.)
            high = self._watch_high.get(ident)
            if high is not None and version < high:
                self.order_violations.append(f"{resource} {key}: v{list(version)} after v{list(high)}")
            else:
                self._watch_high[ident] = version
        held = self.held.get(ident)
        if held is None or version > held[0] or (version == held[0] and origin == "resync"):
            self.held[ident] = (version, event["action"] == "delete", event["data"])
            self.held_ids[ident] = webhook_id
            outcome = "applied"
        else:
            self.fenced += 1
            outcome = "fenced"
        self.ledger.append(Delivery(webhook_id, resource, key, version, origin, outcome))

    def _sweep(self, resource: str, version: Version, scope: dict[str, list[Any]] | None, resync_id: str) -> int:
        swept = 0
        for (res, key), (held, deleted, data) in list(self.held.items()):
            if res != resource or deleted or held > version:
                continue
            if held == version and self.held_ids[(res, key)] == resync_event_id(res, key, version,
                                                                                  resync_id=resync_id):
                continue  # the mark's own snapshot listed it
            if scope and not all(data.get(f) in values for f, values in scope.items()):
                continue
            if scope and not all(data.get(f) in values for f, values in scope.items()):
                continue
            self.held[(res, key)] = (version, True, data)
            self.held_ids[(res, key)] = f"mark:{resync_id}"
            swept += 1
        self.swept += swept
        return swept

    def live(self, resource: str) -> dict[str, Any]:
        return {k: data for (res, k), (_, deleted, data) in self.held.items() if res == resource and not deleted}
