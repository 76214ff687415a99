"""Seeded load: the initial topology, and random changes applied on demand or at a steady rate.

Every operation keeps the topology valid (a module with hosts is never deleted, a host always sits in a
module, the default nodes stay), and an operation that has nothing to act on is re-drawn, so ``run(n)``
applies exactly ``n`` changes.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from rwatch.cmdb.protocol import object_key
from rwatch.logs import get_logger
from rwatch.sim.state import SimError, SimState

log = get_logger("rwatch.sim.load")

DEFAULT_MIX: Final[dict[str, float]] = {
    "host.create": 8,
    "host.update": 30,
    "host.delete": 6,
    "host.move": 15,
    "set.create": 2,
    "set.update": 2,
    "set.delete": 1,
    "module.create": 3,
    "module.update": 3,
    "module.delete": 2,
    "biz.create": 1,
    "biz.update": 2,
    "process.create": 3,
    "process.update": 4,
    "process.delete": 2,
    "object_instance.create": 3,
    "object_instance.update": 4,
    "object_instance.delete": 2,
    "mainline_instance.create": 1,
    "mainline_instance.update": 1,
    "mainline_instance.delete": 1,
    "plat.create": 1,
    "plat.update": 1,
    "plat.delete": 0.5,
    "project.create": 1,
    "project.update": 1,
    "project.delete": 0.5,
    "biz_set.create": 0.5,
    "biz_set.update": 1,
    "biz_set.delete": 0.3,
}
# Not in the default mix (its weights are what the tests and benches have measured): operations a mix may name.
EXTRA_OPS: Final = ("biz.rename", "set.rename", "module.rename")
OBJ_IDS: Final = ("switch", "router", "firewall")
_MAX_TICK_OPS = 10_000  # a background tick never applies more than this, whatever the rate


def build_topology(
    state: SimState, *, bizs: int, sets_per_biz: int, modules_per_set: int, hosts: int
) -> None:
    """The initial topology, created through the ordinary code path so the chains start with its creates."""
    modules: list[int] = []
    for b in range(bizs):
        biz = state.create("biz", {"bk_biz_name": f"biz-{b + 1}"})["bk_biz_id"]
        for s in range(sets_per_biz):
            set_id = state.create("set", {"bk_biz_id": biz, "bk_set_name": f"set-{b + 1}-{s + 1}"})[
                "bk_set_id"
            ]
            for m in range(modules_per_set):
                name = f"module-{b + 1}-{s + 1}-{m + 1}"
                modules.append(
                    state.create("module", {"bk_set_id": set_id, "bk_module_name": name})["bk_module_id"]
                )
        state.create("process", {"bk_biz_id": biz})
        state.create("mainline_instance", {"bk_biz_id": biz})
    for i in range(hosts):
        host = state.create("host")["bk_host_id"]
        if modules:
            state.move_host(host, [modules[i % len(modules)]])
    state.create("biz_set", {"bk_biz_set_name": "all", "bk_scope": {"match_all": True}})
    state.create("plat", {"bk_cloud_name": "cloud-1"})
    for obj in OBJ_IDS[:2]:
        state.create("object_instance", {"bk_obj_id": obj})
    state.create("project")


class LoadGenerator:
    """Random CMDB changes, drawn by weight from ``mix`` with a seeded generator."""

    def __init__(self, state: SimState, *, seed: int = 0, mix: dict[str, float] | None = None) -> None:
        self.state = state
        self.rng = random.Random(seed)
        self.applied: Counter[str] = Counter()
        self.rate = 0.0
        self._task: asyncio.Task[None] | None = None
        self._ops: dict[str, Callable[[], bool]] = {}
        for name in (*DEFAULT_MIX, *EXTRA_OPS):
            resource, action = name.split(".")
            self._ops[name] = getattr(self, f"_{action}_{resource}", None) or self._generic(resource, action)
        self.set_mix(mix)

    def set_mix(self, mix: dict[str, float] | None) -> None:
        mix = dict(mix or DEFAULT_MIX)
        unknown = set(mix) - set(self._ops)
        if unknown or not any(w > 0 for w in mix.values()) or any(w < 0 for w in mix.values()):
            raise ValueError(f"bad load mix (unknown ops {sorted(unknown)}; known: {sorted(self._ops)})")
        self._names = [n for n, w in mix.items() if w > 0]
        self._weights = [mix[n] for n in self._names]

    def run(self, n: int) -> dict[str, int]:
        """Apply ``n`` random changes now and return how many of each operation ran."""
        done: Counter[str] = Counter()
        attempts = 0
        while sum(done.values()) < n:
            attempts += 1
            if attempts > 50 * n + 100:
                raise SimError("the load mix cannot make progress (nothing to act on)", 409)
            name = self.rng.choices(self._names, self._weights)[0]
            if self._ops[name]():
                done[name] += 1
        self.applied.update(done)
        return dict(done)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, rate: float, *, mix: dict[str, float] | None = None, seed: int | None = None) -> None:
        """Apply ``rate`` changes per second in the background (0 stops)."""
        self.stop()
        if mix is not None:
            self.set_mix(mix)
        if seed is not None:
            self.rng.seed(seed)
        self.rate = rate
        if rate > 0:
            self._task = asyncio.get_running_loop().create_task(self._background(rate), name="sim-load")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.rate = 0.0

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _background(self, rate: float) -> None:
        loop = asyncio.get_running_loop()
        start, done = loop.time(), 0
        while True:  # ends when stop() or aclose() cancels the task
            await asyncio.sleep(min(0.05, 1 / rate))
            due = int((loop.time() - start) * rate)
            if due > done:
                try:
                    self.run(min(due - done, _MAX_TICK_OPS))
                except SimError as err:
                    log.warning("sim_load_stalled", error=str(err))
                done = due

    # --- operations ---------------------------------------------------------------------------------

    def _pick(
        self, resource: str, ok: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any] | None:
        """A random object satisfying ``ok``: O(1) draws first, a full scan only when those keep missing."""
        docs = self.state.objects_view(resource)
        for _ in range(20):
            key = self.state.random_key(resource, self.rng)
            if key is None:
                return None
            if ok is None or ok(docs[key]):
                return docs[key]
        assert ok is not None
        matching = [d for d in docs.values() if ok(d)]
        return self.rng.choice(matching) if matching else None

    def _user_biz(self) -> dict[str, Any] | None:
        return self._pick("biz", lambda d: not d.get("default"))

    def _generic(self, resource: str, action: str) -> Callable[[], bool]:
        def op() -> bool:
            if action == "create":
                fields: dict[str, Any] = {}
                if resource in ("process", "mainline_instance"):
                    biz = self._user_biz()
                    if biz is None:
                        return False
                    fields["bk_biz_id"] = biz["bk_biz_id"]
                elif resource == "object_instance":
                    fields["bk_obj_id"] = self.rng.choice(OBJ_IDS)
                self.state.create(resource, fields)
                return True
            doc = self._pick(
                resource,
                lambda d: not d.get("default") and not (resource == "plat" and d["bk_cloud_id"] == 0),
            )
            if doc is None:
                return False
            key = str(object_key(resource, doc))
            if action == "update":
                self.state.update(resource, key, self._changes(resource))
                return True
            try:
                self.state.delete(resource, key)
            except SimError:
                return False  # still in use (a plat with hosts, a set with hosts...)
            return True

        return op

    def _changes(self, resource: str) -> dict[str, Any]:
        n = self.rng.randrange(1_000_000)
        name = {
            "set": "bk_set_desc",
            "module": "operator",
            "process": "description",
            "plat": "bk_cloud_name",
            "project": "bk_project_desc",
            "biz_set": "bk_biz_set_desc",
        }.get(resource, "bk_inst_name")
        return {name: f"{name}-{n}"}

    def _update_host(self) -> bool:
        host = self._pick("host")
        if host is None:
            return False
        field = self.rng.choice(("bk_host_name", "operator", "bk_comment", "bk_os_name"))
        self.state.update("host", str(host["bk_host_id"]), {field: f"{field}-{self.rng.randrange(10**6)}"})
        return True

    def _move_host(self) -> bool:
        host, module = self._pick("host"), self._pick("module")
        if host is None or module is None:
            return False
        targets = [module["bk_module_id"]]
        if self.rng.random() < 0.2:  # sometimes into a second module of the same business
            other = self._pick("module", lambda m: m["bk_biz_id"] == module["bk_biz_id"])
            if other is not None and other["bk_module_id"] not in targets:
                targets.append(other["bk_module_id"])
        self.state.move_host(host["bk_host_id"], targets)
        return True

    def _create_set(self) -> bool:
        biz = self._user_biz()
        if biz is None:
            return False
        self.state.create("set", {"bk_biz_id": biz["bk_biz_id"]})
        return True

    def _create_module(self) -> bool:
        parent = self._pick("set", lambda d: not d.get("default"))
        if parent is None:
            return False
        self.state.create("module", {"bk_set_id": parent["bk_set_id"]})
        return True

    def _rename(self, resource: str, doc: dict[str, Any] | None) -> bool:
        """A new name for a biz, set or module (what a downstream group named after it must follow)."""
        if doc is None:
            return False
        key = str(object_key(resource, doc))
        self.state.update(resource, key, {f"bk_{resource}_name": f"{resource}-{key}-r{self.rng.randrange(10**6)}"})
        return True

    def _rename_biz(self) -> bool:
        return self._rename("biz", self._user_biz())

    def _rename_set(self) -> bool:
        return self._rename("set", self._pick("set", lambda d: not d.get("default")))

    def _rename_module(self) -> bool:
        return self._rename("module", self._pick("module", lambda d: not d.get("default")))

    def _update_biz(self) -> bool:
        biz = self._user_biz()
        if biz is None:
            return False
        if self.rng.random() < 0.1:  # archive or restore: changes biz set membership
            status = "enable" if biz.get("bk_data_status") == "disabled" else "disabled"
            changes: dict[str, Any] = {"bk_data_status": status}
        else:
            changes = {"bk_biz_maintainer": f"user{self.rng.randrange(100)}"}
        self.state.update("biz", str(biz["bk_biz_id"]), changes)
        return True

    def _create_biz_set(self) -> bool:
        bizs = [b["bk_biz_id"] for b in self.state.objects("biz").values() if not b.get("default")]
        chosen = self.rng.sample(bizs, min(len(bizs), 2))
        rule = {"field": "bk_biz_id", "operator": "in", "value": chosen}
        self.state.create(
            "biz_set", {"bk_scope": {"match_all": False, "filter": {"condition": "AND", "rules": [rule]}}}
        )
        return True

    def _update_biz_set(self) -> bool:
        biz_set = self._pick("biz_set")
        if biz_set is None:
            return False
        if self.rng.random() < 0.3:  # flip between "every business" and a filter: membership changes
            match_all = not (biz_set.get("bk_scope") or {}).get("match_all")
            rule = {"field": "bk_data_status", "operator": "equal", "value": "enable"}
            changes: dict[str, Any] = {
                "bk_scope": {"match_all": match_all}
                if match_all
                else {"match_all": False, "filter": {"condition": "AND", "rules": [rule]}}
            }
        else:
            changes = self._changes("biz_set")
        self.state.update("biz_set", str(biz_set["bk_biz_set_id"]), changes)
        return True
