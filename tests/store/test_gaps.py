"""Gaps of lost history, on both backends: recorded, listed, filled once."""

from __future__ import annotations

import pytest

from rwatch.errors import PermanentError
from rwatch.store.base import CursorStore


async def test_gaps_are_recorded_listed_and_filled(store: CursorStore) -> None:
    first = await store.add_gap("0", "host", 100.5, 200.25, "cursor_expired")
    second = await store.add_gap("0", "biz", 150.0, 150.0, "bootstrap")
    third = await store.add_gap("t2", "host", 1.0, 2.0, "cursor_expired")
    assert first.id < second.id < third.id
    assert (first.tenant, first.resource, first.start, first.end, first.reason, first.filled_at) == (
        "0", "host", 100.5, 200.25, "cursor_expired", None)
    assert first.recorded_at > 1_700_000_000

    assert await store.gaps() == [first, second, third]
    assert await store.gaps("0") == [first, second]
    assert await store.gaps(resource="host") == [first, third]
    assert await store.gaps("0", "host") == [first]

    await store.fill_gap(first.id, 300.0)
    assert await store.gaps() == [second, third]
    everything = await store.gaps(open_only=False)
    assert [g.id for g in everything] == [first.id, second.id, third.id]
    assert everything[0].filled_at == 300.0
    assert everything[0].recorded_at == first.recorded_at


async def test_filling_a_gap_again_keeps_the_first_time(store: CursorStore) -> None:
    gap = await store.add_gap("0", "host", 1.0, 2.0, "cursor_expired")
    await store.fill_gap(gap.id, 10.0)
    await store.fill_gap(gap.id, 20.0)  # a retry after an ambiguous failure is harmless
    (filled,) = await store.gaps(open_only=False)
    assert filled.filled_at == 10.0


async def test_filling_an_unknown_gap_is_a_permanent_error(store: CursorStore) -> None:
    with pytest.raises(PermanentError) as caught:
        await store.fill_gap(424242, 1.0)
    assert caught.value.fields()["gap_id"] == 424242


async def test_a_gap_cannot_end_before_it_starts(store: CursorStore) -> None:
    with pytest.raises(ValueError, match="ends before it starts"):
        await store.add_gap("0", "host", 2.0, 1.0, "cursor_expired")
    assert await store.gaps(open_only=False) == []
