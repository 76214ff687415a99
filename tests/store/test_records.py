"""The store's records: a cursor position decoded from a CMDB cursor."""

from __future__ import annotations

import pytest

from rwatch.cmdb.protocol import NO_EVENT_CURSOR, Cursor
from rwatch.store.records import CursorState


def test_cursor_state_from_a_cursor_decodes_version_and_event_time() -> None:
    cursor = Cursor(2, "5ea6d3f394c1f5d986e9bd86", "update", 1_732_000_123, 4).encode()
    got = CursorState.from_cursor("0", "host", cursor, saved_at=5.0)
    assert got == CursorState("0", "host", cursor, (1_732_000_123, 4), 1_732_000_123.0, 5.0)


@pytest.mark.parametrize("cursor", ["garbage", NO_EVENT_CURSOR])
def test_cursor_state_from_an_opaque_cursor_has_no_version(cursor: str) -> None:
    got = CursorState.from_cursor("0", "host", cursor)
    assert (got.version, got.event_time) == (None, None)
    assert got.saved_at > 1_700_000_000
