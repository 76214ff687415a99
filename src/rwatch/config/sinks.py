"""The [sinks.<name>] tables: one model per sink kind (mirror, webhook, prom_sd, jsonl), told apart by ``kind``."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from rwatch.cmdb.protocol import RESOURCES
from rwatch.config.values import Duration, SecretUrl, SecretUrlField, Section


class _SinkBase(Section):
    enabled: bool = True


class _QueueSink(_SinkBase):
    """A sink fed by queues of its own: one per resource it takes."""

    resources: list[str] | None = Field(default=None, description="default: every enabled resource")
    batch_max: int = Field(default=500, ge=1, description="events applied together at most")
    batch_wait: Duration = Field(default=0.05,
                                 description="at most how long a batch waits for more, while they keep arriving")
    # The bound on holding a failing batch (issue 12): past it the consumer bisects the batch to find the event
    # that fails alone while the others apply, and dead-letters only that one. A sink that fails for every event
    # is never past it in effect: nothing proves it up, so the batch is held and retried, whatever this says.
    max_attempts: int = Field(default=10, ge=1, description="failed attempts of a batch before it is bisected")
    retry_timeout: Duration = Field(default=120.0, gt=0,
                                    description="or this long after its first failure, whichever comes first")
    retry_backoff: Duration = Field(default=0.2, gt=0, description="first pause before retrying a failed batch")
    retry_backoff_max: Duration = Field(default=30.0, gt=0, description="the pause doubles up to this")

    @field_validator("resources")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if name not in RESOURCES:
                raise ValueError(f"unknown resource {name!r}")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> _QueueSink:
        if self.retry_backoff > self.retry_backoff_max:
            raise ValueError("retry_backoff: must not exceed retry_backoff_max")
        return self


class MirrorSinkConfig(_QueueSink):
    kind: Literal["mirror"]
    url: SecretUrlField = SecretUrl("sqlite:///rwatch-mirror.db")


WEBHOOK_SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The webhook HMAC key: base64-decoded after a ``whsec_`` prefix, else the secret's UTF-8 bytes."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        key = secret.encode()
    else:
        encoded = secret[len(WEBHOOK_SECRET_PREFIX):]
        try:
            # Padding is often left off in the wild; the reference library adds it back too.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from exc
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


class WebhookSinkConfig(_QueueSink):
    kind: Literal["webhook"]
    url: str
    secret: SecretStr

    @field_validator("secret")
    @classmethod
    def _usable_key(cls, value: SecretStr) -> SecretStr:
        signing_key(value.get_secret_value())  # checked at load, so check-config catches it
        return value
    timeout: Duration = 10.0
    concurrency: int = Field(default=8, ge=1)


class PromJob(Section):
    name: str
    port: int = Field(ge=1, le=65535)
    biz: list[str | int] = Field(default_factory=list)
    set: list[str | int] = Field(default_factory=list)
    module: list[str | int] = Field(default_factory=list)


class PromSdSinkConfig(_SinkBase):
    kind: Literal["prom_sd"]
    file: str | None = None
    source: str = Field(default="mirror", description="the mirror sink whose topology is exported")
    jobs: list[PromJob] = Field(default_factory=list)


class JsonlSinkConfig(_QueueSink):
    kind: Literal["jsonl"]
    path: str = "-"
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    backups: int = Field(default=5, ge=0)


SinkConfig = Annotated[
    MirrorSinkConfig | WebhookSinkConfig | PromSdSinkConfig | JsonlSinkConfig, Field(discriminator="kind")
]

# The kind tags, which pydantic puts into an error's location (loading.py takes them out again).
SINK_KINDS = frozenset({"mirror", "webhook", "prom_sd", "jsonl"})
