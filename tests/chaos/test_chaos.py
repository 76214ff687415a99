"""Seeded chaos rounds: workload, nemesis, quiescence, oracle (tests/chaos/README.md tells the whole story).

``RWATCH_CHAOS_ROUNDS=N`` runs seeds 1..N (default 12: every fault kind at least once); ``RWATCH_CHAOS_SEED=7``
(or ``7,12``) runs just those. A round's seed decides its topology, workload rate and fault schedule
(``nemesis.make_plan``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rwatch.sim.parts import SimOptions
from rwatch.sim.server import Simulator
from rwatch.store.base import open_store
from tests.chaos.cluster import Cluster
from tests.chaos.conftest import RESULTS
from tests.chaos.nemesis import (
    LEASE_TTL,
    PREFETCH,
    RETENTION,
    Nemesis,
    Plan,
    World,
    make_plan,
    ready_counts,
    topology_of,
)
from tests.chaos.oracle import (
    RoundResult,
    ZabbixOracle,
    describe,
    lost_changes,
    mirror_audit,
    prepare_mirror,
    sink_states,
    table,
    wrong_deletes,
)
from tests.chaos.proxy import Proxy
from tests.chaos.receiver import ChaosReceiver
from tests.downstream.instances import Zabbix
from tests.entrypoint import RWATCH
from tests.integration.harness import Setup, delete_topology
from tests.integration.test_apply_e2e import MIX, TOPOLOGY, seed_from_start

CONVERGE_WITHIN = 60.0  # from the last fault healed to every sink equal to CMDB
DRAIN_WITHIN = 15.0
RSS_LIMIT_KB = 400 * 1024  # any rwatch process, any time (it starts near 90 MiB)
EXPIRED_ANSWERS_MAX = 12  # per resource a round: a cursor loss draws at most five refusals (README), never a loop


def seeds() -> list[int]:
    chosen = os.environ.get("RWATCH_CHAOS_SEED", "").strip()
    if chosen:
        return [int(s) for s in chosen.split(",") if s.strip()]
    return list(range(1, int(os.environ.get("RWATCH_CHAOS_ROUNDS", "12")) + 1))


pytestmark = [pytest.mark.chaos, pytest.mark.amqp, pytest.mark.slow]


@dataclass
class ChaosSetup(Setup):
    """The harness's config with the chaos suite's timings (the broker is reached through the proxy: bus_url)."""

    def write(self) -> None:
        super().write()
        text = self.path.read_text()
        # Rounds change a large share of a small topology between resyncs: the guard's limit is raised, not off.
        text = text.replace('retention = "3h"', f'retention = {RETENTION}\nlease_ttl = {LEASE_TTL}\n'
                            'mass_delete_share = 0.6')
        text = text.replace(f"prefetch = {self.prefetch}", f"prefetch = {self.prefetch}\npublish_timeout = 10")
        self.path.write_text(text)


@pytest.fixture
def store_url(request: pytest.FixtureRequest) -> str:
    """PostgreSQL (a fresh database: store and mirror) for the HA rounds, SQLite files for the others."""
    seed = request.node.callspec.params["seed"]
    if topology_of(seed) == "ha":
        return str(request.getfixturevalue("pg_url"))
    return ""


@pytest.fixture
async def receiver() -> AsyncIterator[ChaosReceiver]:
    r = ChaosReceiver()
    async with r:
        yield r


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [
    pytest.param(s, marks=[pytest.mark.postgres] if topology_of(s) == "ha" else [], id=f"seed{s}") for s in seeds()
])
async def test_chaos_round(seed: int, amqp_url: str, store_url: str, receiver: ChaosReceiver,
                           tmp_path: Path, zabbix: Zabbix) -> None:
    plan = make_plan(seed)
    result = RoundResult(seed, plan.topology, [])
    started = time.monotonic()
    try:
        await run_round(plan, result, amqp_url, store_url, receiver, tmp_path, zabbix)
    except Exception as exc:
        result.problems.append(f"round crashed: {exc!r}")
        raise
    finally:
        result.seconds = time.monotonic() - started
        RESULTS.append(result)
        print("\n" + table([result]))
        for problem in result.problems:
            print(f"  - {problem}")
    assert result.ok, (
        f"chaos round seed={seed} ({plan.topology}) failed:\n" + "\n".join(f"  - {p}" for p in result.problems)
        + f"\n{table([result])}\nlogs: {tmp_path}\n"
        f"reproduce: RWATCH_CHAOS_SEED={seed} python -m pytest tests/chaos -q"
    )


async def run_round(plan: Plan, result: RoundResult, amqp_url: str, store_url: str, receiver: ChaosReceiver,
                    tmp: Path, zabbix: Zabbix) -> None:
    options = SimOptions(port=0, hold=1.0, error_delay=0.01, seed=plan.seed, bizs=3, hosts=60, retention=RETENTION)
    async with Simulator(options) as sim, \
            Proxy.before("amqp", amqp_url) as amqp, \
            Proxy("cmdb", "127.0.0.1", int(sim.url.rsplit(":", 1)[1])) as cmdb:
        # A poisoned payload is isolated after 3 attempts or 3 s, so a round can watch it leave its queue.
        unique = uuid.uuid4().hex[:10]
        zbx = ZabbixOracle(zabbix, f"chaos{plan.seed}-{unique}")
        extra = receiver.sink_toml("hook", batch_max=16, concurrency=4, timeout=5, max_attempts=3,
                                   retry_timeout="3s") + zbx.sink_toml() + "[run]\nshutdown_timeout = 8\n"
        setup = ChaosSetup(tmp, cmdb.url("http"), amqp_url, unique, TOPOLOGY, store_url=store_url,
                           mirror_url=store_url, prefetch=PREFETCH, extra=extra, bus_url=amqp.via(amqp_url))
        await seed_from_start(setup)  # the whole history: every chain event must reach the receiver
        engine = await prepare_mirror(setup)
        await zbx.open(setup)
        cluster = Cluster(setup, plan.roles, tmp)
        world = World(sim, cluster, amqp, cmdb, receiver, setup, rss_limit_kb=RSS_LIMIT_KB)
        try:
            cluster.start()
            sim.load.set_mix({op: float(weight) for op, weight in MIX.items()})
            sim.load.start(rate=plan.rate, seed=plan.seed)
            nemesis = Nemesis(world)
            for step in plan.steps:
                await nemesis.apply(step)
                result.faults.append(step.label())
            await asyncio.sleep(0.5)
            sim.load.stop()
            # Quiescence: every fault healed, every process up and unarmed; then measure the way back.
            amqp.heal()
            cmdb.heal()
            sim.faults.clear()
            receiver.gate.set()
            receiver.refuse = lambda event: None
            await cluster.heal()
            await replay_dead_letters(setup, result)  # what a poison step dead-lettered, now that it is accepted
            healed = time.monotonic()
            states = await converge(engine, setup, sim, receiver, zbx, CONVERGE_WITHIN)
            if not states:
                result.converge_s = round(time.monotonic() - healed, 1)
                await drain(setup, result)
            else:
                result.problems.append(f"not equal to CMDB {CONVERGE_WITHIN:.0f} s after the last fault healed:")
                result.problems += [f"  {line}" for line in describe(states)]
            await cluster.stop()
            await judge(world, engine, result, states)
        finally:
            cluster.kill_all()
            await engine.dispose()
            await zbx.close()
            with contextlib.suppress(Exception):
                await delete_topology(setup)


async def converge(engine: Any, setup: Setup, sim: Simulator, receiver: ChaosReceiver, zbx: ZabbixOracle,
                   within: float) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Wait until both queue sinks equal CMDB, no gap is open and Zabbix equals the mirror's topology; what still
    differs after ``within`` seconds."""
    deadline = time.monotonic() + within
    store = open_store(setup.store_url)
    await store.open()
    try:
        while True:
            states = await sink_states(engine, setup, sim, receiver)
            if not states:
                gaps = await store.gaps("0")
                if gaps:
                    states = {"store": ([f"open gap {g.resource} {g.id}" for g in gaps], [], [])}
                elif zabbix := await zbx.differs():
                    states = {"zabbix": ([], zabbix, [])}
                else:
                    return {}
            if time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.25)
    finally:
        await store.close()


