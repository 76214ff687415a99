"""Business sightings, on both backends: the newest per business and tenant."""

from __future__ import annotations

from rwatch.store.base import CursorStore
from rwatch.store.records import BizSighting


async def test_business_sightings_keep_the_newest_per_business(store: CursorStore) -> None:
    """The record a resync compares its business listing with: version-fenced, per tenant."""
    await store.note_businesses("0", [BizSighting(7, True, (100, 1), False), BizSighting(8, True, (100, 2), True)])
    await store.note_businesses("0", [BizSighting(7, False, (105, 1), False)])  # deleted later
    await store.note_businesses("0", [BizSighting(7, True, (101, 0), False)])  # an older listing: no effect
    await store.note_businesses("t2", [BizSighting(7, True, (90, 0), False)])
    # Two sightings of one business in one call: the newest is kept, whatever their order.
    await store.note_businesses("0", [BizSighting(9, False, (120, 0), False), BizSighting(9, True, (110, 0), False)])
    assert await store.businesses("0") == [BizSighting(7, False, (105, 1), False),
                                           BizSighting(8, True, (100, 2), True),
                                           BizSighting(9, False, (120, 0), False)]
    assert await store.businesses("t2") == [BizSighting(7, True, (90, 0), False)]
