"""Webhook sink against a real HTTP receiver on 127.0.0.1: signatures, per-key order, outcomes, retries.

Signatures are checked with the ``standardwebhooks`` package, an implementation independent of rwatch's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from rwatch.config import WebhookSinkConfig, load_config, signing_key
from rwatch.errors import ConfigError, SinkRejected, SinkUnavailable
from rwatch.events import Event, ResyncMark, iso_utc, resync_event_id, watch_event_id
from rwatch.logs import setup_logging
from rwatch.sinks.webhook import WebhookSink, _RecentIds, sign

SECRET = "whsec_" + base64.b64encode(b"rwatch-test-key-0123456789abcdef").decode()
Response = int | str  # a status, or "hang" (never answer)


def event(i: int, key: str = "1", resource: str = "host") -> Event:
    cursor = f"cursor-{resource}-{i}"
    return Event(id=watch_event_id(resource, cursor), resource=resource, action="update", key=key,
                 version=(1_700_000_000 + i, 0), occurred_at=iso_utc(1_700_000_000 + i),
                 observed_at=iso_utc(1_700_000_000 + i), cursor=cursor, data={"n": i, "name": "主机"})


@dataclass
class Received:
    event_id: str
    key: str
    headers: dict[str, str]
    body: bytes
    started: int  # sequence numbers across all requests: when the handler began and ended
    ended: int = -1
    status: int = 0


@dataclass
class Receiver:
    """An HTTP endpoint that records every request and answers what ``responses`` says (default 200)."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    responses: dict[str, list[Response]] = field(default_factory=dict)  # per event id, consumed in order
    delay: Callable[[], float] | None = None
    gate_at: int = 0  # hold requests until this many are in flight at once (0: no gate)
    in_flight: int = 0
    max_in_flight: int = 0
    _seq: int = 0
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, target: Event | ResyncMark, *responses: Response) -> None:
        self.responses[target.id] = list(responses)

    def delivered(self) -> list[str]:
        return [r.event_id for r in self.requests if 200 <= r.status < 300]

    def sent(self) -> list[str]:
        return [r.event_id for r in self.requests]

    def _tick(self) -> int:
        self._seq += 1
        return self._seq

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        got = Received(request.headers.get("webhook-id", ""), json.loads(body).get("key", ""), dict(request.headers),
                       body, self._tick())
        self.requests.append(got)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate_at:
                if self.in_flight >= self.gate_at:
                    self._gate.set()
                await asyncio.wait_for(self._gate.wait(), 10)
            if self.delay is not None:
                await asyncio.sleep(self.delay())  # simulated endpoint latency, not waiting for anything
            queued = self.responses.get(got.event_id)
            answer = queued.pop(0) if queued else 200
            if answer == "hang":
                await self._release.wait()
                answer = 200
            assert isinstance(answer, int)
            got.status = answer
            return web.Response(status=answer, text="" if answer < 300 else f"nope {answer}",
                                headers={"Location": "http://127.0.0.1:1/elsewhere"} if 300 <= answer < 400 else None)
        finally:
            self.in_flight -= 1
            got.ended = self._tick()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rec.url = f"http://{host}:{port}/hook"
    try:
        yield rec
    finally:
        rec._release.set()
        rec._gate.set()
        await runner.cleanup()


MakeSink = Callable[..., Awaitable[WebhookSink]]


@pytest.fixture
async def make_sink() -> AsyncIterator[MakeSink]:
    made: list[WebhookSink] = []

    async def make(url: str, secret: str = SECRET, name: str = "hook", **kwargs: Any) -> WebhookSink:
        remembered = kwargs.pop("remembered", 10_000)
        settings = WebhookSinkConfig(kind="webhook", url=url, secret=SecretStr(secret), **kwargs)
        sink = WebhookSink(name, settings, remembered=remembered)
        await sink.open()
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- signatures and ids ----------------------------------------------------------------------------------


