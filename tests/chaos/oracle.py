"""The oracle: what every sink must hold after quiescence, and the counts a Jepsen-style table shows.

- **Equal to CMDB.** The mirror's live rows (read by SQL through the documented schema) and the webhook
  receiver's effective state both equal the simulator's objects, field by field.
- **Lost = 0.** No object missing or stale in any sink, and every change CMDB made (every node of the
  simulator's event chains) reached the webhook receiver, except those inside a gap rwatch recorded (history
  CMDB no longer had: the resync fills its *effect*, which the state comparison checks).
- **Effective duplicates = 0.** In the mirror: an UPDATE that rewrote a row with a version not newer than
  the one it held (the fence let an event take effect again). At the receiver: the same change under a
  second webhook-id (see ``receiver.py``).
- **Versions never go back.** In the mirror: an UPDATE to an older version. At the receiver: a watch event
  first delivered after a newer one of the same object. Both mirror checks are a trigger on
  ``rwatch_objects`` installed before rwatch starts, so every regression is recorded, not only sampled ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rwatch.config import ZabbixSinkConfig
from rwatch.sim.server import Simulator
from rwatch.sinks.mirror import MirrorSink
from rwatch.sinks.zabbix.desired import desired_state
from rwatch.sinks.zabbix.sink import options_of
from rwatch.store.records import Gap
from tests.chaos.receiver import ChaosReceiver
from tests.downstream.instances import Zabbix
from tests.downstream.side import Side
from tests.integration.harness import Setup
from tests.integration.test_apply_e2e import TOPOLOGY, async_url, mirror_rows, truth

_AUDIT_TABLE = ("CREATE TABLE chaos_audit (resource TEXT, key TEXT, old_s BIGINT, old_i BIGINT, new_s BIGINT, "
                "new_i BIGINT, event_id TEXT)")
_AUDIT_ROW = ("INSERT INTO chaos_audit VALUES (NEW.resource, NEW.key, OLD.version_s, OLD.version_i, NEW.version_s, "
              "NEW.version_i, NEW.event_id)")
_NOT_NEWER = "(NEW.version_s, NEW.version_i) <= (OLD.version_s, OLD.version_i)"
# Every deletion of a live row, as it happens (a later event may bring the row back; the end state alone would
# then hide a wrong delete).
_DELETES_TABLE = "CREATE TABLE chaos_deletes (resource TEXT, key TEXT, new_s BIGINT, new_i BIGINT, event_id TEXT)"
_DELETE_ROW = "INSERT INTO chaos_deletes VALUES (NEW.resource, NEW.key, NEW.version_s, NEW.version_i, NEW.event_id)"
_DELETED = "NEW.deleted AND NOT OLD.deleted"
AUDIT_SQL = {
    "sqlite": [
        _AUDIT_TABLE,
        f"CREATE TRIGGER chaos_audit_update AFTER UPDATE ON rwatch_objects WHEN {_NOT_NEWER} BEGIN {_AUDIT_ROW}; END",
        _DELETES_TABLE,
        f"CREATE TRIGGER chaos_audit_delete AFTER UPDATE ON rwatch_objects WHEN {_DELETED} BEGIN {_DELETE_ROW}; END",
    ],
    "postgresql": [
        _AUDIT_TABLE,
        "CREATE FUNCTION chaos_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF {_NOT_NEWER} THEN {_AUDIT_ROW}; END IF; IF {_DELETED} THEN {_DELETE_ROW}; END IF; RETURN NEW; END $$",
        _DELETES_TABLE,
        "CREATE TRIGGER chaos_audit_update AFTER UPDATE ON rwatch_objects FOR EACH ROW "
        "EXECUTE FUNCTION chaos_audit_fn()",
    ],
}


def mirror_url(setup: Setup) -> str:
    return setup.config().sinks["mirror"].url.get_secret_value()  # type: ignore[union-attr]


async def prepare_mirror(setup: Setup) -> AsyncEngine:
    """Create the mirror's schema as rwatch would, add the audit trigger, return an engine to read it."""
    sink = MirrorSink("mirror", setup.config().sinks["mirror"])  # type: ignore[arg-type]
    await sink.open()
    await sink.close()
    engine = create_async_engine(async_url(mirror_url(setup)))
    async with engine.begin() as conn:
        for statement in AUDIT_SQL[engine.dialect.name]:
            await conn.exec_driver_sql(statement)
    return engine


