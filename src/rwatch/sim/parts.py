"""What the simulator's request handlers share: its options, and the parts a running simulator holds.

``Simulator`` (server.py) is the one implementation of ``SimParts``; the handlers (gate, inject, lists, admin)
take a ``SimParts`` so that they depend on this module, not on the server that routes to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from rwatch.sim.faults import FaultPlan
from rwatch.sim.load import LoadGenerator
from rwatch.sim.permissions import Permissions
from rwatch.sim.state import SimState
from rwatch.sim.stats import Stats


@dataclass
class SimOptions:
    host: str = "127.0.0.1"
    port: int = 8089  # 0 = pick a free one
    hold: float = 20.0  # long-poll hold in cursor mode (server: ~20 s)
    retention: float = 6 * 3600  # TTL window (code: 6 h)
    error_delay: float = 0.5  # the server sleeps 500 ms before any error reply
    app_code: str | None = None  # None = accept any credentials
    app_secret: str | None = None
    seed: int = 0
    bizs: int = 2
    sets_per_biz: int = 2
    modules_per_set: int = 2
    hosts: int = 20
    load_rate: float = 0.0  # background changes per second, 0 = off
    load_mix: dict[str, float] | None = None  # operation -> weight
    detail_mode: Literal["snapshot", "latest"] = "snapshot"  # per-event snapshot (<=3.13) or latest (3.14+)
    denied_resources: frozenset[str] = field(default_factory=frozenset)  # watching these answers 9900403
    denied_apis: frozenset[str] = field(default_factory=frozenset)  # not granted on the gateway: 403 1640301
    tenant_mode: Literal["single", "multi"] = "single"  # multi: X-Bk-Tenant-Id is checked (§10.2)
    tenant: str = "default"  # the one tenant whose data the simulator holds
    app_tenant: str | None = None  # the calling app's tenant; None = an app valid in every tenant
    gateway_error_rate: float = 0.0  # probability of a gateway fault on any CMDB request, seeded by seed
    hidden_bizs: frozenset[int] = field(default_factory=frozenset)  # the user may not view these (IAM)


class SimParts(Protocol):
    """A running simulator as its handlers see it."""

    options: SimOptions
    state: SimState
    faults: FaultPlan
    load: LoadGenerator
    stats: Stats
    permissions: Permissions
    url: str  # where it listens, once it does