async def test_signature_verifies_with_the_reference_library(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url)
    sent = event(1)
    await sink.apply([sent])
    [got] = receiver.requests
    assert got.body == sent.to_json()
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["webhook-id"] == sent.id
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    assert Webhook(SECRET).verify(got.body, got.headers) == sent.to_dict()
    other = "whsec_" + base64.b64encode(b"another-key-entirely-0123456789").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(got.body, got.headers)
    tampered = got.body.replace(b'"n":1', b'"n":2')
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, got.headers)


async def test_an_unprefixed_secret_is_used_as_its_bytes(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url, secret="plain secret, not base64!")
    await sink.apply([event(1)])
    [got] = receiver.requests
    assert Webhook(b"plain secret, not base64!").verify(got.body, got.headers)["id"] == event(1).id


def test_a_broken_whsec_secret_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "hook.toml"
    path.write_text('[sinks.hook]\nkind = "webhook"\nurl = "http://127.0.0.1:1/"\nsecret = "whsec_not*base64"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert err.value.key == "sinks.hook.secret" and "base64" in str(err.value)
    with pytest.raises(ValueError):
        signing_key("whsec_")
    assert signing_key("whsec_" + base64.b64encode(b"abcd").decode().rstrip("=")) == b"abcd"  # padding optional


@given(key=st.binary(min_size=1, max_size=64), msg_id=st.text(min_size=1, max_size=40).filter(lambda s: "." not in s),
       timestamp=st.integers(min_value=0, max_value=2**33), body=st.text(max_size=200))
def test_sign_matches_the_reference_signer(key: bytes, msg_id: str, timestamp: int, body: str) -> None:
    reference = Webhook(key).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body)
    assert sign(key, msg_id, timestamp, body.encode()) == reference


async def test_a_redelivery_carries_the_same_id(receiver: Receiver, make_sink: MakeSink) -> None:
    sent = event(1)
    receiver.answer(sent, 503)
    sink = await make_sink(receiver.url)
    with pytest.raises(SinkUnavailable):
        await sink.apply([sent])
    await sink.apply([sent])
    restarted = await make_sink(receiver.url)  # a new process knows nothing of what was delivered: sends again
    await restarted.apply([sent])
    assert [r.headers["webhook-id"] for r in receiver.requests] == [sent.id] * 3
    assert [r.status for r in receiver.requests] == [503, 200, 200]
    for got in receiver.requests:
        Webhook(SECRET).verify(got.body, got.headers)


# --- order and concurrency -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_keys", "concurrency"), [(3, 4), (6, 4)])
async def test_events_of_one_key_go_in_order_and_keys_in_parallel(receiver: Receiver, make_sink: MakeSink,
                                                                  n_keys: int, concurrency: int) -> None:
    rng = random.Random(7)
    receiver.delay = lambda: rng.uniform(0, 0.004)
    # Hold the first requests until this many are in flight: proves the overlap without relying on timing.
    receiver.gate_at = min(n_keys, concurrency)
    sink = await make_sink(receiver.url, concurrency=concurrency)
    keys = [str(k) for k in range(n_keys)]
    batch = [event(i, key=keys[i % n_keys]) for i in range(6 * n_keys)]
    await sink.apply(batch)
    assert sorted(receiver.sent()) == sorted(e.id for e in batch)
    for key in keys:
        wanted = [e.id for e in batch if e.key == key]
        mine = [r for r in receiver.requests if r.key == key]
        assert [r.event_id for r in mine] == wanted
        for before, after in itertools.pairwise(mine):
            assert after.started > before.ended, "a key's next event was sent before the previous was answered"
    # At most one request per key and at most `concurrency` in all; the gate shows that many did overlap.
    assert receiver.max_in_flight == min(n_keys, concurrency)


