"""The normalized event: the one JSON shape every sink and every consumer of the bus reads.

The contract is in DESIGN.md ("Normalized event"); ``Event.model_json_schema()`` documents it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

Action = Literal["create", "update", "delete"]
Origin = Literal["watch", "resync"]
SCHEMA_VERSION = 1


class Event(BaseModel):
    """One change of one CMDB object, as rwatch publishes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_: Literal[1] = Field(default=1, alias="schema")
    id: str
    resource: str
    action: Action
    key: str
    tenant: str = "0"
    version: tuple[int, int]
    occurred_at: str
    observed_at: str
    origin: Origin = "watch"
    cursor: str | None = None
    data: dict[str, Any]

    @property
    def routing_key(self) -> str:
        return f"cmdb.{self.resource}.{self.action}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "resource": self.resource,
            "action": self.action,
            "key": self.key,
            "tenant": self.tenant,
            "version": list(self.version),
            "occurred_at": self.occurred_at,
            "observed_at": self.observed_at,
            "origin": self.origin,
            "cursor": self.cursor,
            "data": self.data,
        }

    def to_json(self) -> bytes:
        # orjson over model_dump_json: this runs once per event on the publish hot path.
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_json(cls, body: bytes | str) -> Event:
        return cls.model_validate_json(body)


class ResyncMark(BaseModel):
    """The end of a resync's snapshot, published after its last event on the same route as the resource.

    A control message, not a change: routing key ``cmdb.<resource>.resync``, header ``x-action: resync``.
    Every sink that receives it *sweeps*: an object of ``resource`` (and ``tenant``) that it still holds with
    a version older than ``version`` was in no snapshot row (each snapshot row carried ``version``, and a
    live change after the head is newer still), so CMDB no longer has it: it ends as a delete at ``version``.
    ``scope`` limits the sweep to the objects the lists could see: ``{field: [values]}``, an object is swept
    only when ``data[field]`` is one of the values (for example the businesses listed); ``None`` means all.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_: Literal[1] = Field(default=1, alias="schema")
    type: Literal["resync_end"] = "resync_end"
    id: str
    resource: str
    tenant: str = "0"
    version: tuple[int, int]
    resync_id: str
    scope: dict[str, list[Any]] | None = None
    listed: int = 0
    started_at: str
    observed_at: str

    action: ClassVar[str] = "resync"

    @property
    def routing_key(self) -> str:
        return f"cmdb.{self.resource}.resync"

    def in_scope(self, data: dict[str, Any]) -> bool:
        """True when an object with this document is one the snapshot's lists covered."""
        if not self.scope:
            return True
        return all(data.get(field) in values for field, values in self.scope.items())

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, **self.model_dump(exclude={"schema_"}), "version": list(self.version)}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_json(cls, body: bytes | str) -> ResyncMark:
        return cls.model_validate_json(body)


Message = Event | ResyncMark
"""What travels on the bus: changes, and the marks that end a resync."""


def parse_message(body: bytes | str, action: str | None = None) -> Message:
    """An ``Event`` or a ``ResyncMark`` from its JSON; ``action`` is the ``x-action`` header when known (the
    hot path: no second parse). Raises pydantic's ValidationError when the body is neither."""
    if action is None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        action = ResyncMark.action if isinstance(doc, dict) and doc.get("type") == "resync_end" else "event"
    if action == ResyncMark.action:
        return ResyncMark.from_json(body)
    return Event.from_json(body)


def watch_event_id(resource: str, cursor: str) -> str:
    """The same CMDB event always gets the same id, however often it is replayed."""
    return hashlib.sha256(f"{resource}\n{cursor}".encode()).hexdigest()


def resync_event_id(resource: str, key: str, version: tuple[int, int], origin: str = "resync",
                    resync_id: str = "") -> str:
    """A snapshot row's id: one resync's row of an object always gets the same id (its redeliveries dedupe); two
    resyncs at the same head give it two ids, which is how a sweep tells the rows its own snapshot wrote from
    older ones of the same version (README "Resync"). ``key`` "mark:<resync_id>" names a resync's end mark."""
    base = f"{resource}\n{key}\n{version[0]}.{version[1]}\n{origin}"
    return hashlib.sha256((f"{base}\n{resync_id}" if resync_id else base).encode()).hexdigest()


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
