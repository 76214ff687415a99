"""The webhook sink: one signed POST per event to one endpoint, per-object order kept, bounded concurrency.

Wire format (https://www.standardwebhooks.com): the body is the normalized event as JSON (``Event.to_json``),
``Content-Type: application/json``, and three headers:

- ``webhook-id``: the event id. Every redelivery of an event carries the same id, so a receiver dedupes on it.
- ``webhook-timestamp``: Unix seconds of this attempt (receivers reject stale ones, 5 min by the standard).
- ``webhook-signature``: ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), computed by the
  standard's reference library (``standardwebhooks``) rather than by hand.

The key: a secret of the standard form ``whsec_<base64>`` is base64-decoded (what
``standardwebhooks.Webhook(secret)`` does); a secret without that prefix is used as its UTF-8 bytes as they
stand. The reference library base64-decodes an unprefixed *string* too, so a receiver given an unprefixed
secret verifies with ``Webhook(secret.encode())``; prefer ``whsec_`` secrets.

Order and concurrency: events of one object (``tenant``, ``resource``, ``key``) in a batch are sent strictly one
after another in batch order, different objects in parallel, at most ``concurrency`` requests in flight for the
whole sink (several consumers, one per resource, share one sink). When an event of an object fails transiently,
its later events are not sent in this attempt: they would reach the receiver ahead of the failed one. A refused
event does not hold back the object's later events (it goes to the dead-letter queue, it cannot come first).
A receiver that will never accept some event should answer 4xx (422, say), not 5xx: a 5xx holds up its
whole queue, retried with backoff, until the batch passes the sink's bound (``max_attempts``, ``retry_timeout``)
and the consumer isolates that event as poison (``rwatch.sinks.applier``).

Outcomes: 2xx is delivered. 408, 429, 5xx, timeouts and connection errors are transient. Every other status
(other 4xx, and 3xx: redirects are not followed) refuses that event for good.
``apply`` sends everything it can, then: any transient failure raises ``SinkUnavailable`` and the whole batch
is retried (transient wins over permanent: a refused event is sent again on the retry and refused again,
then reported once the endpoint is healthy); otherwise refused events raise ``SinkRejected`` naming exactly
them (they go to the dead-letter queue, the rest counted as applied).

Idempotence (DESIGN.md invariant 2): a webhook cannot be version-fenced by rwatch, delivery is at-least-once.
The sink remembers the ids of the last ``REMEMBERED`` events it delivered and does not send them again, so
retrying a batch after a partial failure re-sends only what did not get through. That memory lives in this
process only: after a restart, or a redelivery older than the memory, the event is sent again with the same
``webhook-id``. Receivers must dedupe by ``webhook-id`` and should ignore an event whose ``version`` is older
than what they hold for its ``resource``/``key``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from standardwebhooks import Webhook

from rwatch import __version__
from rwatch.config import WebhookSinkConfig, mask_url, signing_key
from rwatch.errors import SinkRejected, SinkUnavailable
from rwatch.events import Event, Message, ResyncMark
from rwatch.logs import get_logger
from rwatch.metrics import WEBHOOK_REQUEST_SECONDS, WEBHOOK_REQUESTS, WEBHOOK_SKIPPED

REMEMBERED = 10_000
_SNIPPET_BYTES = 512  # of a refusing answer's body, for the log
_DRAIN_BYTES = 64 * 1024  # of an accepting answer's body, read so the connection can be reused


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt. ``key`` is the decoded key (``signing_key``): given bytes,
    the library uses them as they stand; the body is signed byte for byte."""
    return Webhook(key).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body)