async def test_concurrency_is_one_limit_for_the_whole_sink(receiver: Receiver, make_sink: MakeSink) -> None:
    rng = random.Random(11)
    receiver.delay = lambda: rng.uniform(0, 0.003)
    receiver.gate_at = 3
    sink = await make_sink(receiver.url, concurrency=3)
    hosts = [event(i, key=str(i)) for i in range(20)]
    modules = [event(i, key=str(i), resource="module") for i in range(20)]
    await asyncio.gather(sink.apply(hosts), sink.apply(modules))  # two consumers share the sink
    assert len(receiver.delivered()) == 40
    assert receiver.max_in_flight == 3


async def test_an_event_twice_in_a_batch_is_sent_once(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url)
    skipped = sample("rwatch_webhook_skipped_total", sink="hook")
    await sink.apply([event(1), event(2), event(1)])
    assert receiver.sent() == [event(1).id, event(2).id]
    assert sample("rwatch_webhook_skipped_total", sink="hook") == skipped + 1


async def test_empty_batch_sends_nothing_and_apply_needs_open(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url)
    await sink.apply([])
    assert receiver.requests == []
    await sink.close()
    with pytest.raises(RuntimeError):
        await sink.apply([event(1)])


# --- outcomes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_2xx_is_delivered(receiver: Receiver, make_sink: MakeSink, status: int) -> None:
    batch = [event(i, key=str(i % 2)) for i in range(4)]
    for e in batch:
        receiver.answer(e, status)
    sink = await make_sink(receiver.url)
    before = sample("rwatch_webhook_requests_total", sink="hook", outcome="delivered")
    await sink.apply(batch)
    assert sorted(receiver.delivered()) == sorted(e.id for e in batch)
    assert sample("rwatch_webhook_requests_total", sink="hook", outcome="delivered") == before + 4


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422, 302])
async def test_other_4xx_and_3xx_refuse_exactly_those_events(receiver: Receiver, make_sink: MakeSink,
                                                             status: int) -> None:
    batch = [event(i, key=str(i % 3)) for i in range(9)]
    refused = [batch[0], batch[4]]  # keys 0 and 1; their later events must still be delivered
    for e in refused:
        receiver.answer(e, status)
    sink = await make_sink(receiver.url)
    with pytest.raises(SinkRejected) as err:
        await sink.apply(batch)
    assert set(err.value.event_ids) == {e.id for e in refused} and len(err.value.event_ids) == 2
    assert err.value.extra["status"] == status
    assert str(err.value.extra["reason"]).startswith(f"HTTP {status}")
    assert sorted(receiver.delivered()) == sorted(e.id for e in batch if e not in refused)
    assert len(receiver.requests) == 9  # a redirect was not followed


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_408_429_5xx_are_transient_and_a_retry_sends_only_what_is_left(
        receiver: Receiver, make_sink: MakeSink, status: int) -> None:
    batch = [event(i, key=str(i % 3)) for i in range(9)]  # key "1": events 1, 4, 7
    receiver.answer(batch[4], status)
    sink = await make_sink(receiver.url)
    with pytest.raises(SinkUnavailable) as err:
        await sink.apply(batch)
    assert err.value.extra["status"] == status
    # key 1 stopped at its failed event: event 7 must not overtake event 4.
    assert batch[7].id not in receiver.sent()
    assert sorted(receiver.delivered()) == sorted(e.id for e in batch if e not in (batch[4], batch[7]))
    first_attempt = len(receiver.requests)
    await sink.apply(batch)  # the consumer retries the whole batch
    assert receiver.sent()[first_attempt:] == [batch[4].id, batch[7].id]


async def test_a_timeout_is_transient(receiver: Receiver, make_sink: MakeSink) -> None:
    batch = [event(1, key="a"), event(2, key="b")]
    receiver.answer(batch[0], "hang")
    sink = await make_sink(receiver.url, timeout=1.0)
    before = sample("rwatch_webhook_requests_total", sink="hook", outcome="timeout")
    with pytest.raises(SinkUnavailable) as err:
        await sink.apply(batch)
    assert err.value.extra["status"] is None and err.value.extra["event_id"] == batch[0].id
    assert receiver.delivered() == [batch[1].id]
    assert sample("rwatch_webhook_requests_total", sink="hook", outcome="timeout") == before + 1


