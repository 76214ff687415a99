"""rwatch as an operator runs it: child processes under a supervisor that restarts whatever dies.

Every exit is checked against what the nemesis did to the process: SIGKILL (by the nemesis or by an armed
fail point) must end in -9, SIGTERM in 0 within ``shutdown_timeout``; anything else (a crash, exit 1, a
clean stop that overran) is an unexpected exit and fails the round. Processes come back like a service
manager would bring them back (``Restart=always``), after ``RESTART_DELAY``, unless the nemesis holds them
down (the clock-jump step keeps the watchers down while CMDB's history expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import Daemon, Setup

RESTART_DELAY = 0.2
SHUTDOWN_TIMEOUT = 8.0  # rwatch's default [run] shutdown_timeout: SIGTERM must exit 0 within it
TERM_SLACK = 2.0  # interpreter teardown after the daemon returned


@dataclass
class Exit:
    proc: str
    code: int
    expected: str | None  # kill, term, fail point spec, or None (nobody asked it to exit)
    seconds: float | None  # for a SIGTERM: from the signal to the exit
    ok: bool


@dataclass
class Proc:
    name: str
    role: str
    daemon: Daemon
    expect: str | None = None  # what the next exit must look like: "kill", "term", or a fail point spec
    armed: str | None = None  # RWATCH_FAILPOINTS for the next start
    down: bool = False  # held down by the nemesis: not restarted
    paused: bool = False
    term_sent: float | None = None
    starts: int = 0
    log_offset: int = 0  # where this run's lines begin in the (appended) log
    rss_max_kb: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        proc = self.daemon.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def rss_kb(self) -> int:
        pid = self.pid
        if pid is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


class Cluster:
    """The round's rwatch processes and their supervisor."""

    def __init__(self, setup: Setup, roles: list[tuple[str, str]], log_dir: Path) -> None:
        self.setup = setup
        self.procs: list[Proc] = []
        for name, role in roles:
            daemon = Daemon(setup, role=role)
            daemon.log = log_dir / f"rwatch-{setup.unique}-{name}.log"
            self.procs.append(Proc(name, role, daemon))
        self.exits: list[Exit] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def by_role(self, *roles: str) -> list[Proc]:
        return [p for p in self.procs if p.role in roles]

    @property
    def watchers(self) -> list[Proc]:
        return self.by_role("watcher", "all")

    @property
    def consumers(self) -> list[Proc]:
        return self.by_role("consumer", "all")

    def start(self) -> None:
        for proc in self.procs:
            self._launch(proc)
        self._task = asyncio.create_task(self._supervise(), name="chaos-supervisor")

    def _launch(self, proc: Proc) -> None:
        env = {"RWATCH_FAILPOINTS": proc.armed} if proc.armed else {}
        if proc.armed:
            proc.expect = proc.armed
        proc.armed = None
        proc.term_sent = None
        proc.paused = False
        proc.log_offset = proc.daemon.log.stat().st_size if proc.daemon.log.exists() else 0
        proc.daemon.start(env=env)
        proc.starts += 1
        proc.started.set()

    async def _supervise(self) -> None:
        while not self._closing:
            for proc in self.procs:
                self._sample(proc)
                code = proc.daemon.proc.poll() if proc.daemon.proc is not None else None
                if code is None:
                    continue
                if proc.started.is_set():
                    proc.started.clear()
                    self._record(proc, code)
                if not proc.down and not self._closing:
                    await asyncio.sleep(RESTART_DELAY)
                    self._launch(proc)
            await asyncio.sleep(0.05)

    def _sample(self, proc: Proc) -> None:
        proc.rss_max_kb = max(proc.rss_max_kb, proc.rss_kb())

    def _record(self, proc: Proc, code: int) -> None:
        expected, proc.expect = proc.expect, None
        seconds = time.monotonic() - proc.term_sent if proc.term_sent is not None else None
        if expected == "term" or (expected is not None and "=term" in expected):
            ok = code == 0 and (seconds is None or seconds <= SHUTDOWN_TIMEOUT + TERM_SLACK)
        elif expected is not None:  # "kill" or a kill fail point
            ok = code == -signal.SIGKILL
        else:
            ok = False
        self.exits.append(Exit(proc.name, code, expected, None if seconds is None else round(seconds, 2), ok))

    # --- what the nemesis does to processes -----------------------------------------------------------------

    async def ready(self, proc: Proc, timeout: float = 15.0, event: str = "startup") -> None:
        """Running and past start-up (``startup`` logged: the signal handlers are in place), or past ``event``.
        A SIGTERM before start-up is the interpreter's default action (death by it), not rwatch's clean stop."""
        deadline = time.monotonic() + timeout
        while True:
            await self.running(proc, timeout=max(0.1, deadline - time.monotonic()))
            if self.logged(proc, event):
                return
            assert time.monotonic() < deadline, f"{proc.name} did not start within {timeout} s"
            await asyncio.sleep(0.05)

    def logged(self, proc: Proc, event: str) -> int:
        """How many times the process's current run logged ``event``."""
        try:
            return proc.daemon.log.read_bytes()[proc.log_offset:].count(f'"event":"{event}"'.encode())
        except OSError:
            return 0

    def crashes(self) -> list[str]:
        """Every ``task_crashed`` (a bug, by rwatch's own definition) in every log of the round."""
        found = []
        for proc in self.procs:
            for line in proc.daemon.log_events():
                if line.get("event") == "task_crashed":
                    last = str(line.get("exception", "")).strip().splitlines()[-1:] or ["?"]
                    found.append(f"{proc.name}: task {line.get('task')} crashed: {last[0]}")
        return found

    async def running(self, proc: Proc, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while proc.pid is None:
            assert time.monotonic() < deadline, f"{proc.name} did not come back within {timeout} s"
            await asyncio.sleep(0.05)

    def kill(self, proc: Proc) -> None:
        if proc.pid is not None:
            proc.expect = "kill"
            proc.paused = False
            proc.daemon.signal(signal.SIGKILL)  # a stopped process dies of it too

    def term(self, proc: Proc) -> None:
        if proc.pid is not None:
            proc.expect = "term"
            proc.term_sent = time.monotonic()
            proc.daemon.signal(signal.SIGTERM)

    def pause(self, proc: Proc) -> None:
        if proc.pid is not None:
            proc.paused = True
            proc.daemon.signal(signal.SIGSTOP)

    def resume(self, proc: Proc) -> None:
        if proc.paused and proc.pid is not None:
            proc.daemon.signal(signal.SIGCONT)
        proc.paused = False

    async def exited(self, proc: Proc, timeout: float) -> bool:
        """True once the process's current run has exited (and been recorded), False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while proc.started.is_set():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def heal(self) -> None:
        """Everything up, unpaused and unarmed: processes whose fail point never fired get a clean restart."""
        for proc in self.procs:
            self.resume(proc)
            proc.down = False
            proc.armed = None
        for proc in self.procs:
            await self.running(proc)
            if proc.expect not in (None, "kill", "term"):  # still armed: stop it cleanly, start it plain
                await self.ready(proc)
                if self.logged(proc, "shutdown_requested"):  # a term fail point fired: it is stopping already
                    proc.expect = "term"
                else:
                    self.term(proc)
                if not await self.exited(proc, SHUTDOWN_TIMEOUT + TERM_SLACK + 1):
                    self.kill(proc)
                    await self.exited(proc, 5)
                await self.running(proc)

    async def stop(self) -> None:
        """SIGTERM every process (invariant 6: each exits 0 within shutdown_timeout); no restarts."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for proc in self.procs:
            self.resume(proc)
            if proc.pid is not None:
                with contextlib.suppress(AssertionError):
                    await self.ready(proc)
                self.term(proc)
        for proc in self.procs:
            if proc.daemon.proc is None:
                continue
            try:
                await proc.daemon.wait(timeout=SHUTDOWN_TIMEOUT + TERM_SLACK)
            except AssertionError:
                proc.daemon.signal(signal.SIGKILL)
                await proc.daemon.wait(timeout=5)
            if proc.started.is_set():
                proc.started.clear()
                code = proc.daemon.proc.returncode
                self._record(proc, code)

    def kill_all(self) -> None:
        """Test teardown after a failure: nothing may outlive the round."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        for proc in self.procs:
            if proc.pid is not None:
                proc.daemon.signal(signal.SIGCONT)
                proc.daemon.signal(signal.SIGKILL)
