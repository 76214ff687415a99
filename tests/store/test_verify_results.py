"""Verify results, on both backends: the last one per (tenant, sink, resource)."""

from __future__ import annotations

from rwatch.store.base import CursorStore
from rwatch.store.records import VerifyResult


async def test_verify_results_keep_the_last_per_sink_and_resource(store: CursorStore) -> None:
    assert await store.verify_results() == []
    await store.record_verify([VerifyResult("0", "mirror", "host", 1, 2, 3, 100.0),
                               VerifyResult("0", "mirror", "biz", 0, 0, 0, 100.0),
                               VerifyResult("7", "mirror", "host", 0, 0, 1, 100.0)])
    await store.record_verify([VerifyResult("0", "mirror", "host", 0, 0, 0, 200.0)])  # the next run
    await store.record_verify([])
    got = await store.verify_results("0")
    assert [(r.resource, r.drift, r.checked_at) for r in got] == [("biz", 0, 100.0), ("host", 0, 200.0)]
    assert [(r.tenant, r.changed) for r in await store.verify_results("7")] == [("7", 1)]
