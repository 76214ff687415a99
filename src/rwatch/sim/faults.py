"""Fault injection: a script of faults consumed by the next requests, plus seeded random faults.

Request faults (consumed by watch requests unless ``scope`` says otherwise):
``http_500``/``http_502``/``http_503`` (an HTML error page, as a load balancer or a crashed backend sends),
``http_429`` (the gateway's rate limit, 1642903), ``gateway`` (one of the gateway's transient errors, or on
ESB paths also ESB's 1306201: ``code`` picks one, else each request draws one),
``code`` (``result: false`` with any CMDB ``code``), ``slow`` (sleep ``delay`` seconds, then answer
normally), ``malformed`` (HTTP 200, body not JSON), ``truncated`` (HTTP 200, JSON cut in half), ``drop``
(connection closed without a response), ``expire_cursors`` (cursor mode only: 1103007 for any cursor
that is not the resource's newest), ``detail_missing`` (from-now / start_from only: 1103008).

Malformed successful watch replies (watch requests only): ``empty_events`` (``bk_events: []``),
``missing_events`` (no ``bk_events`` key), ``events_not_list`` (``bk_events`` an object), and
``unwatched_with_events`` (the real answer's events under ``bk_watched: false``; used up only by an answer that
has events, so it waits for one). None of them is anything a real server sends (cmdb-watch-api §3.2, §3.3).

Misbehaving list APIs (list requests only; ``api`` narrows one to a single list API): ``empty_page`` (the real
page with an empty ``info``, ``count`` kept), ``truncated_page`` (the real page less its second half, at least
one object, ``count`` kept), ``ignore_keyset`` (the keyset rule of the request's condition or filter, ``$gt`` /
``greater`` on a field, is dropped, so the first page comes again, as ESB's ``search_set`` does with a
``filter``). Each is used up only by a request it changes: a page that is already empty, or a request without a
keyset rule, is answered normally and leaves the fault in place.

Event faults (applied to the state when scheduled, not consumed by requests): ``drop_event`` (the next
``count`` changes, or each change with ``probability``, produce no event while the object still changes:
the server's silent loss) and ``collapse`` (the next ``count`` repeats of an (object, op) reuse the previous
event's cluster time, so the chain keeps only the last of the two, §5.2).

Random faults draw per request, from one seeded generator: the ``random`` rates for requests in their
``scope``, then ``gateway_error_rate`` for every CMDB request (a deployment whose gateway flakes).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from rwatch.cmdb.protocol import (
    CODE_TOO_MANY_REQUESTS,
    ESB_BACKEND_FAILED,
    GW_BAD_GATEWAY,
    GW_RATE_LIMITED,
    GW_TIMEOUT,
    GW_UNAVAILABLE,
    RESOURCE_TYPES,
)
from rwatch.sim.chain import EventFaults

REQUEST_KINDS: Final = frozenset(
    {
        "http_500",
        "http_502",
        "http_503",
        "http_429",
        "gateway",
        "code",
        "slow",
        "malformed",
        "truncated",
        "drop",
        "expire_cursors",
        "detail_missing",
        "empty_events",
        "missing_events",
        "events_not_list",
        "unwatched_with_events",
        "empty_page",
        "truncated_page",
        "ignore_keyset",
    }
)
# Kinds that answer a successful watch reply that breaks the protocol; watch requests only.
WATCH_REPLY_KINDS: Final = frozenset({"empty_events", "missing_events", "events_not_list", "unwatched_with_events"})
# Kinds that bend a list API's real answer; list requests only.
LIST_REPLY_KINDS: Final = frozenset({"empty_page", "truncated_page", "ignore_keyset"})
# Kinds that need the real answer first, and are used up only by an answer they change (``FaultPlan.give_back``).
CONDITIONAL_KINDS: Final = frozenset({"unwatched_with_events", *LIST_REPLY_KINDS})
MODES: Final = frozenset({"cursor", "start_from", "now"})
# The list APIs the simulator serves, with the resource each lists (a fault's ``resource`` matches it); None
# for the APIs that list no one resource.
LIST_API_RESOURCES: Final[dict[str, str | None]] = {
    "search_business": "biz",
    "list_business_set": "biz_set",
    "list_business_in_business_set": "biz",
    "search_set": "set",
    "search_module": "module",
    "search_biz_inst_topo": None,
    "list_biz_hosts": "host",
    "list_biz_hosts_topo": "host",
    "find_host_topo_relation": "host_relation",
    "find_host_biz_relations": "host_relation",
    "list_hosts_without_biz": "host",
    "search_cloud_area": "plat",
    "search_object_instances": "object_instance",
    "list_project": "project",
}
EVENT_KINDS: Final = frozenset({"drop_event", "collapse"})
SCOPES: Final = frozenset({"watch", "list", "any"})
# The gateway's transient errors (apisix errorx) a ``gateway`` fault answers; ESB adds its own 1306201.
GATEWAY_CODES: Final[tuple[int, ...]] = (
    *GW_RATE_LIMITED,
    GW_BAD_GATEWAY.start,
    GW_BAD_GATEWAY.start + 1,
    GW_UNAVAILABLE.start,
    GW_TIMEOUT,
)
ESB_CODES: Final[tuple[int, ...]] = (*GATEWAY_CODES, ESB_BACKEND_FAILED)


@dataclass
class Fault:
    kind: str
    count: int = 1  # how many requests it hits before it is used up
    resource: str | None = None  # None = any resource (a list API counts for the resource it lists)
    scope: str = "watch"  # watch | list | any (the list-only kinds default to list)
    code: int | None = None  # kind=code: the CMDB code (default 1199997); kind=gateway: which error (default: drawn)
    message: str | None = None  # for kind=code; default: the server's text for the code
    delay: float = 1.0  # for kind=slow
    api: str | None = None  # list requests of this list API only (a name in LIST_API_RESOURCES)
    mode: str | None = None  # watch requests in this start mode only: cursor | start_from | now
    scripted: bool = field(default=True, repr=False)  # False for a random fault (nothing to give back)

    @classmethod
    def from_json(cls, raw: Any) -> Fault:
        if not isinstance(raw, dict):
            raise ValueError("a fault must be an object")
        unknown = set(raw) - {"kind", "count", "resource", "scope", "code", "message", "delay", "api", "mode"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        if raw.get("kind") in LIST_REPLY_KINDS and "scope" not in raw:
            raw = {**raw, "scope": "list"}
        fault = cls(**raw)
        if fault.kind not in REQUEST_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        if fault.scope not in SCOPES:
            raise ValueError(f"fault scope must be one of {sorted(SCOPES)}")
        if fault.kind in LIST_REPLY_KINDS and fault.scope == "watch":
            raise ValueError(f"a {fault.kind} fault bends list replies: its scope is list (or any)")
        if fault.kind in WATCH_REPLY_KINDS and fault.scope == "list":
            raise ValueError(f"a {fault.kind} fault bends watch replies: its scope is watch (or any)")
        if fault.api is not None and (fault.api not in LIST_API_RESOURCES or fault.scope == "watch"):
            raise ValueError(f"fault api must name a list API ({', '.join(LIST_API_RESOURCES)}) with scope list "
                             "or any")
        if fault.mode is not None and fault.mode not in MODES:
            raise ValueError(f"fault mode must be one of {sorted(MODES)}")
        if fault.resource is not None and fault.resource not in RESOURCE_TYPES:
            raise ValueError(f"unknown resource {fault.resource!r}")
        if not isinstance(fault.count, int) or fault.count < 1:
            raise ValueError("fault count must be a positive integer")
        code_ok = fault.code is None or (isinstance(fault.code, int) and not isinstance(fault.code, bool))
        if not code_ok or not isinstance(fault.delay, int | float) or fault.delay < 0:
            raise ValueError("fault code must be an integer and delay a non-negative number")
        if fault.kind == "gateway" and fault.code is not None and fault.code not in ESB_CODES:
            raise ValueError(f"a gateway fault's code must be one of {list(ESB_CODES)}")
        return fault

    def applies(
        self, api: str, resource: str | None, mode: str | None, newest: bool = False, list_api: str | None = None
    ) -> bool:
        if self.scope != "any" and self.scope != api:
            return False
        if self.resource is not None and self.resource != resource:
            return False
        if self.api is not None and self.api != list_api:
            return False
        if self.mode is not None and self.mode != mode:
            return False
        if self.kind == "expire_cursors":  # the newest cursor never expires (watch token)
            return api == "watch" and mode == "cursor" and not newest
        if self.kind == "detail_missing":
            return api == "watch" and mode in ("now", "start_from")
        if self.kind in WATCH_REPLY_KINDS:
            return api == "watch"
        if self.kind in LIST_REPLY_KINDS:
            return api == "list"
        return True


class FaultPlan:
    """Decides, per request, which fault (if any) the simulator injects."""

    def __init__(
        self, seed: int = 0, event_faults: EventFaults | None = None, gateway_error_rate: float = 0.0
    ) -> None:
        self.script: list[Fault] = []
        self.rates: dict[str, float] = {}  # kind -> probability per request in random_fault.scope
        self.random_fault = Fault("code")  # template for random faults (scope, code, delay)
        self.gateway_error_rate = _rate("gateway_error_rate", gateway_error_rate)
        self.rng = random.Random(seed)
        self.event_faults = event_faults or EventFaults()
        self.fired: Counter[str] = Counter()

    def schedule(self, spec: Any) -> None:
        """Add faults: a fault object, a list of them, or ``{"script": [...], "random": {...},
        "gateway_error_rate": F}``."""
        if isinstance(spec, list):
            for item in spec:
                self.schedule(item)
            return
        if not isinstance(spec, dict):
            raise ValueError("faults must be an object or a list")
        if "kind" not in spec:
            self.schedule(spec.get("script", []))
            if "random" in spec:
                self._set_random(spec["random"])
            if "gateway_error_rate" in spec:
                self.gateway_error_rate = _rate("gateway_error_rate", spec["gateway_error_rate"])
            return
        if spec["kind"] in EVENT_KINDS:
            self._event_fault(spec)
            return
        self.script.append(Fault.from_json(spec))

    def _set_random(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ValueError("random must be an object")
        rates = raw.get("rates", {})
        for kind, rate in rates.items():
            if kind not in REQUEST_KINDS:
                raise ValueError(f"bad random fault rate {kind}={rate}")
            _rate(f"random rate of {kind}", rate)
        scope = raw.get("scope", "watch")
        if scope not in SCOPES:
            raise ValueError(f"random scope must be one of {sorted(SCOPES)}")
        self.rates = {k: float(v) for k, v in rates.items()}
        if "seed" in raw:
            self.rng.seed(raw["seed"])
        self.random_fault = Fault(
            "code",
            scope=scope,
            code=int(raw.get("code", CODE_TOO_MANY_REQUESTS)),
            delay=float(raw.get("delay", 1.0)),
        )

    def gateway_code(self, fault: Fault, esb: bool) -> int:
        """The error a ``gateway`` fault answers: its ``code``, else one drawn (ESB's own 1306201 on ESB only)."""
        if fault.code is not None:
            return fault.code
        return self.rng.choice(ESB_CODES if esb else GATEWAY_CODES)

    def _event_fault(self, spec: dict[str, Any]) -> None:
        resource = spec.get("resource")
        if resource is not None and resource not in RESOURCE_TYPES:
            raise ValueError(f"unknown resource {resource!r}")
        ef = self.event_faults
        if spec["kind"] == "drop_event":
            ef.drop_resource = resource
            ef.drop_next = int(spec.get("count", 0 if "probability" in spec else 1))
            ef.drop_probability = float(spec.get("probability", 0.0))
        else:
            ef.collapse_resource = resource
            ef.collapse_next = int(spec.get("count", 1))

    def take(
        self,
        api: str,
        resource: str | None,
        mode: str | None = None,
        newest: bool = False,
        list_api: str | None = None,
    ) -> Fault | None:
        """The fault for this request, consuming one use of a scripted fault; None for a normal answer.

        ``newest``: the request's cursor is the resource's newest (``expire_cursors`` spares it). ``list_api``:
        the list API called (list requests).
        """
        for i, fault in enumerate(self.script):
            if fault.applies(api, resource, mode, newest, list_api):
                fault.count -= 1
                if fault.count <= 0:
                    del self.script[i]
                self.fired[fault.kind] += 1
                return fault
        template = self.random_fault
        for kind, rate in self.rates.items():
            code = template.code if kind == "code" else None
            candidate = Fault(kind, scope=template.scope, code=code, delay=template.delay, scripted=False)
            if candidate.applies(api, resource, mode, newest, list_api) and self.rng.random() < rate:
                self.fired[kind] += 1
                return candidate
        if self.gateway_error_rate and self.rng.random() < self.gateway_error_rate:
            self.fired["gateway"] += 1
            return Fault("gateway", scope="any", scripted=False)
        return None

    def give_back(self, fault: Fault) -> None:
        """Undo ``take`` for a fault that did not change the answer (a conditional kind whose condition the
        request did not meet): it stays first in line for the next request it applies to."""
        self.fired[fault.kind] -= 1
        if self.fired[fault.kind] <= 0:
            del self.fired[fault.kind]
        if not fault.scripted:
            return
        if any(f is fault for f in self.script):
            fault.count += 1
        else:
            fault.count = 1
            self.script.insert(0, fault)

    def clear(self) -> None:
        self.script.clear()
        self.rates.clear()
        self.gateway_error_rate = 0.0
        self.event_faults.clear()

    def to_json(self) -> dict[str, Any]:
        ef = self.event_faults
        return {
            "script": [{k: v for k, v in asdict(f).items() if k != "scripted"} for f in self.script],
            "rates": dict(self.rates),
            "random_scope": self.random_fault.scope,
            "gateway_error_rate": self.gateway_error_rate,
            "events": {
                "drop_next": ef.drop_next,
                "drop_probability": ef.drop_probability,
                "drop_resource": ef.drop_resource,
                "collapse_next": ef.collapse_next,
                "collapse_resource": ef.collapse_resource,
            },
            "fired": dict(self.fired),
        }


def _rate(name: str, value: Any) -> float:
    """A probability; ValueError for anything else."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between 0 and 1") from None
    if not 0 <= rate <= 1:
        raise ValueError(f"{name} must be a number between 0 and 1")
    return rate
