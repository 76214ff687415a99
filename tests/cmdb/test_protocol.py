"""The wire protocol: the cursor codec, keys, reply parsing and request bodies."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rwatch.cmdb import protocol as p


def test_no_event_cursor_decodes_to_the_documented_fields() -> None:
    cur = p.decode_cursor(p.NO_EVENT_CURSOR)
    assert cur == p.Cursor(1, "5ea6d3f394c1f5d986e9bd86", "noEvent", 1, 1, "")


@given(
    st.sampled_from(sorted(p.RESOURCE_TYPES.values())),
    st.text(alphabet="0123456789abcdef", min_size=24, max_size=24),
    st.sampled_from(["insert", "update", "replace", "delete"]),
    st.integers(0, 2**40), st.integers(0, 2**31), st.text(alphabet="0123456789", max_size=8),
)
def test_cursor_round_trip(kind: int, oid: str, op: str, sec: int, inc: int, uniq: str) -> None:
    cur = p.Cursor(kind, oid, op, sec, inc, uniq)
    assert p.decode_cursor(cur.encode()) == cur


@pytest.mark.parametrize("text", [
    "", "not base64!", base64.b64encode(b"1\r2\rabc").decode(),  # too few fields
    "MQ0yDTE1ODky",  # the docs' old five-field form
    base64.b64encode(b"2\r2\ro\rinsert\r1\r1\r").decode(),  # unknown version
    base64.b64encode(b"1\rX\ro\rinsert\r1\r1\r").decode(),  # non-numeric type
    base64.b64encode(b"\xff\xfe").decode(),
])
def test_garbage_cursors_do_not_decode(text: str) -> None:
    assert p.decode_cursor(text) is None


def test_object_keys() -> None:
    assert p.object_key("host", {"bk_host_id": 7}) == "7"
    assert p.object_key("host_relation", {"bk_host_id": 7, "bk_module_id": 3}) == "7:3"
    assert p.object_key("object_instance", {"bk_obj_id": "switch", "bk_inst_id": 9}) == "switch:9"
    assert p.object_key("project", {"id": "p1"}) == "p1"
    assert p.object_key("host", {}) is None
    assert p.object_key("host", {"bk_host_id": None}) is None


def test_parse_reply_and_placeholder() -> None:
    reply = p.parse_watch_data({"bk_watched": True, "bk_events": [
        {"bk_cursor": "c1", "bk_resource": "host", "bk_event_type": "create", "bk_detail": {"bk_host_id": 1}},
        {"bk_cursor": "c2", "bk_resource": "host", "bk_event_type": "delete", "bk_detail": None},
    ]}, "host")
    assert reply.watched and reply.last_cursor == "c2" and reply.events[1].detail == {}
    empty = p.parse_watch_data({"bk_watched": False, "bk_events": [{"bk_cursor": "c2", "bk_resource": "host"}]},
                               "host")
    assert not empty.watched and empty.last_cursor == "c2" and empty.events[0].event_type == ""


PLACEHOLDER = {"bk_cursor": "c", "bk_resource": "host", "bk_event_type": "", "bk_detail": {}}
EVENT = {"bk_cursor": "c", "bk_resource": "host", "bk_event_type": "update", "bk_detail": {"bk_host_id": 1}}


@pytest.mark.parametrize("data", [
    None, [], {"bk_watched": True, "bk_events": {}}, {"bk_watched": True, "bk_events": [1]},
    {"bk_watched": True, "bk_events": [{"bk_detail": {}}]},
    {"bk_watched": True, "bk_events": [{"bk_cursor": "c", "bk_detail": []}]},
    # Issue 12, point 5: nothing a real server sends, and each would move the position sideways if believed.
    {"bk_watched": True, "bk_events": []}, {"bk_watched": False, "bk_events": []},
    {"bk_watched": True}, {"bk_watched": True, "bk_events": None},
    {"bk_events": [EVENT]}, {"bk_watched": "yes", "bk_events": [EVENT]},
    {"bk_watched": False, "bk_events": [EVENT]},
    {"bk_watched": False, "bk_events": [{**PLACEHOLDER, "bk_detail": {"bk_host_id": 1}}]},
    {"bk_watched": False, "bk_events": [PLACEHOLDER, PLACEHOLDER]},
])
def test_malformed_replies_raise(data: object) -> None:
    with pytest.raises(ValueError):
        p.parse_watch_data(data, "host")


def test_a_placeholder_may_carry_an_empty_or_null_detail() -> None:
    for element in (PLACEHOLDER, {"bk_cursor": "c", "bk_resource": "host"},
                    {**PLACEHOLDER, "bk_detail": None, "bk_event_type": None}):
        reply = p.parse_watch_data({"bk_watched": False, "bk_events": [element]}, "host")
        assert not reply.watched and reply.last_cursor == "c"


def test_watch_body_has_exactly_one_start_mode() -> None:
    body = p.watch_body(resource="host", fields=["bk_host_id"], event_types=[], cursor="c", start_from=5)
    assert body["bk_cursor"] == "c" and "bk_start_from" not in body
    body = p.watch_body(resource="object_instance", fields=[], event_types=["create"], start_from=5,
                        sub_resource="switch")
    assert body["bk_start_from"] == 5 and body["bk_filter"] == {"bk_sub_resource": "switch"}
    assert "bk_cursor" not in p.watch_body(resource="biz", fields=["x"], event_types=[])
