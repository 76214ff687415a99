"""Real Zabbix and Prometheus processes for the tests: each on a free local port, waited for, stopped by process group.

`.ci/downstream.sh` installs both from Debian's packages and loads Zabbix's schema; here they only run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ZABBIX_ROOT = Path("/usr/share/zabbix")
ZABBIX_CONF = Path("/etc/zabbix/zabbix.conf.php")
ZABBIX_ADMIN = ("Admin", "zabbix")  # the account data.sql creates
# php -S serves one request at a time per worker; a sink test calling the API from several tasks wants more than one.
PHP_WORKERS = 2
STARTUP_SECONDS = 30.0
# Zabbix refuses a token on these ("must be called without the auth parameter").
NO_AUTH = frozenset({"apiinfo.version", "user.login", "user.checkAuthentication"})

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
T = TypeVar("T")


def require(ok: bool, what: str) -> None:
    """Skip the test when a system is missing, or fail it under CI=true, as tests/conftest.py does for its servers."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} and CI=true: the real-instance suite must run (.ci/downstream.sh installs it)")
    pytest.skip(f"{what} (.ci/downstream.sh installs it)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A process in a session of its own, so that stopping it also stops the workers it forked (php -S does)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_until(self, probe: Callable[[], T | None], seconds: float = STARTUP_SECONDS) -> T:
        """Poll `probe` until it returns something, failing early (with the log) if the process died."""
        deadline = time.monotonic() + seconds
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                got = probe()
            except (OSError, ValueError) as exc:  # refused, reset, not JSON yet
                last, got = exc, None
            if got is not None:
                return got
            time.sleep(0.1)  # an external process: nothing to await but its port
        raise RuntimeError(f"{self.name} not ready within {seconds} s (last: {last!r}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # workers can outlive their leader; the group id is ours
            os.killpg(self.proc.pid, signal.SIGKILL)


def _post_json(url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 30.0) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json-rpc", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class ZabbixError(Exception):
    """An error answer of Zabbix's JSON-RPC API ("already exists" and "does not exist" come as these)."""

    def __init__(self, method: str, code: int, message: str, data: str) -> None:
        super().__init__(f"{method}: {code} {message} {data}")
        self.method, self.code, self.message, self.data = method, code, message, data


def zabbix_rpc(url: str, method: str, params: Any, token: str | None = None, bearer: bool = False) -> Any:
    """One JSON-RPC call; 6.0 takes the token in the body, 6.4 and later in an Authorization header."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    headers = {}
    if token and bearer:
        headers["Authorization"] = f"Bearer {token}"
    elif token:
        body["auth"] = token
    answer = _post_json(url, body, headers)
    if "error" in answer:
        err = answer["error"]
        raise ZabbixError(method, err.get("code", 0), err.get("message", ""), err.get("data", ""))
    return answer["result"]


@dataclass
class Zabbix:
    """The real Zabbix API, logged in as Admin: `call(method, params)` returns the result or raises ZabbixError."""

    url: str  # the API endpoint, .../api_jsonrpc.php
    version: str
    token: str = ""
    server: Server | None = field(default=None, repr=False)

    @property
    def bearer(self) -> bool:
        major, minor = (int(part) for part in self.version.split(".")[:2])
        return (major, minor) >= (6, 4)

    def call(self, method: str, params: Any = None) -> Any:
        token = None if method in NO_AUTH else self.token or None
        return zabbix_rpc(self.url, method, {} if params is None else params, token, self.bearer)


def start_zabbix(workdir: Path, workers: int = PHP_WORKERS) -> Zabbix:
    """Serve the Zabbix frontend with php's own server (``workers`` requests at a time), wait for its API, log in."""
    port = free_port()
    server = Server(
        "zabbix frontend (php -S)",
        ["php", "-d", "date.timezone=UTC", "-S", f"127.0.0.1:{port}", "-t", str(ZABBIX_ROOT)],
        workdir / "php.log",
        env={"PHP_CLI_SERVER_WORKERS": str(workers)},
    )
    url = f"http://127.0.0.1:{port}/api_jsonrpc.php"
    try:
        version: str = server.wait_until(lambda: zabbix_rpc(url, "apiinfo.version", {}))
        zabbix = Zabbix(url, version, server=server)
        user, password = ZABBIX_ADMIN
        zabbix.token = zabbix.call("user.login", {"username": user, "password": password})
    except BaseException:
        server.stop()
        raise
    return zabbix


def stop_zabbix(zabbix: Zabbix) -> None:
    try:
        if zabbix.token:
            zabbix.call("user.logout", [])  # else the session stays active in the database every run shares
    finally:
        if zabbix.server:
            zabbix.server.stop()


@dataclass
class Prometheus:
    """A real Prometheus: `url` is its web root (`/api/v1/...`, `/-/reload`)."""

    url: str
    config: Path
    server: Server = field(repr=False)
    file_sd: Path | None = None  # the folder whose *.json files its file_sd job reads, when it has one

    def targets(self) -> list[dict[str, Any]]:
        """The active targets, as /api/v1/targets lists them (labels, discoveredLabels, health, ...)."""
        answer = _get_json(f"{self.url}/api/v1/targets?state=active")
        found: list[dict[str, Any]] = answer["data"]["activeTargets"]
        return found

    def reload(self) -> None:
        """Re-read `config` (started with --web.enable-lifecycle)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/-/reload", method="POST"), timeout=10).close()


def start_prometheus(workdir: Path, scrape_configs: list[dict[str, Any]], scrape_interval: str = "1s") -> Prometheus:
    """Start Prometheus with these scrape_configs (JSON is YAML, so no YAML writer needed), data under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": scrape_interval}, "scrape_configs": scrape_configs}))
    port = free_port()
    server = Server(
        "prometheus",
        [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn",
        ],
        workdir / "prometheus.log",
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool | None:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
                return True if response.status == 200 else None
        except urllib.error.HTTPError:  # 503 while it replays its (empty) WAL
            return None

    try:
        server.wait_until(ready)
    except BaseException:
        server.stop()
        raise
    return Prometheus(url, config, server)