def is_transient(status: int) -> bool:
    return status in (408, 429) or status >= 500


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read a small answer to its end (the connection goes back to the pool); give up on a large one (it closes)."""
    received = 0
    async for chunk in resp.content.iter_any():
        received += len(chunk)
        if received > _DRAIN_BYTES:
            return


@dataclass(frozen=True, slots=True)
class _Failure:
    event: Message
    status: int | None  # None: no answer (timeout, connection error)
    reason: str


class _RecentIds:
    """A bounded set of the most recently added ids (oldest forgotten first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


class WebhookSink:
    """POSTs each event, signed, to ``settings.url``. See the module docstring for the delivery rules."""

    def __init__(self, name: str, settings: WebhookSinkConfig, *, clock: Callable[[], float] = time.time,
                 remembered: int = REMEMBERED) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._key = signing_key(settings.secret.get_secret_value())  # validated when the config loaded
        self._url = mask_url(settings.url)  # for logs and errors: a password in the URL stays out of them
        self._delivered = _RecentIds(remembered)
        # One limit for the whole sink: consumers of several resources apply to it at the same time. Taken
        # before the request, so `timeout` and the signed timestamp never include waiting for a free slot.
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._log = get_logger("rwatch.sinks.webhook", sink=name)

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.concurrency),
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
                headers={"User-Agent": f"rwatch/{__version__}"},
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def apply(self, events: Sequence[Event]) -> None:
        if self._session is None:
            raise RuntimeError(f"webhook sink {self.name!r} is not open")
        chains: dict[tuple[str, str, str], list[Event]] = {}  # per object: (tenant, resource, key)
        for event in events:
            chains.setdefault((event.tenant, event.resource, event.key), []).append(event)
        pending = list(chains.values())
        pending.reverse()  # pop() then takes objects in batch order
        rejected: list[_Failure] = []
        failed: list[_Failure] = []

        async def worker(session: aiohttp.ClientSession) -> None:
            while pending:
                for event in pending.pop():
                    if event.id in self._delivered:
                        WEBHOOK_SKIPPED.labels(self.name).inc()
                        continue
                    failure = await self._send(session, event)
                    if failure is None:
                        self._delivered.add(event.id)
                    elif failure.status is not None and not is_transient(failure.status):
                        rejected.append(failure)  # refused for good: the object's later events still go
                    else:
                        failed.append(failure)
                        break  # the object's later events must not overtake this one

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self.settings.concurrency, len(pending))):
                group.create_task(worker(self._session))

        for failure in rejected:
            self._log.warning("webhook_rejected", status=failure.status, reason=failure.reason,
                              event_id=failure.event.id, resource=failure.event.resource,
                              key=getattr(failure.event, "key", None))
        if failed:
            first = failed[0]
            self._log.warning("webhook_failed", status=first.status, reason=first.reason, event_id=first.event.id,
                              resource=first.event.resource, key=getattr(first.event, "key", None), failed=len(failed),
                              rejected=len(rejected), events=len(events))
            raise SinkUnavailable(f"webhook endpoint failed for {len(failed)} event(s): {first.reason}",
                                  sink=self.name, url=self._url, status=first.status, reason=first.reason,
                                  event_id=first.event.id, failed=len(failed), rejected=len(rejected))
        if rejected:
            first = rejected[0]
            raise SinkRejected(f"webhook endpoint refused {len(rejected)} event(s): {first.reason}",
                               event_ids=tuple(f.event.id for f in rejected), sink=self.name, url=self._url,
                               status=first.status, reason=first.reason)

    async def sweep(self, mark: ResyncMark) -> int:
        """Forward the mark (``webhook-id`` = its id): the receiver holds the objects, so the receiver sweeps
        (README, "Resync"). Nothing is swept here, so 0."""
        if self._session is None:
            raise RuntimeError(f"webhook sink {self.name!r} is not open")
        if mark.id in self._delivered:
            return 0
        failure = await self._send(self._session, mark)
        if failure is None:
            self._delivered.add(mark.id)
            return 0
        fields = {"sink": self.name, "url": self._url, "status": failure.status, "reason": failure.reason,
                  "resource": mark.resource}
        if failure.status is not None and not is_transient(failure.status):
            raise SinkRejected(f"webhook endpoint refused the resync mark: {failure.reason}", event_ids=(mark.id,),
                               **fields)
        raise SinkUnavailable(f"webhook endpoint failed for the resync mark: {failure.reason}", **fields)

    async def _send(self, session: aiohttp.ClientSession, event: Message) -> _Failure | None:
        """POST one event; None when delivered, else what went wrong. Never raises but for cancellation."""
        body = event.to_json()
        async with self._slots:
            timestamp = int(self._clock())  # signed when actually sent, not when queued behind the limit
            headers = {
                "Content-Type": "application/json",
                "webhook-id": event.id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self._key, event.id, timestamp, body),
            }
            started = time.perf_counter()
            try:
                async with session.post(self.settings.url, data=body, headers=headers,
                                        allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        await _drain(resp)
                        outcome, failure = "delivered", None
                    else:
                        snippet = (await resp.content.read(_SNIPPET_BYTES)).decode(errors="replace")
                        reason = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
                        reason = f"{reason}: {snippet}" if snippet else reason
                        transient = is_transient(resp.status)
                        outcome = "failed" if transient else "rejected"
                        failure = _Failure(event, resp.status, reason)
            except TimeoutError:
                outcome, failure = "timeout", _Failure(event, None, f"no answer within {self.settings.timeout} s")
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                # ValueError covers an unusable URL: a configuration fault, so keep the events, do not refuse them.
                outcome, failure = "connection_error", _Failure(event, None, f"{type(exc).__name__}: {exc}")
            finally:
                WEBHOOK_REQUEST_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        WEBHOOK_REQUESTS.labels(self.name, outcome).inc()
        return failure
