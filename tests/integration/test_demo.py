"""``rwatch demo`` as a person runs it: a child process, its printed status URL, its mirror, Ctrl-C.

Also the docker-compose.yml sanity checks (no Docker here): its services, and that the commands and the
environment it gives the image are ones ``rwatch`` accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.entrypoint import RWATCH

REPO = Path(__file__).resolve().parents[2]
FIRST_EVENT_WITHIN = 10.0  # the acceptance: events in the mirror within 10 s
EXIT_WITHIN = 10.0


class DemoProcess:
    """A child process whose stdout is read line by line in the background (it never blocks on a full pipe)."""

    def __init__(self, argv: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None,
                 shell: bool = False) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        # A session of its own: Ctrl-C in a terminal signals the whole foreground process group; so do we.
        self.proc = subprocess.Popen(
            argv if not shell else argv[0], shell=shell, cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True, executable="/bin/bash" if shell else None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (already read or still to come) matching ``pattern``."""
        regex = re.compile(pattern)
        for line in self.lines:
            if found := regex.search(line):
                return found
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
            if found := regex.search(line):
                return found
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{self.output()}")

    def drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._queue.put(None)
                return
            self.lines.append(line)

    def output(self) -> str:
        self.drain()
        return "\n".join(self.lines[-60:])

    def interrupt(self) -> None:
        """What Ctrl-C does: SIGINT to the foreground process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit within {timeout} s; output:\n{self.output()}") from None
        finally:
            self._reader.join(5)
            self.drain()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without rwatch settings (the demo has its own) nor Python path tweaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def live_hosts(mirror: Path) -> int:
    """Live host rows in the mirror, read as another team would: plain SQL on the documented table."""
    if not mirror.exists():
        return 0
    conn = sqlite3.connect(f"file:{mirror}?mode=ro", uri=True, timeout=1.0)
    try:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM rwatch_objects WHERE resource = 'host' AND NOT deleted").fetchone()
        return int(count)
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        conn.close()


def wait_for_hosts(mirror: Path, since: float, within: float = FIRST_EVENT_WITHIN) -> float:
    """Seconds from ``since`` (monotonic) until the mirror holds host rows; fails past ``within``."""
    while (elapsed := time.monotonic() - since) <= within:
        if live_hosts(mirror) > 0:
            return elapsed
        time.sleep(0.1)
    raise AssertionError(f"no host in {mirror} within {within} s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def check_running_demo(demo: DemoProcess, since: float) -> tuple[str, Path, float]:
    """The banner's URL and mirror, the mirror filled in time, the status page answering."""
    url = demo.expect(r"status page\s+(http://127\.0\.0\.1:(\d+)/)", timeout=60).group(1)
    assert not url.endswith(":0/"), "the demo must print the port it actually bound"
    mirror = Path(demo.expect(r"mirror\s+(/\S+\.db)", timeout=5).group(1))
    first = wait_for_hosts(mirror, since)
    assert http_status(url + "healthz") == 200
    # The status page at / comes with the HTTP work on the status page; until it lands / answers 404.
    # Once it has landed, this should become == 200.
    assert http_status(url) in (200, 404)
    demo.expect(r"published=\d+ applied=\d+", timeout=5)  # the per-second summary (stdout is not a terminal)
    return url, mirror, first


def run_demo(tmp: Path, *extra: str) -> DemoProcess:
    demo = DemoProcess([RWATCH, "demo", "--port", "0", "--dir", str(tmp / "demo"),
                        "--rate", "20", *extra], cwd=tmp, env=clean_env())
    try:
        _url, mirror, first = check_running_demo(demo, demo.started)
        assert mirror.parent == tmp / "demo"
        assert (tmp / "demo" / "demo.log").exists()
        print(f"demo: hosts in the mirror {first:.2f} s after the process started")
        demo.interrupt()
        assert demo.wait(EXIT_WITHIN) == 0, demo.output()
    finally:
        demo.kill()
    assert "Traceback" not in demo.output()
    assert "stopped." in demo.output()
    return demo


def test_demo_fills_the_mirror_serves_http_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    run_demo(tmp_path)
    targets = tmp_path / "demo" / "demo-targets.json"
    assert targets.exists() and '"targets"' in targets.read_text()


@pytest.mark.amqp
def test_demo_over_rabbitmq_leaves_nothing_on_the_broker(tmp_path: Path, amqp_url: str) -> None:
    demo = run_demo(tmp_path, "--amqp-url", amqp_url)
    exchange = re.search(r"exchange (rwatch-demo-[0-9a-f]+)", demo.output())
    assert exchange, demo.output()

    async def leftovers() -> list[str]:
        import aio_pika

        name = exchange.group(1)
        left = []
        conn = await aio_pika.connect(amqp_url)
        try:
            for kind, what in [("exchange", name), ("exchange", f"{name}.dlx"), ("queue", f"{name}.mirror.host"),
                               ("queue", f"{name}.mirror.dead")]:
                channel = await conn.channel()
                try:
                    if kind == "exchange":
                        await channel.get_exchange(what, ensure=True)
                    else:
                        await channel.get_queue(what, ensure=True)
                    left.append(what)
                except aio_pika.exceptions.ChannelClosed:  # NOT_FOUND: deleted, as it should be
                    pass
        finally:
            await conn.close()
        return left

    assert asyncio.run(leftovers()) == []


