"""bench/resync.py at a tiny scale: rwatch's resync sends exactly the fewest list requests the page limits
allow, and the mirror it fills equals the simulator."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


# Keyset paging stops once a page holds all that ``count`` said remained, so a page that is exactly full
# (1000 hosts = two pages of 500) needs no empty page after it: the minimum is ceil(n / limit) either way.
@pytest.mark.parametrize("hosts", [600, 1000])
async def test_resync_bench_at_tiny_scale(hosts: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("resync")
    args = argparse.Namespace(hosts=hosts, bizs=2, sets_per_biz=5, modules=20, bus="memory", mirror="sqlite",
                              rounds=1, rate_limited=False, out=tmp_path / "resync.json")
    result = await bench.main(args)

    rows = result["resources"]
    assert rows["host"]["minimum"] == {"search_business": 1, "list_hosts_without_biz": -(-hosts // 500)}
    assert rows["host_relation"]["minimum"] == {"search_business": 1, "list_hosts_without_biz": -(-hosts // 500),
                                                "find_host_biz_relations": -(-hosts // 500)}
    assert rows["module"]["minimum"] == {"search_business": 1, "search_module": 2}
    for name, row in rows.items():
        assert row["requests"] == row["minimum"], name
    assert [rows[r]["listed"] for r in ("biz", "set", "module", "host", "host_relation")] == [2, 10, 20, hosts, hosts]
    assert result["same_requests"]
    assert [c["ok"] for c in result["checks"]] == [True]
    assert result["checks"][0]["mirrored"] == hosts
    assert "mirror check" in bench.report(result)
