"""The normalized event: the one JSON shape every sink and every consumer of the bus reads.

The contract is in DESIGN.md ("Normalized event"); ``Event.model_json_schema()`` documents it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

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


def watch_event_id(resource: str, cursor: str) -> str:
    """The same CMDB event always gets the same id, however often it is replayed."""
    return hashlib.sha256(f"{resource}\n{cursor}".encode()).hexdigest()


def resync_event_id(resource: str, key: str, version: tuple[int, int], origin: str = "resync") -> str:
    return hashlib.sha256(f"{resource}\n{key}\n{version[0]}.{version[1]}\n{origin}".encode()).hexdigest()


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
