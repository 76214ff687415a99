"""The chaos suite's round results, printed as one Jepsen-style table at the end of the session."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.chaos.nemesis import KINDS
from tests.chaos.oracle import RoundResult, table
from tests.downstream.conftest import zabbix  # noqa: F401  (the real Zabbix: the oracle's third sink)

RESULTS: list[RoundResult] = []
_STARTED: list[float] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    _STARTED.append(time.monotonic())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    results = sorted(RESULTS, key=lambda r: r.seed)
    terminalreporter.section("chaos rounds")
    for line in table(results).splitlines():
        write(line)
    failed = [r for r in results if not r.ok]
    kinds = {f.split("(")[0] for r in results for f in r.faults}
    attacked = sorted({i for k in kinds for i in KINDS.get(k, ())})
    total = sum(r.seconds for r in results)
    write("")
    write(f"rounds {len(results)}, failed {len(failed)}, rounds' time {total:.0f}s "
          f"(mean {total / len(results):.1f}s); events {sum(r.events for r in results)}, "
          f"raw duplicates {sum(r.raw_duplicates for r in results)}, effective duplicates "
          f"{sum(r.effective_duplicates for r in results)}, lost {sum(r.lost for r in results)}, regressions "
          f"{sum(r.regressions for r in results)}")
    write(f"fault kinds applied: {len(kinds)}/{len(KINDS)}; invariants attacked: {attacked}; "
          f"largest rwatch RSS {max(r.rss_max_mib for r in results)} MiB; slowest convergence "
          f"{max((r.converge_s for r in results if r.converge_s is not None), default=0):.1f}s")
    for r in failed:
        write(f"FAILED seed {r.seed}: reproduce with  RWATCH_CHAOS_SEED={r.seed} python -m pytest tests/chaos -q")
