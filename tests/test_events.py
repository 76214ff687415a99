"""The bus's messages: events and the resync marks between them, and how a body is told apart."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from rwatch.events import Event, ResyncMark, iso_utc, parse_message, resync_event_id, watch_event_id


def event(data: dict[str, Any], resource: str = "host") -> Event:
    cursor = "cursor-1"
    return Event(id=watch_event_id(resource, cursor), resource=resource, action="update", key="1",
                 version=(1_700_000_000, 3), occurred_at=iso_utc(1_700_000_000), observed_at=iso_utc(1_700_000_001),
                 cursor=cursor, data=data)


def mark(resource: str = "host_relation", scope: dict[str, list[Any]] | None = None, tenant: str = "0") -> ResyncMark:
    version = (1_700_000_100, 7)
    return ResyncMark(id=resync_event_id(resource, "mark:r1", version), resource=resource, tenant=tenant,
                      version=version, resync_id="r1", scope=scope, listed=42, started_at=iso_utc(1_700_000_000),
                      observed_at=iso_utc(1_700_000_100))


@pytest.mark.parametrize("scope", [None, {"bk_biz_id": [1, 2]}, {"bk_biz_id": [3], "bk_set_id": ["a"]}])
@pytest.mark.parametrize("action", [None, "resync"], ids=["sniffed", "x-action"])
def test_a_mark_round_trips_through_parse_message(scope: dict[str, list[Any]] | None, action: str | None) -> None:
    sent = mark(scope=scope, tenant="t9")
    body = sent.to_json()
    doc = orjson.loads(body)
    assert doc["type"] == "resync_end" and doc["schema"] == 1 and doc["version"] == [1_700_000_100, 7]
    assert "schema_" not in doc and "action" not in doc
    got = parse_message(body, action)
    assert isinstance(got, ResyncMark)
    assert got == sent
    assert got.to_dict() == sent.to_dict() == doc
    assert parse_message(body.decode(), action) == sent  # str bodies too


@pytest.mark.parametrize("action", [None, "update"], ids=["sniffed", "x-action"])
def test_an_event_round_trips_through_parse_message(action: str | None) -> None:
    sent = event({"bk_host_id": 1})
    got = parse_message(sent.to_json(), action)
    assert isinstance(got, Event) and got == sent


@pytest.mark.parametrize("data", [
    {"type": "resync_end"},
    {"bk_host_name": "resync_end", "note": '{"type": "resync_end"}'},
    {"nested": {"type": "resync_end", "resource": "host"}},
])
def test_an_event_mentioning_resync_end_in_its_data_is_still_an_event(data: dict[str, Any]) -> None:
    sent = event(data)
    got = parse_message(sent.to_json())
    assert isinstance(got, Event) and got == sent
    assert parse_message(sent.to_json(), "update") == sent


def test_bodies_that_are_neither_raise_validation_error() -> None:
    for body in (b"{not json", b"[]", b'"resync_end"', b"{}"):
        with pytest.raises(ValidationError):
            parse_message(body)
    with pytest.raises(ValidationError):  # the header says mark, the body is an event
        parse_message(event({}).to_json(), "resync")
    with pytest.raises(ValidationError):  # a mark with an unknown field
        parse_message(orjson.dumps({**mark().to_dict(), "extra": 1}))
    with pytest.raises(ValidationError):  # a mark of another type
        parse_message(orjson.dumps({**mark().to_dict(), "type": "resync_start"}), "resync")


def test_the_mark_routes_with_its_resource() -> None:
    assert mark("host").routing_key == "cmdb.host.resync"
    assert mark("host_relation").routing_key == "cmdb.host_relation.resync"
    assert mark().action == ResyncMark.action == "resync"
    assert event({}).routing_key == "cmdb.host.update"


def test_in_scope_without_a_scope_is_everything() -> None:
    assert mark(scope=None).in_scope({}) is True
    assert mark(scope=None).in_scope({"bk_biz_id": 99}) is True
    assert mark(scope={}).in_scope({"bk_biz_id": 99}) is True


def test_in_scope_matches_every_field_against_its_values() -> None:
    one = mark(scope={"bk_biz_id": [1, 2]})
    assert one.in_scope({"bk_biz_id": 1, "other": "x"})
    assert one.in_scope({"bk_biz_id": 2})
    assert not one.in_scope({"bk_biz_id": 3})
    assert not one.in_scope({})  # an object without the field was in no listed scope
    assert not one.in_scope({"bk_biz_id": None})
    assert not one.in_scope({"bk_biz_id": "1"})  # values compare as they are, not as text
    two = mark(scope={"bk_biz_id": [1], "bk_supplier_account": ["0"]})
    assert two.in_scope({"bk_biz_id": 1, "bk_supplier_account": "0"})
    assert not two.in_scope({"bk_biz_id": 1, "bk_supplier_account": "1"})
    assert not two.in_scope({"bk_biz_id": 2, "bk_supplier_account": "0"})
    assert not mark(scope={"bk_biz_id": []}).in_scope({"bk_biz_id": 1})  # nothing listed covers nothing


def test_the_mark_id_is_stable_per_resync_and_version() -> None:
    assert mark().id == mark().id
    v = (1_700_000_100, 7)
    assert resync_event_id("host", "mark:r1", v) != resync_event_id("host", "mark:r2", v)
    assert resync_event_id("host", "mark:r1", v) != resync_event_id("host", "mark:r1", (v[0], v[1] + 1))