async def test_connection_refused_is_transient(make_sink: MakeSink) -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sink = await make_sink(f"http://user:hunter2@127.0.0.1:{port}/hook")
    with pytest.raises(SinkUnavailable) as err:
        await sink.apply([event(1), event(2, key="2")])
    assert err.value.extra["failed"] == 2
    assert err.value.extra["url"] == f"http://user:***@127.0.0.1:{port}/hook"  # the password stays out of logs


async def test_transient_wins_over_permanent_and_the_retry_reports_the_refusal(
        receiver: Receiver, make_sink: MakeSink) -> None:
    batch = [event(i, key=str(i)) for i in range(4)]
    receiver.answer(batch[1], 404, 404)
    receiver.answer(batch[2], 500)
    sink = await make_sink(receiver.url)
    with pytest.raises(SinkUnavailable) as err:
        await sink.apply(batch)
    assert err.value.extra["rejected"] == 1
    with pytest.raises(SinkRejected) as refused:
        await sink.apply(batch)
    assert refused.value.event_ids == (batch[1].id,)
    # The refused event was asked again (the endpoint may have changed its mind); the delivered ones were not.
    assert receiver.sent().count(batch[1].id) == 2
    assert receiver.sent().count(batch[0].id) == 1 and receiver.sent().count(batch[3].id) == 1
    assert sorted(receiver.delivered()) == sorted(e.id for e in batch if e is not batch[1])


async def test_delivered_ids_are_remembered_within_bounds(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url, remembered=2)
    await sink.apply([event(1), event(2), event(3)])
    await sink.apply([event(3)])  # remembered: not sent again
    await sink.apply([event(1)])  # forgotten (only the last 2 are kept): sent again
    assert receiver.sent() == [event(i).id for i in (1, 2, 3, 1)]
    recent = _RecentIds(2)
    for name in ("a", "b", "a", "c"):
        recent.add(name)
    assert "a" in recent and "c" in recent and "b" not in recent and len(recent) == 2


# --- resync marks ----------------------------------------------------------------------------------------


def mark(resource: str = "host", resync_id: str = "r1") -> ResyncMark:
    version = (1_700_000_500, 1)
    return ResyncMark(id=resync_event_id(resource, f"mark:{resync_id}", version), resource=resource, version=version,
                      resync_id=resync_id, scope={"bk_biz_id": [1, 2]}, listed=5,
                      started_at=iso_utc(1_700_000_400), observed_at=iso_utc(1_700_000_500))


async def test_sweep_posts_the_mark_signed_like_an_event(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url)
    end = mark()
    assert await sink.sweep(end) == 0  # the receiver holds the objects: it sweeps
    [got] = receiver.requests
    assert got.body == end.to_json()
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["webhook-id"] == end.id
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    doc = Webhook(SECRET).verify(got.body, got.headers)
    assert doc == end.to_dict() and doc["type"] == "resync_end"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(got.body.replace(b'"listed":5', b'"listed":6'), got.headers)


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_a_mark_failing_transiently_is_unavailable_and_retried(receiver: Receiver, make_sink: MakeSink,
                                                                     status: int) -> None:
    end = mark()
    receiver.answer(end, status)
    sink = await make_sink(receiver.url)
    with pytest.raises(SinkUnavailable) as err:
        await sink.sweep(end)
    assert err.value.extra["status"] == status and err.value.extra["resource"] == "host"
    assert await sink.sweep(end) == 0  # the consumer's retry
    assert receiver.sent() == [end.id, end.id]
    assert receiver.delivered() == [end.id]


