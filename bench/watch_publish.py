"""Benchmark: the watch half's sustained rate and its idle cost, each against a baseline from the same run.

Run (RabbitMQ on 127.0.0.1:5672, or RWATCH_TEST_AMQP_URL; about 2.5 minutes on 2 cores):

    python bench/watch_publish.py            # --help for the knobs

1. Drain. A simulator in its own process (so its CPU is not charged to rwatch) holds a backlog of
   ``--events`` host updates. One rwatch ``Watcher`` for ``host``, built as ``run_async`` builds it, resumes
   from the cursor just before the backlog and follows it: HTTP long-poll -> normalize -> ``AmqpBus``
   publish with confirms -> cursor saved to SQLite. Timed from ``Watcher.run()`` until the cursor of the
   last event is saved (so every event is confirmed). Baseline: the simplest correct publisher, a plain
   aio-pika loop with publisher confirms and ``mandatory``, the same in-flight window, publishing the very
   bodies the watcher published (captured from the queue in a first, untimed drain) to the same topology
   (quorum queue, same arguments and binding). Rounds alternate which side goes first; each run gets a
   fresh exchange and queues, deleted afterwards. Claim: median of watcher rate / baseline rate. For context,
   one drain each with the shipped ``cmdb.rate_limit`` and with the start-up heap frozen (as ``rwatch run`` does).
2. Idle. ``rwatch run --role watcher`` as a child process, watching five resources against a second
   simulator with no changes and the real 20 s hold. After start-up has settled: CMDB requests (counted by
   the simulator) and CPU seconds of the rwatch process (utime + stime from /proc) per resource per minute,
   against the minimum a 20 s hold allows (3 requests per resource per minute).
3. Profile. One more drain sampled by py-spy (pyinstrument where ptrace is refused; ``pip install -e
   '.[bench]'``; skipped when neither is there): where the watcher's process spends its busy time.

Prints a table and writes bench/results/watch_publish.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aio_pika
import aiohttp
import orjson

from rwatch.bus.amqp import AmqpBus
from rwatch.bus.topology import dead_queue_name, declare_topology, dlx_name, queue_name
from rwatch.cmdb.client import CmdbClient
from rwatch.config import CmdbConfig, Config
from rwatch.events import watch_event_id
from rwatch.logs import setup_logging
from rwatch.store.base import open_store
from rwatch.store.records import CursorState
from rwatch.watch.watcher import Watcher

URL = os.environ.get("RWATCH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RESULTS = Path(__file__).resolve().parent / "results" / "watch_publish.json"
SINK = "mirror"
IDLE_RESOURCES = ("host", "host_relation", "biz", "set", "module")
HOLD = 20.0  # the server's long-poll hold; the idle minimum follows from it
TICK = os.sysconf("SC_CLK_TCK")

DEFAULT_RATE_LIMIT = CmdbConfig().rate_limit


# --- the machine ---------------------------------------------------------------------------------------


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


async def busy_fraction(seconds: float) -> float:
    b0, t0 = machine_jiffies()
    await asyncio.sleep(seconds)
    b1, t1 = machine_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


QUIESCE_TIMEOUT = 8.0  # bench/run.py shortens it: on a machine busy with others, every wait runs to the end


async def quiesce(limit: float = 0.25, timeout: float | None = None) -> float:
    """Wait until the machine is mostly idle (the broker cleans up a deleted queue in the background)."""
    deadline = time.monotonic() + (QUIESCE_TIMEOUT if timeout is None else timeout)
    busy = await busy_fraction(0.5)
    while busy > limit and time.monotonic() < deadline:
        busy = await busy_fraction(0.5)
    return busy


class GcClock:
    """Seconds this process spent in the cyclic garbage collector (gc.callbacks), by generation."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started

    @property
    def total(self) -> float:
        return sum(self.seconds)


GC = GcClock()


# --- child processes -------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all its threads), from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        return (int(fields[11]) + int(fields[12])) / TICK

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: this child only, by its pid."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def _open_log(path: Path) -> TextIO:
    return path.open("w")


async def spawn(name: str, args: list[str], log: Path) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}  # only what we pass applies
    with _open_log(log) as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "rwatch", *args, stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT, env=env)
    return Child(name, proc, log)


