"""No configuration can wedge a watcher (issue 12, point 8).

A resource whose events no sink of the configuration takes, or a ``--role watcher`` with no sink at all, is refused
at start: exit 2, naming the key, the file and the fix (``bus.publish_only`` is the explicit mode for consumers that
live elsewhere, tested in ``tests/integration/test_publish_only.py``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.entrypoint import RWATCH

# Nothing listens here: a refused configuration must be refused before rwatch touches the broker or CMDB.
NOWHERE = 'base_url = "http://127.0.0.1:1"\n'


def write(tmp_path: Path, body: str, bus: str = 'kind = "amqp"\nurl = "amqp://guest:guest@127.0.0.1:1/"') -> Path:
    path = tmp_path / "rwatch.toml"
    path.write_text(f"""[cmdb]
{NOWHERE}
[watch.resources.host]
enabled = true
[watch.resources.host_relation]
enabled = false
[watch.resources.biz]
enabled = true
[watch.resources.set]
enabled = false
[watch.resources.module]
enabled = false
[bus]
{bus}
[store]
url = "sqlite:///{tmp_path}/state.db"
[http]
listen = "127.0.0.1:0"
{body}""")
    return path


def rwatch(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWATCH_")}
    return subprocess.run([RWATCH, *args], capture_output=True, text=True, timeout=60, env=env)


MIRROR_FOR_HOST = '[sinks.m]\nkind = "mirror"\nurl = "sqlite:///{tmp}/m.db"\nresources = ["host"]\n'


@pytest.mark.parametrize(("case", "role", "key", "words"), [
    # A watcher whose configuration names no sink: every publish would be returned, retried for ever.
    ("no_sink", "watcher", "[sinks]", ["no enabled sink", "bus.publish_only = true"]),
    ("no_sink", "all", "[sinks]", ["no enabled sink", "bus.publish_only = true"]),
    # biz is followed, but the only sink takes host alone: biz would wait for a queue for ever.
    ("host_only_sink", "all", "[watch.resources.biz.enabled]",
     ["'biz' is followed but no enabled sink takes it", "sinks.m.resources = ['host']", "bus.publish_only"]),
    ("host_only_sink", "watcher", "[watch.resources.biz.enabled]", ["no enabled sink takes it"]),
    # With the memory bus the same watcher used to crash and restart in a loop.
    ("host_only_sink_memory", "all", "[watch.resources.biz.enabled]", ["no enabled sink takes it"]),
])
def test_a_configuration_that_would_wedge_a_watcher_is_refused_at_start(
        tmp_path: Path, case: str, role: str, key: str, words: list[str]) -> None:
    sink = "" if case == "no_sink" else MIRROR_FOR_HOST.format(tmp=tmp_path)
    path = write(tmp_path, sink, 'kind = "memory"') if case.endswith("memory") else write(tmp_path, sink)
    for command in (["run", "--role", role], ["check-config", "--role", role]):
        proc = rwatch(*command, "--config", str(path))
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert f"{path}: {key}" in proc.stderr, proc.stderr
        for word in words:
            assert word in proc.stderr, proc.stderr
    assert not (tmp_path / "state.db").exists()  # refused before anything was opened


def test_the_same_configurations_are_fine_where_they_wedge_nothing(tmp_path: Path) -> None:
    # A consumer does not publish; publish_only says the consumers are configured elsewhere.
    path = write(tmp_path, MIRROR_FOR_HOST.format(tmp=tmp_path))
    assert rwatch("check-config", "--role", "consumer", "--config", str(path)).returncode == 0
    path = write(tmp_path, "", 'kind = "amqp"\npublish_only = true')
    proc = rwatch("check-config", "--role", "watcher", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "publish_only = true" in proc.stdout
    # publish_only means nothing to the memory bus: its only consumers are this process's sinks.
    path = write(tmp_path, MIRROR_FOR_HOST.format(tmp=tmp_path), 'kind = "memory"\npublish_only = true')
    proc = rwatch("check-config", "--config", str(path))
    assert proc.returncode == 2 and f"{path}: [bus.publish_only]" in proc.stderr, proc.stderr
