"""Benchmark: an initial Zabbix sync from empty, rwatch's reconcile against a naive one-call-per-object sync.

    python bench/zabbix_sync.py [--hosts 1000] [--modules 100] [--rounds 2] [--only rwatch]

Needs the real Zabbix of the tests (``bash .ci/downstream.sh``): its frontend is served by ``php -S`` for the run
(as tests/downstream does) and logged in as Admin. The topology: ``--modules`` modules, 5 per set and 5 sets per biz
(bizs as needed), ``--hosts`` hosts spread evenly, each in one module.

- rwatch: ``desired_state`` then ``reconcile`` (rwatch.sinks.zabbix) into an empty prefix: three reads, one
  ``hostgroup.create`` per level, ``host.create`` in arrays.
- baseline: the sync the blog posts write: for every group, parents first, ``hostgroup.get`` by name and
  ``hostgroup.create`` when missing; for every host, ``host.get`` by technical name and ``host.create`` (same
  fields: groups, tags, agent interface) when missing. Same client, same Zabbix, same result (checked).

Each round runs both, alternating which goes first, each into its own fresh prefix, deleted afterwards
(``--only rwatch`` skips the baseline: at 10,000 hosts it takes minutes).
Reported: API calls and seconds of each, the ratios (baseline / rwatch), a second reconcile's calls (unchanged
topology: reads only), and a host moved between modules reconciled with ``scope`` (steady state's unit of work).
Prints a table and writes bench/results/zabbix_sync.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.downstream.instances starts the Zabbix frontend

from tests.downstream.instances import Zabbix, start_zabbix, stop_zabbix  # noqa: E402

from rwatch.logs import setup_logging  # noqa: E402
from rwatch.sinks.base import TopologyRow  # noqa: E402
from rwatch.sinks.zabbix.api import ZabbixApi  # noqa: E402
from rwatch.sinks.zabbix.desired import DesiredState, ZabbixOptions, desired_state  # noqa: E402
from rwatch.sinks.zabbix.reconcile import reconcile  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "zabbix_sync.json"
SETS_PER_BIZ, MODULES_PER_SET = 5, 5


def topology(hosts: int, modules: int) -> list[TopologyRow]:
    rows = []
    for i in range(hosts):
        m = i % modules
        biz, set_ = m // (SETS_PER_BIZ * MODULES_PER_SET) + 1, m // MODULES_PER_SET + 1
        rows.append(TopologyRow(
            tenant="0", bk_biz_id=biz, bk_biz_name=f"biz{biz}", bk_set_id=set_, bk_set_name=f"set{set_}",
            bk_module_id=m + 1, bk_module_name=f"module{m + 1}", bk_host_id=i + 1,
            bk_host_innerip=f"10.{i // 65025}.{i // 255 % 255}.{i % 255 + 1}", bk_cloud_id=0,
            bk_host_name=f"host{i + 1}",
        ))
    return rows


def options_for(tag: str) -> ZabbixOptions:
    prefix = f"bench{tag}"
    return ZabbixOptions(group_prefix=prefix, technical_name=f"{prefix}-{{bk_host_id}}",
                         visible_name=f"{{label}} ({prefix}-{{bk_host_id}})")


async def naive(api: ZabbixApi, desired: DesiredState) -> None:
    """One call per object to look, one to create: the sync people write by hand."""
    ids: dict[str, str] = {}
    for name in sorted(desired.groups.values(), key=lambda n: (n.count("/"), n)):
        found = await api.call("hostgroup.get", {"output": ["groupid"], "filter": {"name": [name]}})
        ids[name] = (found[0]["groupid"] if found
                     else (await api.call("hostgroup.create", {"name": name}))["groupids"][0])
    for d in desired.hosts.values():
        if await api.call("host.get", {"output": ["hostid"], "filter": {"host": [d.host]}}):
            continue
        await api.call("host.create", {
            "host": d.host, "name": d.name, "groups": [{"groupid": ids[g]} for g in sorted(d.groups)],
            "tags": [{"tag": t, "value": v} for t, v in sorted(d.tags)],
            "interfaces": [{"type": 1, "main": 1, "useip": 1, "ip": d.ip, "dns": "", "port": "10050"}],
        })


def clean(zabbix: Zabbix, options: ZabbixOptions) -> None:
    prefix = options.group_prefix
    hosts = zabbix.call("host.get", {"output": ["hostid"], "search": {"host": prefix}, "startSearch": True})
    for i in range(0, len(hosts), 1000):
        zabbix.call("host.delete", [h["hostid"] for h in hosts[i:i + 1000]])
    groups = zabbix.call("hostgroup.get", {"output": ["groupid"], "search": {"name": prefix}, "startSearch": True})
    if groups:
        zabbix.call("hostgroup.delete", [g["groupid"] for g in groups])


def check(zabbix: Zabbix, options: ZabbixOptions, desired: DesiredState) -> None:
    prefix = options.group_prefix
    hosts = zabbix.call("host.get", {"output": ["host"], "search": {"host": prefix}, "startSearch": True,
                                     "selectGroups": ["name"]})
    got = {h["host"]: {g["name"] for g in h["groups"]} for h in hosts}
    want = {d.host: set(d.groups) for d in desired.hosts.values()}
    assert got == want, f"{prefix}: {len(got)} hosts, not the {len(want)} desired ones"


async def one(zabbix: Zabbix, which: str, rows: list[TopologyRow]) -> dict[str, Any]:
    options = options_for(uuid.uuid4().hex[:8])
    desired = desired_state(rows, options)
    try:
        async with ZabbixApi(zabbix.url, token=zabbix.token) as api:
            before = api.total_calls
            started = time.perf_counter()
            if which == "rwatch":
                await reconcile(api, desired, options)
            else:
                await naive(api, desired)
            seconds = time.perf_counter() - started
            calls = api.total_calls - before
            result = {"calls": calls, "seconds": round(seconds, 3)}
            check(zabbix, options, desired)
            if which == "rwatch":
                again = await reconcile(api, desired, options)
                result["second_calls"], result["second_writes"] = again.api_calls, again.write_calls
                result["second_seconds"] = again.seconds
                # Steady state's unit of work: one host moved to another module, reconciled by its id alone.
                moved = [replace(r, bk_module_id=rows[1].bk_module_id, bk_module_name=rows[1].bk_module_name)
                         if r.bk_host_id == rows[0].bk_host_id else r for r in rows]
                one_move = await reconcile(api, desired_state(moved, options), options, scope=[rows[0].bk_host_id])
                result["move_calls"], result["move_seconds"] = one_move.api_calls, one_move.seconds
        return result
    finally:
        clean(zabbix, options)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rows = topology(args.hosts, args.modules)
    zabbix = start_zabbix(Path(tempfile.mkdtemp(prefix="rwatch-bench-zabbix-")))
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            order = ("rwatch", "naive") if r % 2 == 0 else ("naive", "rwatch")
            order = tuple(w for w in order if args.only in (None, w))
            rounds.append({which: await one(zabbix, which, rows) for which in order})
    finally:
        stop_zabbix(zabbix)
    both = [x for x in rounds if len(x) == 2]
    calls = statistics.median(x["naive"]["calls"] / x["rwatch"]["calls"] for x in both) if both else None
    seconds = statistics.median(x["naive"]["seconds"] / x["rwatch"]["seconds"] for x in both) if both else None
    return {"zabbix": zabbix.version, "hosts": args.hosts, "modules": args.modules, "rounds": rounds,
            "calls_ratio": calls and round(calls, 1), "seconds_ratio": seconds and round(seconds, 1)}


def report(result: dict[str, Any]) -> str:
    lines = [f"Zabbix {result['zabbix']}: initial sync of {result['hosts']} hosts in {result['modules']} modules",
             f"{'round':>5} {'rwatch calls':>12} {'rwatch s':>9} {'naive calls':>11} {'naive s':>8} "
             f"{'2nd reconcile calls/writes':>27} {'1 move calls':>12} {'1 move s':>8}"]
    for i, r in enumerate(result["rounds"]):
        w, n = r.get("rwatch", {}), r.get("naive", {})
        second = f"{w['second_calls']}/{w['second_writes']}" if w else "-"
        lines.append(f"{i + 1:>5} {w.get('calls', '-'):>12} {w.get('seconds', '-'):>9} {n.get('calls', '-'):>11} "
                     f"{n.get('seconds', '-'):>8} {second:>27} {w.get('move_calls', '-'):>12} "
                     f"{w.get('move_seconds', '-'):>8}")
    if result["calls_ratio"] is not None:
        lines.append(f"naive / rwatch (median): {result['calls_ratio']}x the API calls, "
                     f"{result['seconds_ratio']}x the time")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--modules", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=("rwatch", "naive"), default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    setup_logging("warning", "console", stream=sys.stderr)
    outcome = asyncio.run(main(arguments))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(report(outcome))
    print(f"wrote {arguments.out}", file=sys.stderr)
