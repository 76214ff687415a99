"""Every error rwatch raises, named for what the caller does about it.

Errors carry their facts as attributes (``resource``, ``code``, ``key``...) so a JSON log shows them as
keys; ``fields()`` returns them for ``log.error("...", **err.fields())``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp


class RwatchError(Exception):
    """Base of every error rwatch raises on purpose."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = fields

    def fields(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": type(self).__name__, **self.extra}


class ConfigError(RwatchError):
    """The configuration is wrong; ``file`` and ``key`` say where. The CLI exits 2."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        super().__init__(message, file=file, key=key)
        self.file = file
        self.key = key

    def __str__(self) -> str:
        where = " ".join(p for p in (self.file and f"{self.file}:", self.key and f"[{self.key}]") if p)
        return f"{where} {self.message}" if where else self.message


class TransientError(RwatchError):
    """Worth retrying with backoff: the same request may succeed later."""


class PermanentError(RwatchError):
    """Retrying the same thing will not help; someone has to change something."""


class ResyncUnsupported(PermanentError):
    """No list API covers every object of the resource, so it cannot be resynced (its gaps stay open)."""


class CmdbError(RwatchError):
    """CMDB answered ``result: false``; ``code`` is its error code."""

    def __init__(self, message: str, *, code: int | None = None, resource: str | None = None,
                 **fields: Any) -> None:
        super().__init__(message, code=code, resource=resource, **fields)
        self.code = code
        self.resource = resource


class CursorExpired(CmdbError):
    """1103007: the cursor is unknown or older than the retention window. Resume by time."""


class StartOutOfWindow(CmdbError):
    """1199006: ``bk_start_from`` is older than the retention window or in the future."""


class CmdbTransientError(CmdbError, TransientError):
    """CMDB or its gateway failed in a way that passes: 5xx, 429, 1199997, 1103008, 1199017, malformed JSON."""


class CmdbRateLimited(CmdbTransientError):
    """HTTP 429 or code 1199997: too many requests."""


class CmdbPermanentError(CmdbError, PermanentError):
    """The request itself is refused (1199998 bad options, 9900403 no permission, 4xx, bad credentials)."""


class PermissionDenied(CmdbPermanentError):
    """9900403: the app lacks the IAM action for this resource."""


class BusError(TransientError):
    """The broker did not take a message durably (nack, return, timeout, lost connection)."""


class MessageReturned(BusError):
    """The broker returned a ``mandatory`` message: no queue is bound for its routing key."""


class TopologyConflict(PermanentError):
    """The broker holds an exchange or queue of the same name with other arguments; ``queue`` and
    ``argument`` say which. Delete it or change the configuration."""


class SinkUnavailable(TransientError):
    """A sink could not apply a batch now (database down, endpoint timing out); the batch is retried."""


class SinkRejected(PermanentError):
    """A sink refuses events for good. ``event_ids`` names them (the rest of the batch was applied);
    empty means the batch as a whole was refused and the consumer must find the culprits one by one."""

    def __init__(self, message: str, *, event_ids: tuple[str, ...] = (), **fields: Any) -> None:
        super().__init__(message, event_ids=list(event_ids), **fields)
        self.event_ids = event_ids


class StoreError(TransientError):
    """The cursor store could not be read or written."""


class LeaseLost(PermanentError):
    """The watcher's lease on a resource was taken over (its fence is stale): it must stop following the
    resource at once and save nothing; the cursor was not written."""


class Stopping(RwatchError):
    """Raised inside retries when shutdown was requested, so loops unwind instead of retrying."""


# One tuple every retry uses to decide "back off and try again" versus "give up and report".
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    TransientError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)
