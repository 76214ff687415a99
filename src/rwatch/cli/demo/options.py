"""The demo's options, its files in one folder, its port, and the rwatch configuration it embeds."""

from __future__ import annotations

import contextlib
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    from rwatch.cli.demo.zabbix import DemoZabbix
    from rwatch.config import Config

DEFAULT_PORT = 9108
SINK = "mirror"
ACTIONS = ("create", "update", "delete")
# Files the demo owns in its folder; they are replaced at every start (the simulator starts afresh too).
MIRROR_FILE = "demo-mirror.db"
STATE_FILE = "demo-state.db"
TARGETS_FILE = "demo-targets.json"
LOG_FILE = "demo.log"


class DemoError(Exception):
    """A reason the demo cannot start, said in one line."""


@dataclass(frozen=True)
class DemoFiles:
    folder: Path

    @property
    def mirror(self) -> Path:
        return self.folder / MIRROR_FILE

    @property
    def state(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def targets(self) -> Path:
        return self.folder / TARGETS_FILE

    @property
    def log(self) -> Path:
        return self.folder / LOG_FILE

    def clear(self) -> None:
        """Start afresh: a cursor or a row from an earlier demo means nothing to this run's new simulator."""
        for db in (self.mirror, self.state):
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    db.with_name(db.name + suffix).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.targets.unlink()


@dataclass
class DemoOptions:
    amqp_url: str | None
    rate: float
    seconds: float
    port: int
    files: DemoFiles
    live: bool
    zabbix: DemoZabbix | None = None  # --zabbix: a zabbix sink fed by the mirror
    unique: str = field(default_factory=lambda: uuid.uuid4().hex[:10])


def choose_port(port: int | None) -> int:
    """The port to serve on: the one asked for (checked free now, for a clear message), else 9108 when it is
    free, else 0 (any)."""
    wanted = DEFAULT_PORT if port is None else port
    if wanted == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like aiohttp's listener: a port in TIME_WAIT after an earlier run is free to reuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", wanted))
        except OSError:
            if port is None:
                return 0
            raise
    return wanted


def demo_config(options: DemoOptions, sim_url: str) -> Config:
    """rwatch's embedded configuration for the demo."""
    from rwatch.config import Config

    files = options.files
    bus: dict[str, Any] = {"kind": "memory"}
    if options.amqp_url is not None:
        # Never the real "cmdb" exchange or "rwatch" queues: a name of this run's own, deleted at exit.
        name = f"rwatch-demo-{options.unique}"
        bus = {"kind": "amqp", "url": options.amqp_url, "exchange": name, "queue_prefix": name}
    sinks: dict[str, Any] = {
        SINK: {"kind": "mirror", "url": f"sqlite:///{files.mirror}"},
        "targets": {"kind": "prom_sd", "source": SINK, "file": str(files.targets),
                    "jobs": [{"name": "node", "port": 9100}]},
    }
    if options.zabbix is not None:
        from rwatch.cli.demo.zabbix import SINK as ZABBIX_SINK

        sinks[ZABBIX_SINK] = options.zabbix.sink(SINK)
    return Config.model_validate({
        "cmdb": {"base_url": sim_url, "rate_limit": 0},
        "watch": {"bootstrap": "now"},
        "bus": bus,
        "store": {"url": f"sqlite:///{files.state}"},
        "sinks": sinks,
        "http": {"listen": f"127.0.0.1:{options.port}"},
        "log": {"level": "info", "format": "json"},
    })
