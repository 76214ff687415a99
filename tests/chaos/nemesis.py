"""The nemesis: a seeded schedule of faults, drawn from a catalogue that attacks every DESIGN.md invariant.

``make_plan(seed)`` decides everything that can be decided up front (topology, workload rate, which faults
in which order, their targets, durations and fail point counts); ``Nemesis.apply`` performs one step while
the workload runs. What a step cannot decide in advance (whether a fail point was reached in time) it
records in the step's ``outcome``, shown in the round's table.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import aio_pika

from rwatch.cmdb.protocol import NO_EVENT_CURSOR
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from tests.chaos.cluster import SHUTDOWN_TIMEOUT, TERM_SLACK, Cluster, Proc
from tests.chaos.proxy import Proxy
from tests.chaos.receiver import ChaosReceiver
from tests.entrypoint import RWATCH
from tests.integration.harness import Setup, close_connections, rabbitmqctl
from tests.integration.test_apply_e2e import TOPOLOGY

RETENTION: Final = 3 * 3600  # the simulator's and rwatch's [watch] retention
PREFETCH: Final = 32
LEASE_TTL: Final = 3.0

# kind -> the DESIGN.md invariants it attacks (1 no loss, 2 no double effect, 3 per-object order, 4 cursor
# loss handled, 5 bounded memory, 6 clean stop). tests/chaos/README.md has the same table in prose.
KINDS: Final[dict[str, tuple[int, ...]]] = {
    "kill": (1, 2, 3),  # SIGKILL of a random rwatch process at a random moment
    "fp_after_confirm": (1, 3),  # SIGKILL at bus.after_confirm: published, confirms still in flight
    "fp_after_publish": (1, 2),  # SIGKILL at watch.after_publish: confirmed, cursor not saved
    "fp_after_apply": (2, 3),  # SIGKILL at consume.after_apply: a sink applied a batch, not acked
    "term": (6,),  # SIGTERM at a random moment: exit 0 within shutdown_timeout
    "fp_term": (6, 2),  # SIGTERM at a fail point (mid-batch in a sink, or between confirm and save)
    "term_stalled": (6, 1),  # SIGTERM to the lease holder while the broker confirms nothing (proxy stalled)
    "amqp_close": (1, 3),  # the round's broker connections closed by the broker (rabbitmqctl)
    "amqp_reset": (1,),  # TCP proxy before RabbitMQ: every connection reset
    "amqp_stall": (1, 5),  # ... forwards nothing for a while
    "amqp_delay": (5,),  # ... delays every chunk
    "cmdb_reset": (4,),  # TCP proxy before the simulator: reset
    "cmdb_stall": (4,),  # ... stall
    "cmdb_delay": (4,),  # ... delay
    "cmdb_errors": (4,),  # 5xx, 429, malformed, truncated, dropped connections: keep the cursor, back off
    "expire_cursors": (4, 2),  # 1103007 for every cursor but the newest: resume by time, replay absorbed
    "clock_jump": (4, 1),  # watchers down, CMDB's clock jumps past retention: gap, resync (SIGKILL mid-resync)
    "hook_stall": (5,),  # the webhook receiver stops answering: unacked <= prefetch, RSS bounded
    "pause": (1, 3),  # SIGSTOP a process past the HA lease: the other replica takes over; SIGCONT
    "cmdb_bad_reply": (4, 1),  # a successful reply that cannot be true (empty bk_events...): same position, no loss
    "list_truncated": (1,),  # rwatch resync against a listing cut short: published, never swept, nothing deleted
    "poison": (1, 3),  # the receiver answers 500 to one payload for ever: isolated, dead-lettered, replayed
}
TOPOLOGIES: Final = ("all", "split", "ha")  # by seed % 3: --role all; watcher + consumer; 2 watchers on PG
CMDB_ERRORS: Final = ("http_500", "http_502", "http_503", "http_429", "malformed", "truncated", "drop")
BAD_REPLIES: Final = ("empty_events", "missing_events", "events_not_list", "unwatched_with_events")
# Listings that look answered but are short: a resync must prove itself complete before it deletes anything.
SHORT_LISTINGS: Final = ("truncated_page", "empty_page")


@dataclass
class Step:
    kind: str
    wait: float  # pause before the step (the workload keeps running)
    duration: float
    pick: int  # which process, modulo the candidates
    n: int  # fail point hit, fault count
    outcome: str = ""

    def label(self) -> str:
        return f"{self.kind}({self.outcome})" if self.outcome else self.kind


@dataclass
class Plan:
    seed: int
    topology: str
    rate: float
    steps: list[Step]

    @property
    def roles(self) -> list[tuple[str, str]]:
        if self.topology == "all":
            return [("all", "all")]
        if self.topology == "split":
            return [("watcher", "watcher"), ("consumer", "consumer")]
        return [("watcher-a", "watcher"), ("watcher-b", "watcher"), ("consumer", "consumer")]


def topology_of(seed: int) -> str:
    return TOPOLOGIES[seed % len(TOPOLOGIES)]


def make_plan(seed: int) -> Plan:
    """The round's whole schedule from its seed. Round ``seed`` always features kind number ``seed - 1``
    (cycling), so any 22 consecutive seeds cover the catalogue; 2 or 3 more kinds are drawn at random."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    featured = kinds[(seed - 1) % len(kinds)]
    # At most one clock jump a round (each one resyncs every resource), but in about a third of the rounds:
    # the gap path has the most moving parts.
    others = [k for k in kinds if k not in (featured, "clock_jump")]
    chosen = [featured, *rng.sample(others, rng.randint(2, 3))]
    if featured != "clock_jump" and rng.random() < 0.3:
        chosen.append("clock_jump")
    rng.shuffle(chosen)
    steps = [Step(kind, wait=round(rng.uniform(0.3, 1.2), 2), duration=round(rng.uniform(1.0, 2.5), 2),
                  pick=rng.randrange(1000), n=rng.randint(1, 6)) for kind in chosen]
    return Plan(seed, topology_of(seed), rate=float(rng.choice((60, 90, 120))), steps=steps)


