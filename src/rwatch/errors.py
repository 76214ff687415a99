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


class ListingBroken(PermanentError):
    """A list API answered in a way paging cannot trust (ids that do not advance, no ``info``, no count on
    request); ``api`` names it. The resync fails rather than loop or sweep from it."""


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
    """The request itself is refused (1199998 bad options, an unknown code, an unexpected 4xx)."""


class CmdbRefused(CmdbPermanentError):
    """CMDB or its gateway refused *who* is asking, not what: credentials, a grant, a tenant, an IAM permission,
    or a base URL where nothing answers. Nothing the client retries soon will change it; ``fix`` names what the
    operator must change or ask for, and ``reason`` is one of ``auth``, ``grant``, ``tenant``, ``permission``,
    ``not_found``. Retried slowly (``cmdb.refusal_retry``), so a grant made later is picked up without a restart."""

    reason = "refused"

    def __init__(self, message: str, *, fix: str, **fields: Any) -> None:
        super().__init__(message, fix=fix, **fields)
        self.fix = fix


class AuthFailed(CmdbRefused):
    """401 / 1640101 / 1640102 (or ESB's refusal): the app's credentials or the user were not accepted."""

    reason = "auth"


class GrantMissing(CmdbRefused):
    """1640301: the gateway ``bk-cmdb`` has not granted this app the API (resource) it called."""

    reason = "grant"


class TenantRefused(CmdbRefused):
    """1640302 (gateway) or 1100005 (CMDB): the ``X-Bk-Tenant-Id`` header is missing or names the wrong tenant."""

    reason = "tenant"


class PermissionDenied(CmdbRefused):
    """9900403: the user lacks an IAM permission (``watch_<resource>_event``, business view rights...)."""

    reason = "permission"


class EndpointNotFound(CmdbRefused):
    """404 / 1640401 / an HTML page: nothing that speaks CMDB's API answers at this URL (``cmdb.base_url``)."""

    reason = "not_found"


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


class SinkCrashed(RwatchError):
    """A sink raised an exception no rule covers: a bug, not a verdict on the events. The consumer finds the
    message that crashes alone and rejects it, so the broker's delivery limit counts it (README, "Guarantees")."""


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