async def replay_dead_letters(setup: Setup, result: RoundResult) -> None:
    """``rwatch dlq replay``, as the operator does once the receiver accepts again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
    proc = await asyncio.create_subprocess_exec(
        RWATCH, "dlq", "replay", "--config", str(setup.path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0:
        result.problems.append(f"rwatch dlq replay exited {proc.returncode}: {(out + err).decode()[-300:]}")


async def drain(setup: Setup, result: RoundResult) -> None:
    """Nothing still waiting in a queue of the round before the processes stop."""
    deadline = time.monotonic() + DRAIN_WITHIN
    while True:
        busy = {q: n for q, n in (await ready_counts(setup)).items() if not q.endswith(".dead") and n}
        if not busy:
            return
        if time.monotonic() > deadline:
            result.problems.append(f"queues not drained {DRAIN_WITHIN:.0f} s after convergence: {busy}")
            return
        await asyncio.sleep(0.5)


async def judge(w: World, engine: Any, result: RoundResult,
                states: dict[str, tuple[list[str], list[str], list[str]]]) -> None:
    """The oracle's counts and verdict (see oracle.py)."""
    sim, receiver, problems = w.sim, w.receiver, result.problems
    store = open_store(w.setup.store_url)
    await store.open()
    try:
        gaps = await store.gaps("0", open_only=False)
    finally:
        await store.close()
    lost, result.in_gaps = lost_changes(sim, receiver, gaps)
    stale_objects = sum(len(m) + len(s) for m, s, _ in states.values())
    # A resync's rows and marks may win a tie at their own version; the receiver saw every one of them.
    ties = {d.webhook_id for d in receiver.ledger if d.origin in ("resync", "mark")}
    regressions, mirror_dups = await mirror_audit(engine, ties)
    wrong = await wrong_deletes(engine, sim)
    if wrong:
        problems.append(f"deleted without proof: {len(wrong)} mirror rows CMDB still has: {wrong[:5]}")
    result.events = sum(len(sim.state.chain(r)) for r in TOPOLOGY)
    result.deliveries = len(receiver.deliveries)
    result.raw_duplicates = receiver.raw_duplicates
    result.effective_duplicates = len(receiver.effective_duplicates) + len(mirror_dups)
    result.lost = len(lost) + stale_objects
    result.regressions = len(receiver.order_violations) + len(regressions)
    result.gaps = len(gaps)
    if lost:
        problems.append(f"invariant 1: {len(lost)} changes never reached the webhook (outside any gap): {lost[:5]}")
    if receiver.effective_duplicates or mirror_dups:
        problems.append(f"invariant 2: effective duplicates: {(receiver.effective_duplicates + mirror_dups)[:5]}")
    if receiver.order_violations or regressions:
        problems.append(f"invariant 3: versions went back: {(receiver.order_violations + regressions)[:5]}")
    jumped = any(s.kind == "clock_jump" for s in make_plan(result.seed).steps)
    if gaps and not jumped:
        problems.append(f"invariant 4: gaps recorded without history lost: {[(g.resource, g.reason) for g in gaps]}")
    if jumped and {g.resource for g in gaps} != set(TOPOLOGY):
        problems.append(f"invariant 4: the clock jump left no gap for {set(TOPOLOGY) - {g.resource for g in gaps}}")
    for resource in TOPOLOGY:
        expired = sim.stats.watch_count(resource, outcome="error:1103007") + \
            sim.stats.watch_count(resource, outcome="error:1199006")
        if expired > EXPIRED_ANSWERS_MAX:
            problems.append(f"invariant 4: {resource} was answered 'cursor expired' {expired} times: a loop")
    result.rss_max_mib = max(p.rss_max_kb for p in w.cluster.procs) // 1024
    for proc in w.cluster.procs:
        if proc.rss_max_kb > w.rss_limit_kb:
            problems.append(f"invariant 5: {proc.name} RSS reached {proc.rss_max_kb // 1024} MiB")
    problems.extend(w.problems)
    problems.extend(w.cluster.crashes())
    for exit_ in w.cluster.exits:
        if not exit_.ok:
            problems.append(f"unexpected exit: {exit_.proc} code {exit_.code} after {exit_.expected or 'nothing'}"
                            + (f" in {exit_.seconds} s" if exit_.seconds is not None else "")
                            + " (invariant 6 if it was asked to stop)")
    dead = {q: n for q, n in (await ready_counts(w.setup)).items() if q.endswith(".dead") and n}
    if dead:
        problems.append(f"dead letters: {dead}")
