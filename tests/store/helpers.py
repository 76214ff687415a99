"""Shared by the store's tests: a cursor position to save, a fixed wall-clock time."""

from __future__ import annotations

from rwatch.store.records import CursorState


def state(tenant: str = "0", resource: str = "host", n: int = 1) -> CursorState:
    version = (1_732_000_000 + n, n % 7)
    return CursorState(tenant, resource, f"cursor-{n}", version, float(version[0]), 1_732_600_000.5)


T0 = 1_732_600_000.0