async def start_sim(tmp: Path, name: str, hosts: int) -> tuple[Child, str]:
    """A simulator on a free port (the kernel picks it), with the real 20 s hold; returns it and its URL."""
    child = await spawn(name, ["sim", "--listen", "127.0.0.1:0", "--hold", str(HOLD), "--error-delay", "0.01",
                               "--hosts", str(hosts), "--log-format", "json"], tmp / f"{name}.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in child.log.read_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if entry.get("event") == "sim_started":
                    return child, str(entry["url"])
        if child.proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    await child.stop()
    raise RuntimeError(f"simulator {name} did not start: {child.log.read_text()[-2000:]}")


# --- RabbitMQ --------------------------------------------------------------------------------------------


def bus_config(tag: str, tmp: Path, sim_url: str, *, rate_limit: float = 0.0) -> Config:
    """An rwatch configuration of its own (exchange, queue prefix, store) for one drain run."""
    resources: dict[str, Any] = {r: {"enabled": r == "host"} for r in IDLE_RESOURCES}
    return Config.model_validate({
        "cmdb": {"base_url": sim_url, "rate_limit": rate_limit},
        "watch": {"resources": resources},
        "bus": {"url": URL, "exchange": f"bench-{tag}", "queue_prefix": f"bench-{tag}"},
        "store": {"url": f"sqlite:///{tmp}/state-{tag}.db"},
        "sinks": {SINK: {"kind": "mirror", "url": f"sqlite:///{tmp}/mirror-{tag}.db"}},
    })


async def delete_topology(config: Config) -> None:
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        for resource in config.sink_resources(SINK):
            await channel.queue_delete(queue_name(config, SINK, resource))
        await channel.queue_delete(dead_queue_name(config, SINK))
        await channel.exchange_delete(config.bus.exchange)
        await channel.exchange_delete(dlx_name(config))
    finally:
        await conn.close()


async def queue_depth(config: Config, resource: str = "host") -> int:
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(queue_name(config, SINK, resource), passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await conn.close()


@dataclass
class Captured:
    """What the watcher published, in queue order: the baseline publishes exactly these."""

    bodies: list[bytes]
    routing_keys: list[str]
    headers: list[dict[str, Any]]
    timestamps: list[Any]


async def drain_queue(config: Config, n: int) -> Captured:
    conn = await aio_pika.connect(URL)
    got = Captured([], [], [], [])
    done = asyncio.Event()
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(queue_name(config, SINK, "host"), passive=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.bodies.append(message.body)
            got.routing_keys.append(message.routing_key or "")
            got.headers.append(dict(message.headers or {}))
            got.timestamps.append(message.timestamp)
            if len(got.bodies) >= n:
                done.set()

        await queue.consume(on_message, no_ack=True)
        await asyncio.wait_for(done.wait(), 120)
    finally:
        await conn.close()
    return got


# --- the simulator's backlog -----------------------------------------------------------------------------


@dataclass
class Backlog:
    start_cursor: str  # the host cursor just before the backlog: where the watcher resumes
    last_cursor: str  # the backlog's last event: saved once everything is confirmed
    cursors: list[str]  # the backlog in chain order (the truth the captured drain is checked against)


async def make_backlog(http: aiohttp.ClientSession, sim_url: str, n: int) -> Backlog:
    async def get(path: str) -> Any:
        async with http.get(sim_url + path) as resp:
            resp.raise_for_status()
            return await resp.json(loads=orjson.loads)

    start = (await get("/admin/stats"))["chains"]["host"]["end"]
    before = (await get(f"/admin/chain/host?since={start - 1}&limit=1"))["nodes"][0]["cursor"]
    async with http.post(sim_url + "/admin/load/run", json={"ops": n, "mix": {"host.update": 1}}) as resp:
        resp.raise_for_status()
        made = (await resp.json())["events"]
    nodes = (await get(f"/admin/chain/host?since={start}"))["nodes"]
    if made != n or len(nodes) != n:
        raise RuntimeError(f"asked for {n} host events, the simulator made {made} ({len(nodes)} in the chain)")
    cursors = [node["cursor"] for node in nodes]
    return Backlog(before, cursors[-1], cursors)


# --- one drain through rwatch ----------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    cpu: float  # CPU seconds of this (the rwatch) process during the run
    events: int
    machine: float = 0.0  # share of all CPUs busy during the run (this process, the simulator, the broker, others)
    sim_cpu: float = 0.0  # CPU seconds of the simulator process
    gc: float = 0.0  # seconds this process spent in the cyclic garbage collector

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu / self.events * 1e6

    def to_json(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 3), "events_per_s": round(self.rate, 1),
                "cpu_us_per_event": round(self.cpu_us_per_event, 1), "machine_busy": round(self.machine, 2),
                "process_cores": round(self.cpu / self.seconds, 2), "sim_cores": round(self.sim_cpu / self.seconds, 2),
                "gc_share_of_cpu": round(self.gc / self.cpu, 3) if self.cpu else 0.0}


async def watcher_drain(config: Config, backlog: Backlog, n: int, sim: Child,
                        around: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None) -> Run:
    """Follow the backlog with one host Watcher; timed from run() until the last cursor is saved."""
    stop = asyncio.Event()
    store = open_store(config.store.url.get_secret_value())
    await store.open()
    bus = AmqpBus(config, stop=stop, connection_name=f"bench {config.bus.exchange}")
    try:
        # Set-up, not timed: a saved cursor just before the backlog, the connection and the topology.
        await store.save(CursorState.from_cursor("0", "host", backlog.start_cursor))
        await bus.start()
        async with CmdbClient(config.cmdb) as client:
            watcher = Watcher("host", settings=config.watch.resources["host"], watch=config.watch, tenant="0",
                              client=client, bus=bus, store=store, stop=stop)

            async def drain() -> None:
                task = asyncio.create_task(watcher.run(), name="bench-watcher")
                try:
                    async with asyncio.timeout(60 + n / 500):  # far beyond any healthy drain: fail, never hang
                        await watcher.wait_saved(lambda state: state.cursor == backlog.last_cursor)
                finally:
                    stop.set()  # the watcher is now parked in a 20 s long-poll over an empty chain
                    await task

            async with around() if around is not None else contextlib.nullcontext():
                g0, s0, m0 = GC.total, sim.cpu_seconds(), machine_jiffies()
                c0, t0 = time.process_time(), time.perf_counter()
                await drain()
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                m1, sim_cpu, gc_seconds = machine_jiffies(), sim.cpu_seconds() - s0, GC.total - g0
    finally:
        stop.set()
        await bus.close()
        await store.close()
    depth = await queue_depth(config)
    if depth != n:
        raise RuntimeError(f"the watcher's queue holds {depth} messages, expected {n}")
    return Run(seconds, cpu, n, (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), sim_cpu, gc_seconds)


async def baseline_publish(config: Config, captured: Captured, window: int) -> Run:
    """The simplest correct publisher: aio-pika, confirms + mandatory, ``window`` publishes in flight."""
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare_topology(channel, config)  # the same quorum queue, arguments and binding
        sem = asyncio.Semaphore(window)

        async def one(i: int) -> None:
            try:
                message = aio_pika.Message(
                    captured.bodies[i], content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=uuid.uuid4().hex, headers=captured.headers[i], timestamp=captured.timestamps[i],
                )
                await exchange.publish(message, captured.routing_keys[i], mandatory=True, timeout=30)
            finally:
                sem.release()

        g0, m0, c0, t0 = GC.total, machine_jiffies(), time.process_time(), time.perf_counter()
        tasks = []
        for i in range(len(captured.bodies)):
            await sem.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        seconds, cpu, m1 = time.perf_counter() - t0, time.process_time() - c0, machine_jiffies()
        gc_seconds = GC.total - g0
    finally:
        await conn.close()
    n = len(captured.bodies)
    depth = await queue_depth(config)
    if depth != n:
        raise RuntimeError(f"the baseline's queue holds {depth} messages, expected {n}")
    return Run(seconds, cpu, n, (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), gc=gc_seconds)


def check_capture(captured: Captured, backlog: Backlog) -> None:
    """Every backlog event arrived once, in chain order, with its documented id."""
    events = [orjson.loads(body) for body in captured.bodies]
    cursors = [e["cursor"] for e in events]
    if cursors != backlog.cursors:
        raise RuntimeError("the captured events are not the backlog in chain order")
    if any(e["id"] != watch_event_id("host", e["cursor"]) for e in events):
        raise RuntimeError("an event id does not match sha256(resource, cursor)")


# --- profile ---------------------------------------------------------------------------------------------
# py-spy samples this process from outside (negligible overhead, waits in epoll left out); pyinstrument is
# the in-process fallback where ptrace is not allowed (its per-call hook slows the drain and inflates
# call-heavy code). Both end up as collapsed stacks: (frame, ..., leaf) -> seconds.

Stacks = Counter[tuple[str, ...]]


def _frame_name(function: str, path: str, line: int | None) -> str:
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{function} ({path}:{line})" if line else f"{function} ({path})"


def _function(frame: str) -> str:
    """``name (path:line)`` without the line: samples of one function at different lines add up."""
    return frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") and ":" in frame else frame


def _package(frame: str) -> str:
    path = frame[frame.rfind("(") + 1:].split(":")[0]
    if path.startswith("rwatch/"):
        return "rwatch"
    if "/" in path and not path.startswith("/") and not path.startswith("asyncio/"):
        return path.split("/", 1)[0]  # a site-packages distribution
    if path.endswith(".py"):
        return "python stdlib: " + path.split("/", 1)[0]
    return "C builtins: " + frame.split(" ", 1)[0]


def summarize_stacks(stacks: Stacks, top: int) -> dict[str, Any]:
    """Self time by function and by package, inclusive time of rwatch's functions; shares of busy time."""
    busy = sum(stacks.values())
    self_time: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, seconds in stacks.items():
        self_time[_function(stack[-1])] += seconds
        packages[_package(stack[-1])] += seconds
        for function in {_function(frame) for frame in stack}:
            if function.split("(", 1)[-1].startswith("rwatch/"):
                inclusive[function] += seconds

    def share(counter: Counter[str], k: int) -> list[dict[str, Any]]:
        return [{"function": name, "seconds": round(s, 3), "share_of_busy": round(s / busy, 3) if busy else 0.0}
                for name, s in counter.most_common(k)]

    return {"busy_seconds": round(busy, 3), "self": share(self_time, top),
            "rwatch_inclusive": share(inclusive, top), "by_package": share(packages, 15)}


IDLE_LEAVES = ("epoll.poll", "select", "poll")


def pyinstrument_stacks(session: Any) -> Stacks:
    stacks: Stacks = Counter()

    def walk(frame: Any, path: tuple[str, ...]) -> None:
        if frame.is_synthetic:  # pyinstrument's [self] / [await] markers: counted in their parent
            return
        here = (*path, _frame_name(frame.function, str(frame.file_path or ""), frame.line_no))
        own = frame.total_self_time
        if own > 0 and not (frame.function in IDLE_LEAVES and not frame.line_no):
            stacks[here] += own
        for child in frame.children:
            walk(child, here)

    root = session.root_frame()
    if root is not None:
        walk(root, ())
    return stacks


def pyspy_stacks(raw: str, rate: int) -> Stacks:
    """py-spy's ``--format raw`` (collapsed stacks: ``a (f.py:1);b (g.py:2) COUNT``) as seconds per stack."""
    stacks: Stacks = Counter()
    for line in raw.splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames or not count.isdigit():
            continue
        names = []
        for frame in frames.split(";"):
            function, _, where = frame.partition(" (")
            path, _, line_no = where.rstrip(")").rpartition(":")
            names.append(_frame_name(function, path, int(line_no) if line_no.isdigit() else None))
        stacks[tuple(names)] += int(count) / rate
    return stacks


def host_mirror_toml(path: Path, sim_url: str, tag: str, state: Path, mirror: Path, *, cmdb: str = "",
                     watch: str = "", sink: str = "") -> Path:
    """The rwatch config the process benches run: host only (interval 0), exchange and queues of the bench's
    own ``bench-<tag>``, a SQLite store and mirror; ``cmdb``, ``watch`` and ``sink`` are extra TOML lines for
    those sections. Written to ``path``, which is returned."""
    others = "".join(f"[watch.resources.{r}]\nenabled = false\n" for r in ("host_relation", "biz", "set", "module"))
    path.write_text(f"""
[cmdb]
base_url = "{sim_url}"
{cmdb}[watch]
{watch}[watch.resources.host]
enabled = true
interval = 0
{others}
[bus]
url = "{URL}"
exchange = "bench-{tag}"
queue_prefix = "bench-{tag}"
[store]
url = "sqlite:///{state}"
[sinks.{SINK}]
kind = "mirror"
url = "sqlite:///{mirror}"
{sink}[http]
listen = "127.0.0.1:0"
[log]
level = "info"
""")
    return path


async def stop_pyspy(proc: asyncio.subprocess.Process) -> None:
    """Stop py-spy so that it writes its output (30 s at most, then killed)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def profile_drain(config: Config, backlog: Backlog, n: int, sim: Child, tmp: Path,
                        top: int) -> tuple[str, Run, dict[str, Any]] | None:
    """One drain under py-spy (else pyinstrument, else None)."""
    pyspy = shutil.which("py-spy")
    if pyspy is not None:
        rate, out = 250, tmp / "pyspy.txt"

        @contextlib.asynccontextmanager
        async def sampled() -> AsyncIterator[None]:
            proc = await asyncio.create_subprocess_exec(
                pyspy, "record", "--pid", str(os.getpid()), "--rate", str(rate), "--nonblocking", "--format", "raw",
                "--output", str(out), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await asyncio.sleep(1.0)  # attaching takes a moment
            try:
                yield
            finally:
                await stop_pyspy(proc)

        run = await watcher_drain(config, backlog, n, sim, sampled)
        if out.exists() and out.stat().st_size:
            return "py-spy", run, summarize_stacks(pyspy_stacks(out.read_text(), rate), top)
    try:
        from pyinstrument import Profiler
    except ImportError:
        return None
    profiler = Profiler(interval=0.001, async_mode="disabled")

    @contextlib.asynccontextmanager
    async def around() -> AsyncIterator[None]:
        profiler.start()
        try:
            yield
        finally:
            profiler.stop()

    run = await watcher_drain(config, backlog, n, sim, around)
    assert profiler.last_session is not None
    return "pyinstrument", run, summarize_stacks(pyinstrument_stacks(profiler.last_session), top)


# --- idle ------------------------------------------------------------------------------------------------


def idle_toml(tmp: Path, sim_url: str, tag: str) -> Path:
    path = tmp / "idle.toml"
    tables = "".join(f"[watch.resources.{r}]\nenabled = true\ninterval = 0\n" for r in IDLE_RESOURCES)
    path.write_text(f"""
[cmdb]
base_url = "{sim_url}"
[watch]
bootstrap = "now"
{tables}
[bus]
url = "{URL}"
exchange = "bench-{tag}"
queue_prefix = "bench-{tag}"
[store]
url = "sqlite:///{tmp}/idle-state.db"
[sinks.{SINK}]
kind = "mirror"
url = "sqlite:///{tmp}/idle-mirror.db"
[http]
listen = "127.0.0.1:0"
[log]
level = "info"
""")
    return path


async def idle_cost(tmp: Path, http: aiohttp.ClientSession, seconds: float, tag: str) -> dict[str, Any]:
    sim, sim_url = await start_sim(tmp, "sim-idle", 20)
    rwatch: Child | None = None
    path = idle_toml(tmp, sim_url, tag)
    try:
        async def stats() -> dict[str, Any]:
            async with http.get(sim_url + "/admin/stats") as resp:
                resp.raise_for_status()
                return dict(await resp.json())

        def started(snap: dict[str, Any]) -> int:  # requests begun: answered plus those being held
            return int(snap["watch_total"]) + sum(int(v["current"]) for v in snap["inflight"].values())

        t_spawn = time.monotonic()
        rwatch = await spawn("rwatch-idle", ["run", "--role", "watcher", "--config", str(path)], tmp / "idle.log")
        # Settled: every resource had its first answer (from now) and is parked in a cursor-mode long-poll.
        while True:
            if rwatch.proc.returncode is not None:
                raise RuntimeError(f"rwatch exited: {rwatch.log.read_text()[-2000:]}")
            if time.monotonic() - t_spawn > 60:
                raise RuntimeError("rwatch did not settle within 60 s")
            snap = await stats()
            answered = {r: sum(n for o in snap["watch"].get(r, {}).values() for n in o.values())
                        for r in IDLE_RESOURCES}
            if all(answered[r] >= 1 and snap["inflight"].get(r, {}).get("current") == 1 for r in IDLE_RESOURCES):
                break
            await asyncio.sleep(0.2)
        settle = time.monotonic() - t_spawn
        await asyncio.sleep(2.0)  # the first batches' publish and cursor save
        startup_cpu = rwatch.cpu_seconds()
        snap0, cpu0, t0 = await stats(), rwatch.cpu_seconds(), time.monotonic()
        await asyncio.sleep(seconds)
        snap1, cpu1, t1 = await stats(), rwatch.cpu_seconds(), time.monotonic()
        minutes = (t1 - t0) / 60
        k = len(IDLE_RESOURCES)
        requests = started(snap1) - started(snap0)
        errors = sum(n for r in snap1["watch"].values() for modes in r.values() for o, n in modes.items()
                     if not o.startswith(("events", "placeholder")))
        req_rate = requests / k / minutes
        cpu_rate = (cpu1 - cpu0) / k / minutes
        minimum = 60 / HOLD
        return {
            "resources": list(IDLE_RESOURCES), "window_s": round(t1 - t0, 1), "settle_s": round(settle, 1),
            "startup_cpu_s": round(startup_cpu, 2), "requests": requests, "error_replies": errors,
            "requests_per_resource_per_min": round(req_rate, 2), "minimum_per_resource_per_min": minimum,
            "requests_vs_minimum": round(req_rate / minimum, 2),
            "cpu_s": round(cpu1 - cpu0, 3), "cpu_s_per_resource_per_min": round(cpu_rate, 4),
        }
    finally:
        if rwatch is not None:
            await rwatch.stop()
        await sim.stop()
        await delete_topology(Config.model_validate({
            "watch": {"resources": {r: {"enabled": True} for r in IDLE_RESOURCES}},
            "bus": {"exchange": f"bench-{tag}", "queue_prefix": f"bench-{tag}"},
            "sinks": {SINK: {"kind": "mirror"}},
        }))


# --- main ------------------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "amqp": URL.split("@")[-1]},
        "params": {"events": args.events, "rounds": args.rounds, "idle_seconds": args.idle_seconds},
    }
    before = await busy_fraction(1.0)
    result["machine"]["busy_before_start"] = round(before, 2)
    if before > 0.2:
        print(f"warning: the machine is {before:.0%} busy before the bench starts; numbers will be noisy",
              file=sys.stderr)
    configs: list[Config] = []
    with tempfile.TemporaryDirectory(prefix="rwatch-bench-") as tmpdir:
        tmp = Path(tmpdir)
        sim, sim_url = await start_sim(tmp, "sim-drain", args.hosts)
        try:
            async with aiohttp.ClientSession() as http:
                t = time.perf_counter()
                backlog = await make_backlog(http, sim_url, args.events)
                print(f"backlog: {args.events} host events in {time.perf_counter() - t:.1f} s", file=sys.stderr)

                def fresh(kind: str, rate_limit: float = 0.0) -> Config:
                    config = bus_config(f"{tag}-{kind}{len(configs)}", tmp, sim_url, rate_limit=rate_limit)
                    configs.append(config)
                    return config

                async def done(config: Config) -> None:
                    await delete_topology(config)
                    configs.remove(config)
                    await quiesce()

                # Capture (untimed warm-up): check the drain against the simulator's chain, keep the bodies.
                config = fresh("capture")
                warm = await watcher_drain(config, backlog, args.events, sim)
                captured = await drain_queue(config, args.events)
                await done(config)
                check_capture(captured, backlog)
                window = config.bus.publish_window
                print(f"capture: {warm.rate:.0f} events/s, all {args.events} confirmed, in order", file=sys.stderr)

                rounds = []
                for r in range(args.rounds):
                    order = ("baseline", "watcher") if r % 2 == 0 else ("watcher", "baseline")
                    runs: dict[str, Run] = {}
                    for side in order:
                        config = fresh(side)
                        if side == "watcher":
                            runs[side] = await watcher_drain(config, backlog, args.events, sim)
                        else:
                            runs[side] = await baseline_publish(config, captured, window)
                        await done(config)
                    w, b = runs["watcher"], runs["baseline"]
                    rounds.append({"order": list(order), "watcher": w.to_json(), "baseline": b.to_json(),
                                   "ratio": ratio(w.rate, b.rate),
                                   "cpu_ratio": ratio(w.cpu_us_per_event, b.cpu_us_per_event)})
                    print(f"round {r}: watcher {w.rate:.0f}/s ({w.cpu / w.seconds:.2f} cores, machine "
                          f"{w.machine:.0%} busy), baseline {b.rate:.0f}/s ({b.cpu / b.seconds:.2f} cores, machine "
                          f"{b.machine:.0%} busy), ratio {w.rate / b.rate:.2f}", file=sys.stderr)
                med = statistics.median
                result["drain"] = {
                    "events": args.events, "publish_window": window, "rounds": rounds,
                    "median_ratio": med(x["ratio"] for x in rounds),
                    "median_cpu_ratio": med(x["cpu_ratio"] for x in rounds),
                    "median_watcher_events_per_s": med(x["watcher"]["events_per_s"] for x in rounds),
                    "median_baseline_events_per_s": med(x["baseline"]["events_per_s"] for x in rounds),
                    "median_watcher_cpu_us_per_event": med(x["watcher"]["cpu_us_per_event"] for x in rounds),
                    "median_baseline_cpu_us_per_event": med(x["baseline"]["cpu_us_per_event"] for x in rounds),
                }
                for side in ("watcher", "baseline"):
                    result["drain"][f"median_{side}_gc_share"] = med(x[side]["gc_share_of_cpu"] for x in rounds)
                    result["drain"][f"median_{side}_cores"] = med(x[side]["process_cores"] for x in rounds)
                    result["drain"][f"median_{side}_machine_busy"] = med(x[side]["machine_busy"] for x in rounds)
                if args.rate_limited:
                    # What the shipped default cmdb.rate_limit (requests/s, 200 events a reply) allows.
                    config = fresh("limited", rate_limit=DEFAULT_RATE_LIMIT)
                    limited = await watcher_drain(config, backlog, args.events, sim)
                    await done(config)
                    result["drain"]["default_rate_limit"] = {
                        **limited.to_json(), "rate_limit": DEFAULT_RATE_LIMIT,
                        "ratio": ratio(limited.rate, result["drain"]["median_baseline_events_per_s"])}
                if args.gc_freeze:
                    # What gc.freeze() after start-up gives (rwatch run does it): the import-time heap
                    # (~100k objects) leaves the full collections that the drain's allocations keep triggering.
                    config = fresh("frozen")
                    gc.freeze()
                    try:
                        frozen = await watcher_drain(config, backlog, args.events, sim)
                    finally:
                        gc.unfreeze()
                    await done(config)
                    result["drain"]["gc_freeze"] = {
                        **frozen.to_json(),
                        "vs_median_watcher": ratio(frozen.rate, result["drain"]["median_watcher_events_per_s"]),
                        "ratio": ratio(frozen.rate, result["drain"]["median_baseline_events_per_s"])}
                if not args.no_profile:
                    config = fresh("profile")
                    profiled = await profile_drain(config, backlog, args.events, sim, tmp, args.top)
                    await done(config)
                    if profiled is None:
                        result["profile"] = {"note": "neither py-spy nor pyinstrument: pip install -e '.[bench]'"}
                    else:
                        tool, run, summary = profiled
                        result["profile"] = {"tool": tool, "events_per_s_while_sampled": round(run.rate, 1),
                                             **summary}
        finally:
            for config in list(configs):
                with contextlib.suppress(Exception):
                    await delete_topology(config)
            await sim.stop()
        if args.idle_seconds > 0:
            async with aiohttp.ClientSession() as http:
                result["idle"] = await idle_cost(tmp, http, args.idle_seconds, f"{tag}-idle")
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    lines = []
    d = result.get("drain")
    if d:
        lines += [
            f"Drain of {d['events']} host events (window {d['publish_window']}, median of {len(d['rounds'])} rounds)",
            f"{'':36} {'events/s':>9} {'CPU us/event':>13} {'of it GC':>9} {'process cores':>14} "
            f"{'machine busy':>13}",
            *(f"{label:36} {d[f'median_{side}_events_per_s']:>9.0f} {d[f'median_{side}_cpu_us_per_event']:>13.1f} "
              f"{d[f'median_{side}_gc_share']:>9.0%} {d[f'median_{side}_cores']:>14.2f} "
              f"{d[f'median_{side}_machine_busy']:>13.0%}"
              for side, label in (("watcher", "rwatch watcher (CMDB -> confirmed)"),
                                  ("baseline", "baseline: plain aio-pika publisher"))),
            f"ratio watcher/baseline: rate {d['median_ratio']:.2f} (goal >= 0.90), "
            f"CPU per event {d['median_cpu_ratio']:.2f}",
            "rounds: " + ", ".join(f"{x['ratio']:.2f}" for x in d["rounds"]),
        ]
        if "default_rate_limit" in d:
            lim = d["default_rate_limit"]
            rate = lim["rate_limit"]
            lines.append(f"with the default cmdb.rate_limit = {rate:g}/s: {lim['events_per_s']:.0f} events/s, "
                         f"ratio {lim['ratio']:.2f} (capped at {rate:g} x 200 = {rate * 200:.0f} events/s)")
        if "gc_freeze" in d:
            fr = d["gc_freeze"]
            lines.append(f"with gc.freeze() after start-up (one run): {fr['events_per_s']:.0f} events/s, "
                         f"{fr['cpu_us_per_event']:.1f} CPU us/event ({fr['gc_share_of_cpu']:.0%} GC), "
                         f"x{fr['vs_median_watcher']:.2f} the median watcher, ratio {fr['ratio']:.2f}")
    i = result.get("idle")
    if i:
        lines += [
            "",
            f"Idle, {len(i['resources'])} resources, 20 s hold, {i['window_s']:.0f} s window",
            f"CMDB requests per resource per minute: {i['requests_per_resource_per_min']:.2f} "
            f"(minimum {i['minimum_per_resource_per_min']:.0f}, ratio {i['requests_vs_minimum']:.2f}; goal <= 3.5)",
            f"rwatch CPU s per resource per minute:  {i['cpu_s_per_resource_per_min']:.4f} (goal <= 0.1); "
            f"start-up {i['startup_cpu_s']:.2f} CPU s",
        ]
    p = result.get("profile")
    if p and "self" in p:
        lines += ["", f"Profile of one drain ({p['tool']}, {p['events_per_s_while_sampled']:.0f} events/s while "
                  f"sampled): {p['busy_seconds']:.1f} s busy (not waiting in epoll). Self time by package:"]
        lines += [f"  {x['share_of_busy']:6.1%}  {x['function']}" for x in p["by_package"][:10]]
        lines += ["top functions by self time:"]
        lines += [f"  {x['share_of_busy']:6.1%}  {x['function']}" for x in p["self"][:15]]
        lines += ["rwatch functions, inclusive:"]
        lines += [f"  {x['share_of_busy']:6.1%}  {x['function']}" for x in p["rwatch_inclusive"][:12]]
    elif p:
        lines += ["", f"Profile: {p['note']}"]
    lines.append(f"\n(total {result['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def revision() -> str:
    """The commit measured, ``+dirty`` when the work tree has changes."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="backlog size (host updates)")
    parser.add_argument("--rounds", type=int, default=3, help="watcher/baseline pairs, order alternating")
    parser.add_argument("--hosts", type=int, default=1000, help="hosts in the simulator's topology")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window (0 skips; keep a multiple of 20)")
    parser.add_argument("--no-profile", action="store_true", help="skip the pyinstrument drain")
    parser.add_argument("--rate-limited", action=argparse.BooleanOptionalAction, default=True,
                        help="also drain once with the default cmdb.rate_limit")
    parser.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="also drain once with the start-up heap frozen (gc.freeze)")
    parser.add_argument("--top", type=int, default=20, help="profile rows to keep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def run_bench(
    parse_args: Callable[[], argparse.Namespace],
    main: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    report: Callable[[dict[str, Any]], str],
) -> None:
    """The command every benchmark is: run it, write the JSON (with the git revision), print the table."""
    arguments = parse_args()
    setup_logging("warning", "console", stream=sys.stderr)
    outcome = {"revision": revision(), **asyncio.run(main(arguments))}
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(report(outcome))
    print(f"wrote {arguments.out}", file=sys.stderr)


if __name__ == "__main__":
    run_bench(parse_args, main, report)