@dataclass
class World:
    """Everything a step can act on, and where it reports."""

    sim: Simulator
    cluster: Cluster
    amqp: Proxy
    cmdb: Proxy
    receiver: ChaosReceiver
    setup: Setup
    problems: list[str] = field(default_factory=list)
    rss_limit_kb: int = 0
    queue_max: dict[str, tuple[int, int]] = field(default_factory=dict)  # queue -> max (ready, unacked) seen


async def queue_stats(prefix: str) -> dict[str, tuple[int, int]]:
    """(ready, unacknowledged) of every queue whose name starts with ``prefix``, read from the broker."""
    out = await rabbitmqctl("-q", "list_queues", "name", "messages_ready", "messages_unacknowledged")
    stats = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].startswith(prefix) and parts[1].isdigit():
            stats[parts[0]] = (int(parts[1]), int(parts[2]))
    return stats


async def ready_counts(setup: Setup) -> dict[str, int]:
    """Messages ready in every queue of the round (the sinks' and the dead-letter ones), read exactly: a passive
    declare asks the queue itself, where ``rabbitmqctl list_queues`` shows metrics a few seconds old."""
    names = [setup.queue(r, sink) for sink in ("mirror", "hook") for r in TOPOLOGY]
    names += [f"{setup.prefix}.{sink}.dead" for sink in ("mirror", "hook")]
    counts = {}
    async with await aio_pika.connect(setup.amqp_url) as conn:
        channel = await conn.channel()
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            counts[name] = int(queue.declaration_result.message_count or 0)
    return counts


