"""The doctor's report: one verdict, detail and fix per check, and whether rwatch can run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Verdict = Literal["ok", "warn", "fail", "skip"]


@dataclass(slots=True)
class Check:
    check: str  # reach, channel, credentials, tenant, clock, watch, list, businesses
    subject: str
    verdict: Verdict
    detail: str
    fix: str = ""
    code: int | None = None


@dataclass(slots=True)
class Report:
    cmdb: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """rwatch can run: nothing failed (warnings are for the operator to weigh)."""
        return all(c.verdict != "fail" for c in self.checks)

    def add(self, check: str, subject: str, verdict: Verdict, detail: str, fix: str = "",
            code: int | None = None) -> None:
        self.checks.append(Check(check, subject, verdict, detail, fix, code))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "cmdb": self.cmdb, "checks": [asdict(c) for c in self.checks]}