async def mirror_audit(engine: AsyncEngine, ties: set[str]) -> tuple[list[str], list[str]]:
    """(regressions, effective duplicates) the trigger recorded. ``ties``: ids that may rewrite a row of their own
    version (README "Version ties"): a resync's snapshot rows and its marks (a sweep tombstones at the head's
    version what its snapshot did not write)."""
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql(
            "SELECT resource, key, old_s, old_i, new_s, new_i, event_id FROM chaos_audit")).all()
    regressions: list[str] = []
    duplicates: list[str] = []
    for resource, key, old_s, old_i, new_s, new_i, event_id in (tuple(row) for row in rows):
        line = f"mirror {resource} {key}: v[{old_s}, {old_i}] -> v[{new_s}, {new_i}]"
        if (new_s, new_i) < (old_s, old_i):
            regressions.append(line)
        elif event_id not in ties:
            duplicates.append(line)
    return regressions, duplicates


async def wrong_deletes(engine: AsyncEngine, sim: Simulator) -> list[str]:
    """Deletions of a mirror row whose object CMDB still has, in the same incarnation: it was never deleted
    there, so nothing proved the delete. Ids are never reused in CMDB; a host_relation key can come back (a host
    moved back), so for one its current incarnation must be newer than the deletion to excuse it."""
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT resource, key, new_s, new_i, event_id FROM chaos_deletes")).all()
    wrong = []
    for resource, key, new_s, new_i, event_id in (tuple(row) for row in rows):
        if resource not in TOPOLOGY or key not in sim.state.objects_view(resource):
            continue
        if resource == "host_relation":
            created = [(n.sec, n.inc) for n in sim.state.chain(resource) if n.key == key and n.event_type == "create"]
            if not created or created[-1] > (new_s, new_i):
                continue  # recreated after the delete (or its creation is no longer known): not this incarnation
        wrong.append(f"{resource} {key} deleted at v[{new_s}, {new_i}] by {event_id[:12]} while CMDB still has it")
    return wrong


class ZabbixOracle:
    """The round's zabbix sink (on the real Zabbix, under a prefix of its own) and the check that Zabbix's managed
    part equals what the mirror's topology calls for: the third sink of the oracle, a projection of the first."""

    def __init__(self, zabbix: Zabbix, prefix: str) -> None:
        self.prefix = prefix
        self.url = zabbix.url
        settings = ZabbixSinkConfig.model_validate({
            "kind": "zabbix", "url": zabbix.url, "token": "unused", "group_prefix": prefix,
            "technical_name": f"{prefix}-{{bk_host_id}}", "visible_name": f"{{label}} ({prefix}-{{bk_host_id}})",
            "on_delete": "delete"})
        self.options = options_of(settings)
        self.side = Side(zabbix, self.options)
        self.mirror: MirrorSink | None = None

    def sink_toml(self) -> str:
        return f"""
[sinks.zbx]
kind = "zabbix"
source = "mirror"
url = "{self.url}"
username = "Admin"
password = "zabbix"
group_prefix = "{self.prefix}"
technical_name = "{self.prefix}-{{bk_host_id}}"
visible_name = "{{label}} ({self.prefix}-{{bk_host_id}})"
on_delete = "delete"
debounce = "50ms"
"""

    async def open(self, setup: Setup) -> None:
        self.mirror = MirrorSink("zabbix-oracle", setup.config().sinks["mirror"])  # type: ignore[arg-type]
        await self.mirror.open()

    async def close(self) -> None:
        if self.mirror is not None:
            await self.mirror.close()
        self.side.cleanup()

    async def differs(self) -> list[str]:
        """What keeps Zabbix from equalling the mirror's topology now; [] when it does."""
        assert self.mirror is not None
        try:
            rows = await self.mirror.topology()
            facts = await self.mirror.host_facts()
        except Exception as exc:  # SQLite busy under a writer: read again on the next pass
            return [f"mirror not readable: {exc!r}"]
        live = [i for i, f in facts.items() if not f.deleted]
        desired = desired_state(rows, self.options, live, {i: f.os_type for i, f in facts.items()})
        try:
            self.side.assert_equal(desired)
        except (AssertionError, ValueError) as exc:  # ValueError: a host read in the middle of its write
            return [" ".join(str(exc).split())[:600]]
        return []


