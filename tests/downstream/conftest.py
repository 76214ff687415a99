"""Fixtures for the real downstream systems: Zabbix 6.0's API for the session, Prometheus per test.

As with RabbitMQ and PostgreSQL (tests/conftest.py), a system that is not installed skips its tests locally and fails
them with CI=true: `.ci/downstream.sh` installs them, and CI must never go green by skipping them.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rwatch.sinks.zabbix.desired import ZabbixOptions
from tests.downstream.instances import (
    ZABBIX_CONF,
    ZABBIX_ROOT,
    Prometheus,
    Zabbix,
    require,
    start_prometheus,
    start_zabbix,
    stop_zabbix,
)
from tests.downstream.side import Side
from tests.integration.conftest import setups  # noqa: F401  (rwatch setups, for the end-to-end runs)

StartPrometheus = Callable[..., Prometheus]


def _postgres_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def zabbix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zabbix]:
    """The real Zabbix API (frontend under `php -S`), logged in as Admin, shared by the session: tests name what
    they create uniquely and delete it themselves."""
    require(shutil.which("php") is not None, "php is not installed")
    require((ZABBIX_ROOT / "api_jsonrpc.php").is_file(), f"the Zabbix frontend is not in {ZABBIX_ROOT}")
    require(ZABBIX_CONF.is_file(), f"{ZABBIX_CONF} is missing (the schema is not loaded)")
    require(_postgres_answers(), "PostgreSQL, Zabbix's database, is not reachable at 127.0.0.1:5432")
    instance = start_zabbix(tmp_path_factory.mktemp("zabbix"))
    try:
        yield instance
    finally:
        stop_zabbix(instance)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[StartPrometheus]:
    """Start real Prometheus servers: `start(scrape_configs)` returns one on a free port, its config and data under
    tmp_path; all stop at the end of the test."""
    require(shutil.which("prometheus") is not None, "prometheus is not installed")
    started: list[Prometheus] = []

    def start(scrape_configs: list[dict[str, Any]], **kw: Any) -> Prometheus:
        instance = start_prometheus(tmp_path / f"prometheus-{len(started)}", scrape_configs, **kw)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.server.stop()


@pytest.fixture
def prometheus(prometheus_factory: StartPrometheus, tmp_path: Path) -> Prometheus:
    """A real Prometheus reading the files `prometheus.file_sd / "*.json"` (refresh_interval 10 s: inotify sees a
    rename at once, the interval is the fallback)."""
    sd = tmp_path / "file_sd"
    sd.mkdir()
    job = {"job_name": "rwatch", "file_sd_configs": [{"files": [str(sd / "*.json")], "refresh_interval": "10s"}]}
    instance = prometheus_factory([job])
    instance.file_sd = sd
    return instance


@pytest.fixture
def side(zabbix: Zabbix, options: ZabbixOptions) -> Iterator[Side]:
    """The test's view of the managed part of Zabbix under its ``options`` (each module's fixture), removed after."""
    view = Side(zabbix, options)
    try:
        yield view
    finally:
        view.cleanup()