def test_demo_stops_by_itself_after_seconds_and_on_sigterm(tmp_path: Path) -> None:
    demo = DemoProcess([RWATCH, "demo", "--port", "0", "--dir", str(tmp_path / "a"),
                        "--seconds", "3"], cwd=tmp_path, env=clean_env())
    try:
        assert demo.wait(20) == 0, demo.output()
    finally:
        demo.kill()
    assert live_hosts(tmp_path / "a" / "demo-mirror.db") > 0
    demo = DemoProcess([RWATCH, "demo", "--port", "0", "--dir", str(tmp_path / "b")],
                       cwd=tmp_path, env=clean_env())
    try:
        demo.expect(r"published=", timeout=60)
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.wait(EXIT_WITHIN) == 0, demo.output()
    finally:
        demo.kill()


def test_demo_refuses_a_taken_port_clearly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([RWATCH, "demo", "--port", str(port), "--dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.returncode == 1
    assert f"--port {port}" in out.stderr and "--port 0" in out.stderr


# --- docker-compose.yml (no Docker here: what can be checked without it) ---------------------------------


def compose_services(text: str) -> dict[str, str]:
    """Top-level services of a compose file written in the block style ours uses: name -> its text."""
    body = text.split("\nservices:\n", 1)[1]
    body = re.split(r"\n(?=\S)", body, maxsplit=1)[0]  # up to the next top-level key
    parts = re.split(r"^  ([a-z][a-z0-9_-]*):\n", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def flow_list(service: str, key: str, indent: int = 4) -> list[str]:
    found = re.search(rf"^{' ' * indent}{key}: \[(.*)\]$", service, flags=re.M)
    assert found, f"no {key}: [...] in\n{service}"
    return [item.strip().strip('"') for item in found.group(1).split(",")]


def test_compose_runs_the_image_entrypoint_with_commands_rwatch_accepts() -> None:
    import typer
    import typer.main

    from rwatch.cli import app
    from rwatch.config import load_config

    text = (REPO / "docker-compose.yml").read_text()
    docker = (REPO / "Dockerfile").read_text()
    services = compose_services(text)
    assert set(services) == {"rabbitmq", "sim", "rwatch"}
    assert "image: rabbitmq:3.13-management" in services["rabbitmq"]
    assert flow_list(services["rabbitmq"], "test", indent=6) == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]

    # sim and rwatch run this repository's image; each command is arguments to its ENTRYPOINT ["rwatch"].
    assert 'ENTRYPOINT ["rwatch"]' in docker
    cli = typer.main.get_command(app)
    assert isinstance(cli, typer.core.TyperGroup)
    for name in ("sim", "rwatch"):
        built = re.search(r"^ +dockerfile: Dockerfile$", services[name], flags=re.M)
        assert built, f"{name}: not built from the Dockerfile"
        argv = flow_list(services[name], "command")
        root = typer.Context(cli, info_name="rwatch")
        sub, command, rest = cli.resolve_command(root, argv)
        assert command is not None and sub is not None, argv
        command.make_context(sub, rest, parent=root)  # parses the options exactly as the container would
    assert flow_list(services["rwatch"], "command") == ["run"]
    sim = flow_list(services["sim"], "command")
    assert sim[0] == "sim" and "0.0.0.0:8089" in sim

    # rwatch's environment is valid configuration over the mounted config.toml, and points at the others.
    environment = dict(re.findall(r"^      - (RWATCH_[A-Z0-9_]+)=(.*)$", services["rwatch"], flags=re.M))
    docker_env = dict(re.findall(r"(RWATCH_[A-Z0-9_]+)=(\S+)", docker))
    cfg = load_config(REPO / "config.toml", environ={**docker_env, **environment})
    assert cfg.cmdb.base_url == "http://sim:8089"
    assert cfg.bus.kind == "amqp" and "@rabbitmq:5672" in cfg.bus.url.get_secret_value()
    assert cfg.http.listen == "0.0.0.0:9108"
    assert re.search(r"condition: service_healthy", services["rwatch"])

    # The config is mounted read-only where the image reads it; the state volume is the image's VOLUME.
    volume = re.search(r'VOLUME \["([^"]+)"\]', docker)
    config_path = re.search(r"RWATCH_CONFIG=(\S+)", docker)
    assert volume and config_path
    assert re.search(rf"^      - \./config\.toml:{re.escape(config_path.group(1))}:ro$", services["rwatch"], re.M)
    assert re.search(rf"^      - rwatch-state:{re.escape(volume.group(1))}$", services["rwatch"], re.M)
    assert re.search(r"^volumes:\n(  \S+:\n)*  rwatch-state:$", text, re.M)

    with contextlib.suppress(ImportError):  # where PyYAML happens to be installed, the whole file must parse
        import yaml

        parsed = yaml.safe_load(text)
        assert set(parsed["services"]) == {"rabbitmq", "sim", "rwatch"}
        assert parsed["services"]["rwatch"]["command"] == ["run"]