def divergence(got: dict[str, Any], want: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, stale, extra) keys of a sink against the truth."""
    missing = sorted(set(want) - set(got))
    stale = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    extra = sorted(set(got) - set(want))
    return missing, stale, extra


async def sink_states(engine: AsyncEngine, setup: Setup, sim: Simulator,
                      receiver: ChaosReceiver) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Per "<sink> <resource>" that differs from CMDB: (missing, stale, extra)."""
    out = {}
    for resource in TOPOLOGY:
        want = truth(setup, sim, resource)
        try:
            rows = await mirror_rows(engine, resource)
        except DBAPIError:  # SQLite busy under a writer: read again on the next pass
            rows = {}
        for sink, got in (("mirror", rows), ("hook", receiver.live(resource))):
            missing, stale, extra = divergence(got, want)
            if missing or stale or extra:
                out[f"{sink} {resource}"] = (missing, stale, extra)
    return out


def describe(states: dict[str, tuple[list[str], list[str], list[str]]]) -> list[str]:
    return [f"{name}: missing {m[:5]} ({len(m)}), stale {s[:5]} ({len(s)}), extra {e[:5]} ({len(e)})"
            for name, (m, s, e) in states.items()]


def lost_changes(sim: Simulator, receiver: ChaosReceiver, gaps: list[Gap]) -> tuple[list[str], int]:
    """Chain events never delivered to the receiver outside a recorded gap; and how many a gap covered."""
    lost, in_gaps = [], 0
    for resource in TOPOLOGY:
        spans = [(g.start, g.end) for g in gaps if g.resource == resource]
        for node in sim.state.chain(resource):
            if (resource, node.cursor) in receiver.cursors:
                continue
            if any(start <= node.sec <= end for start, end in spans):
                in_gaps += 1
                continue
            lost.append(f"{resource} {node.key} {node.event_type} v[{node.sec}, {node.inc}]")
    return lost, in_gaps


@dataclass
class RoundResult:
    seed: int
    topology: str
    faults: list[str]
    events: int = 0  # changes CMDB made in the round (chain events of the five resources)
    deliveries: int = 0  # webhook requests the receiver accepted
    raw_duplicates: int = 0
    effective_duplicates: int = 0
    lost: int = 0
    regressions: int = 0
    gaps: int = 0
    in_gaps: int = 0  # changes CMDB no longer had when rwatch came back: their effect comes by resync
    converge_s: float | None = None
    rss_max_mib: int = 0  # the largest resident set of any rwatch process in the round
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "FAIL"


HEADER = ("seed", "topology", "faults applied", "events", "deliv", "raw dup", "eff dup", "lost", "regress", "gaps",
          "converge", "round", "verdict")


def table(results: list[RoundResult]) -> str:
    rows = [HEADER] + [(
        str(r.seed), r.topology, ", ".join(r.faults), str(r.events), str(r.deliveries), str(r.raw_duplicates),
        str(r.effective_duplicates), str(r.lost), str(r.regressions), str(r.gaps),
        "-" if r.converge_s is None else f"{r.converge_s:.1f}s", f"{r.seconds:.1f}s", r.verdict,
    ) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