@pytest.mark.parametrize("status", [400, 404, 422, 302])
async def test_a_mark_refused_is_rejected_by_its_id(receiver: Receiver, make_sink: MakeSink, status: int) -> None:
    end = mark()
    receiver.answer(end, status)
    sink = await make_sink(receiver.url)
    with pytest.raises(SinkRejected) as err:
        await sink.sweep(end)
    assert err.value.event_ids == (end.id,)
    assert err.value.extra["status"] == status
    assert str(err.value.extra["reason"]).startswith(f"HTTP {status}")
    assert len(receiver.requests) == 1  # a redirect was not followed
    # A refused mark is not remembered as delivered: a replay from the dead-letter queue sends it again.
    assert await sink.sweep(end) == 0
    assert receiver.sent() == [end.id, end.id] and receiver.delivered() == [end.id]


async def test_a_mark_timing_out_is_unavailable(receiver: Receiver, make_sink: MakeSink) -> None:
    end = mark()
    receiver.answer(end, "hang")
    sink = await make_sink(receiver.url, timeout=1.0)
    with pytest.raises(SinkUnavailable) as err:
        await sink.sweep(end)
    assert err.value.extra["status"] is None


async def test_a_mark_to_an_unreachable_endpoint_is_unavailable(make_sink: MakeSink) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sink = await make_sink(f"http://user:hunter2@127.0.0.1:{port}/hook")
    with pytest.raises(SinkUnavailable) as err:
        await sink.sweep(mark())
    assert err.value.extra["url"] == f"http://user:***@127.0.0.1:{port}/hook"


async def test_a_delivered_mark_is_not_sent_twice(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url)
    end, other = mark(), mark(resync_id="r2")
    before = sample("rwatch_webhook_requests_total", sink="hook", outcome="delivered")
    assert await sink.sweep(end) == 0
    assert await sink.sweep(end) == 0  # a redelivered mark: remembered
    assert await sink.sweep(other) == 0  # another resync's mark is its own message
    assert receiver.sent() == [end.id, other.id]
    assert sample("rwatch_webhook_requests_total", sink="hook", outcome="delivered") == before + 2
    restarted = await make_sink(receiver.url)  # the memory is per process
    assert await restarted.sweep(end) == 0
    assert receiver.sent() == [end.id, other.id, end.id]


async def test_events_and_marks_keep_their_order(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url)
    await sink.apply([event(1), event(2, key="2")])
    await sink.sweep(mark())
    await sink.apply([event(3)])
    assert receiver.sent()[2:] == [mark().id, event(3).id]
    assert sorted(receiver.sent()[:2]) == sorted([event(1).id, event(2, key="2").id])


async def test_sweep_needs_open(receiver: Receiver, make_sink: MakeSink) -> None:
    sink = await make_sink(receiver.url)
    await sink.close()
    with pytest.raises(RuntimeError):
        await sink.sweep(mark())
    assert receiver.requests == []


# --- logs ------------------------------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    setup_logging("info", "json", out)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


async def test_refusals_and_failures_are_logged_with_their_facts(
        receiver: Receiver, make_sink: MakeSink, log_stream: io.StringIO) -> None:
    batch = [event(1, key="7"), event(2, key="8"), event(3, key="9")]
    receiver.answer(batch[0], 410)
    sink = await make_sink(receiver.url)
    with pytest.raises(SinkRejected):
        await sink.apply(batch)
    later = event(4, key="8")
    receiver.answer(later, 503)
    with pytest.raises(SinkUnavailable):
        await sink.apply([later])
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    rejected = [line for line in lines if line["event"] == "webhook_rejected"]
    failed = [line for line in lines if line["event"] == "webhook_failed"]
    assert len(rejected) == 1 and len(failed) == 1
    assert rejected[0]["status"] == 410 and rejected[0]["event_id"] == batch[0].id
    assert rejected[0]["resource"] == "host" and rejected[0]["key"] == "7" and rejected[0]["sink"] == "hook"
    assert failed[0]["status"] == 503 and failed[0]["event_id"] == later.id and failed[0]["key"] == "8"
    assert not [line for line in lines if line["level"] == "info" and line["logger"] == "rwatch.sinks.webhook"]