class Nemesis:
    def __init__(self, world: World) -> None:
        self.w = world
        self.handlers: dict[str, Callable[[Step], Awaitable[None]]] = {
            kind: getattr(self, f"_{kind}") for kind in KINDS}

    async def apply(self, step: Step) -> None:
        await asyncio.sleep(step.wait)
        await self.handlers[step.kind](step)

    def _pick(self, step: Step, procs: list[Proc]) -> Proc:
        return procs[step.pick % len(procs)]

    # --- processes ------------------------------------------------------------------------------------------

    async def _kill(self, step: Step) -> None:
        proc = self._pick(step, self.w.cluster.procs)
        await self.w.cluster.running(proc)
        self.w.cluster.kill(proc)
        await self.w.cluster.exited(proc, 5)
        step.outcome = proc.name

    async def _term(self, step: Step) -> None:
        proc = self._pick(step, self.w.cluster.procs)
        await self.w.cluster.ready(proc)
        self.w.cluster.term(proc)
        await self.w.cluster.exited(proc, SHUTDOWN_TIMEOUT + TERM_SLACK + 1)
        step.outcome = proc.name

    async def _failpoint(self, step: Step, procs: list[Proc], spec: str) -> None:
        """Kill the process now (a random moment), bring it back armed, and wait for the point to fire.

        A watcher fail point fires only in a process that holds leases: the other watcher replicas are killed
        too (a leader's death at a random moment) and held down until it fired, so the armed one takes over.
        """
        proc = self._pick(step, procs)
        cluster = self.w.cluster
        others = [p for p in cluster.watchers if p is not proc] if proc in cluster.watchers else []
        await cluster.running(proc)
        proc.armed = spec
        for victim in [proc, *others]:
            victim.down = victim is not proc
            cluster.kill(victim)
        for victim in [proc, *others]:
            await cluster.exited(victim, 5)
        try:
            await cluster.running(proc)
            fired = await self._fired(proc, 4.0 + step.duration + (LEASE_TTL if others else 0.0))
            if fired and "=term" in spec:
                await cluster.exited(proc, SHUTDOWN_TIMEOUT + TERM_SLACK + 1)
        finally:
            for other in others:
                other.down = False
        step.outcome = f"{proc.name} {spec.split('=')[1]}{'' if fired else ' not reached'}"

    async def _fired(self, proc: Proc, timeout: float) -> bool:
        """The armed point fired: the process died of it, or (term) started its clean stop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.started.is_set() or self.w.cluster.logged(proc, "shutdown_requested"):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _fp_after_confirm(self, step: Step) -> None:
        await self._failpoint(step, self.w.cluster.watchers, f"bus.after_confirm=kill@{step.n * 7}")

    async def _fp_after_publish(self, step: Step) -> None:
        await self._failpoint(step, self.w.cluster.watchers, f"watch.after_publish=kill@{step.n}")

    async def _fp_after_apply(self, step: Step) -> None:
        await self._failpoint(step, self.w.cluster.consumers, f"consume.after_apply=kill@{step.n}")

    async def _fp_term(self, step: Step) -> None:
        if step.pick % 2:
            await self._failpoint(step, self.w.cluster.consumers, f"consume.after_apply=term@{step.n}")
        else:
            await self._failpoint(step, self.w.cluster.watchers, f"watch.after_publish=term@{step.n}")

    async def _term_stalled(self, step: Step) -> None:
        """SIGTERM to a watcher holding leases while the proxy before RabbitMQ forwards nothing: the batch in
        hand cannot be confirmed. Its cursor is not saved, so abandoning it loses nothing; the stop must still end
        in exit 0 within ``shutdown_timeout`` (DESIGN.md invariant 6)."""
        cluster = self.w.cluster
        proc = await self._holder(step)
        await cluster.ready(proc)
        self.w.amqp.stall()
        try:
            await asyncio.sleep(0.5)  # the workload keeps the watcher publishing: confirms now wait
            cluster.term(proc)
            await cluster.exited(proc, SHUTDOWN_TIMEOUT + TERM_SLACK + 1)
        finally:
            self.w.amqp.heal()
        step.outcome = proc.name

    async def _holder(self, step: Step) -> Proc:
        """The watcher process holding the most leases (HA: the leader), once one holds any (at most 10 s);
        else the seeded pick."""
        watchers = self.w.cluster.watchers
        store = open_store(self.w.setup.store_url)
        await store.open()
        try:
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                now = time.time()
                pids = [int(lease.owner.split(":")[1]) for lease in await store.leases("0") if lease.expires_at > now]
                held = sorted(watchers, key=lambda p: -sum(pid == p.pid for pid in pids))
                if held and held[0].pid in pids:
                    return held[0]
                await asyncio.sleep(0.2)
        finally:
            await store.close()
        return self._pick(step, watchers)

    async def _pause(self, step: Step) -> None:
        """SIGSTOP, then SIGCONT: a watcher stays stopped past its lease (a GC pause, a frozen VM)."""
        proc = self._pick(step, self.w.cluster.procs)
        if proc.role != "consumer":
            proc = await self._holder(step)  # pausing a standby would test nothing
        await self.w.cluster.ready(proc)
        offset = proc.daemon.log.stat().st_size
        self.w.cluster.pause(proc)
        await asyncio.sleep(LEASE_TTL + 1.0 if proc.role != "consumer" else step.duration)
        self.w.cluster.resume(proc)
        step.outcome = proc.name
        if proc.role != "consumer":
            await asyncio.sleep(0.5)
            lost = proc.daemon.log.read_bytes()[offset:].count(b'"event":"lease_lost"')
            step.outcome += f" {lost} leases lost"

    # --- the broker -----------------------------------------------------------------------------------------

    async def _amqp_close(self, step: Step) -> None:
        exchange = f"exchange={self.w.setup.exchange}"
        closed = await close_connections(lambda name: name.endswith(exchange) or f"{exchange} " in name)
        step.outcome = f"{closed} conns"

    async def _amqp_reset(self, step: Step) -> None:
        step.outcome = f"{self.w.amqp.reset()} conns"

    async def _amqp_stall(self, step: Step) -> None:
        await self._stall(self.w.amqp, step)

    async def _amqp_delay(self, step: Step) -> None:
        await self._delay(self.w.amqp, step)

    async def _stall(self, proxy: Proxy, step: Step) -> None:
        proxy.stall()
        await asyncio.sleep(step.duration)
        proxy.heal()
        step.outcome = f"{step.duration}s"

    async def _delay(self, proxy: Proxy, step: Step) -> None:
        proxy.delay = 0.01 * step.n
        await asyncio.sleep(step.duration * 2)
        proxy.heal()
        step.outcome = f"{10 * step.n}ms"

    # --- CMDB -----------------------------------------------------------------------------------------------

    async def _cmdb_reset(self, step: Step) -> None:
        step.outcome = f"{self.w.cmdb.reset()} conns"

    async def _cmdb_stall(self, step: Step) -> None:
        await self._stall(self.w.cmdb, step)

    async def _cmdb_delay(self, step: Step) -> None:
        await self._delay(self.w.cmdb, step)

    async def _cmdb_errors(self, step: Step) -> None:
        kinds = [CMDB_ERRORS[(step.pick + i) % len(CMDB_ERRORS)] for i in range(2)]
        self.w.sim.faults.schedule([{"kind": kind, "count": 1 + step.n % 3} for kind in kinds])
        step.outcome = "+".join(kinds)

    async def _cmdb_bad_reply(self, step: Step) -> None:
        kinds = [BAD_REPLIES[(step.pick + i) % len(BAD_REPLIES)] for i in range(2)]
        self.w.sim.faults.schedule([{"kind": kind, "count": 1 + step.n % 3} for kind in kinds])
        step.outcome = "+".join(kinds)

    async def _list_truncated(self, step: Step) -> None:
        """An operator's ``rwatch resync -r host`` against a listing cut short: the rows are published, but no
        mark goes out, so nothing downstream is deleted (the oracle checks every deletion)."""
        kind = SHORT_LISTINGS[step.pick % len(SHORT_LISTINGS)]
        self.w.sim.faults.schedule({"kind": kind, "scope": "list", "api": "list_hosts_without_biz"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
        proc = await asyncio.create_subprocess_exec(
            RWATCH, "resync", "--resource", "host", "--no-progress", "--config", str(self.w.setup.path), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        step.outcome = f"{kind} exit {proc.returncode}"
        if proc.returncode != 1 or b"not proved complete" not in err:
            self.w.problems.append(f"list_truncated: rwatch resync against {kind} exited {proc.returncode}: "
                                   f"{(out + err).decode(errors='replace')[-300:]}")

    async def _poison(self, step: Step) -> None:
        """The receiver refuses one host event with a 500 from now on (until the round heals): the batch is
        bisected, the poison dead-lettered with its reason and attempts, and the queue moves on (the step waits
        for that); at quiescence the receiver accepts again and ``rwatch dlq replay`` brings it back."""
        w = self.w
        for proc in w.cluster.consumers:
            await w.cluster.ready(proc, event="consumers_started")  # the queues (the dead one too) exist
        key = w.sim.state.random_key("host", random.Random(step.pick))
        if key is None:
            step.outcome = "no host"
            return
        poisoned: list[str] = []

        def refuse(event: dict[str, object]) -> int | None:
            if (event.get("resource"), event.get("key"), event.get("origin")) != ("host", key, "watch"):
                return None
            if not poisoned:
                poisoned.append(str(event.get("id")))
            return 500 if event.get("id") == poisoned[0] else None

        w.receiver.refuse = refuse
        w.sim.state.update("host", key, {"bk_host_name": f"poison-{step.pick}"})
        dead = f"{w.setup.prefix}.hook.dead"
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if (await ready_counts(w.setup)).get(dead):
                step.outcome = f"host {key} dead-lettered"
                return
            await asyncio.sleep(0.5)
        step.outcome = f"host {key} not isolated"
        w.problems.append(f"poison: host {key}'s refused event was not dead-lettered within 30 s (its queue is held)")

    async def _expire_cursors(self, step: Step) -> None:
        self.w.sim.faults.schedule({"kind": "expire_cursors", "count": 1 + step.n % 3})
        step.outcome = f"x{1 + step.n % 3}"

    async def _clock_jump(self, step: Step) -> None:
        """Every watcher down; CMDB changes, its clock jumps past retention, it changes again; watchers back,
        one of them armed to die mid-resync: the gap is recorded, resynced, filled."""
        cluster, sim = self.w.cluster, self.w.sim
        watchers = cluster.watchers
        await self._cursors_saved()
        for proc in watchers:
            await cluster.running(proc)
            proc.down = True
            cluster.kill(proc)
        for proc in watchers:
            await cluster.exited(proc, 5)
        sim.load.run(40 + 10 * step.n)
        sim.state.clock.jump(RETENTION + 3600)
        sim.load.run(20)
        armed = self._pick(step, watchers) if step.n % 3 else None
        step.outcome = "no kill"
        if armed is not None:
            # The armed one comes back alone (so it takes the leases and runs the resyncs) and dies mid-resync.
            armed.armed = f"resync.after_page=kill@{1 + step.n % 4}"
            armed.down = False
            await cluster.running(armed)
            fired = await cluster.exited(armed, 8.0)
            step.outcome = f"{armed.name} resync.after_page{'' if fired else ' not reached'}"
        for proc in watchers:
            proc.down = False

    async def _cursors_saved(self, within: float = 20.0) -> None:
        """Until rwatch saved a cursor of its own for every resource. The round starts from the NoEventCursor
        (the harness puts it in the store; rwatch never saves it): resuming with it after the jump would start
        at the oldest *retained* event, and rightly record no gap, since that cursor vouches for nothing."""
        store = open_store(self.w.setup.store_url)
        await store.open()
        try:
            deadline = time.monotonic() + within
            while True:
                states = [await store.load("0", r) for r in TOPOLOGY]
                if all(s is not None and s.cursor not in ("", NO_EVENT_CURSOR) for s in states):
                    return
                if time.monotonic() > deadline:
                    self.w.problems.append(f"no cursor saved within {within:.0f} s: {states}")
                    return
                await asyncio.sleep(0.2)
        finally:
            await store.close()

    # --- a sink that stops answering (invariant 5) ----------------------------------------------------------

    async def _hook_stall(self, step: Step) -> None:
        """The receiver stops answering (every request hangs, then times out and is retried). Bounded memory:
        the broker holds the backlog (ready grows), the consumer holds at most ``prefetch`` unacked messages per
        queue and its RSS stays flat; the mirror, fed by the same process, keeps up with the watcher."""
        w = self.w
        consumers = w.cluster.consumers
        for proc in consumers:
            await w.cluster.ready(proc, event="consumers_started")  # the queues exist
        before = {p.name: p.rss_kb() for p in consumers}
        names = [w.setup.queue(r, sink) for sink in ("hook", "mirror") for r in TOPOLOGY]
        ready: dict[str, list[int]] = {n: [] for n in names}
        w.receiver.gate.clear()
        deadline = time.monotonic() + 2 * step.duration + 2.0
        try:
            async with await aio_pika.connect(w.setup.amqp_url) as conn:
                channel = await conn.channel()
                while time.monotonic() < deadline:
                    for name in names:  # a passive declare reads the queue itself: exact, not the 5 s metrics
                        queue = await channel.declare_queue(name, passive=True)
                        ready[name].append(int(queue.declaration_result.message_count or 0))
                    for proc in consumers:
                        grown = proc.rss_kb() - before[proc.name]
                        if before[proc.name] and grown > 64 * 1024:
                            w.problems.append(f"invariant 5: {proc.name} RSS grew {grown // 1024} MiB in a hook stall")
                    await asyncio.sleep(0.2)
            # Unacknowledged counts come from the broker's metrics (refreshed every few seconds): read once more.
            for name, (_, unacked) in (await queue_stats(w.setup.prefix)).items():
                if unacked > PREFETCH:
                    w.problems.append(f"invariant 5: {name} had {unacked} unacked > prefetch {PREFETCH}")
        finally:
            w.receiver.gate.set()
        backlog = max(max(ready[w.setup.queue(r, "hook")]) for r in TOPOLOGY)
        # The mirror kept applying: at some point of the stall, after the first second, none of its queues held more
        # than a prefetch window, or, when it entered the stall behind (a resync's flood, a broker stall just
        # before), its backlog fell by more than a window. A mirror blocked behind the hook would only grow, with
        # the workload; one that drains is isolated, however fast this machine lets it apply.
        mirror = [sum(ready[w.setup.queue(r, "mirror")][i] for r in TOPOLOGY) for i in range(len(ready[names[0]]))]
        caught_up = min(mirror[len(mirror) // 4:] or [0])
        drained = bool(mirror) and mirror[-1] < mirror[0] - PREFETCH
        if backlog > 2 * PREFETCH and caught_up > 2 * PREFETCH and not drained:
            w.problems.append(f"invariant 5: the mirror fell behind while the hook stalled: {mirror}")
        step.outcome = f"hook backlog {backlog}, mirror {caught_up}"
