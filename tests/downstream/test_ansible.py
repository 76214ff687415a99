"""Real ansible-core reads the mirror: through the one-line wrapper around ``rwatch inventory``, and through the
ansible_inventory sink's file, every live host shows under its module's group, and nothing else does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rwatch.config import Config, load_config
from rwatch.sinks.registry import make_sink
from tests.downstream.instances import require
from tests.sinks.test_ansible import fill_mirror

BIN = Path(sys.executable).parent
ANSIBLE_INVENTORY = BIN / "ansible-inventory"
RWATCH = BIN / "rwatch"
GROUPS = {"all", "bk_biz_2", "bk_biz_3", "bk_set_20", "bk_set_30", "bk_module_21", "bk_module_22",
          "bk_module_31"}


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def ansible_inventory(source: Path, *args: str) -> str:
    env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(source.parent / "ansible-tmp"), "ANSIBLE_HOME": str(source.parent / "ansible")}
    out = subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(source), *args], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def graph_parents(graph: str) -> dict[str, set[str]]:
    """``--graph`` as host -> the groups it is drawn directly under (groups are ``@name:``, hosts bare; each level
    indents by three characters, ``  |--`` at the first)."""
    parents: dict[str, set[str]] = {}
    stack: list[str] = []
    for line in graph.splitlines():
        depth = line.index("|--") // 3 + 1 if "|--" in line else 0
        name = line.rpartition("|--")[2].strip()
        del stack[depth:]
        if name.startswith("@"):
            stack.append(name[1:].removesuffix(":"))
        else:
            parents.setdefault(name, set()).add(stack[-1])
    return parents


def hosts_by_group(listing: dict[str, Any]) -> dict[str, set[int]]:
    placed: dict[str, set[int]] = {}
    for name, group in listing.items():
        for host in group.get("hosts", []) if isinstance(group, dict) else []:
            assert name.startswith("bk_module_"), f"{host} is directly in {name}, not in a module group"
            placed.setdefault(host, set()).add(int(name.removeprefix("bk_module_")))
    return placed


@pytest.fixture
async def mirror_config(tmp_path: Path) -> tuple[Path, dict[str, set[int]]]:
    require(ANSIBLE_INVENTORY.is_file(), f"{ANSIBLE_INVENTORY} is not installed (pip install -e '.[dev]')")
    expected = await fill_mirror(f"sqlite:///{tmp_path}/m.db")
    path = tmp_path / "config.toml"
    path.write_text(f'[sinks.mirror]\nkind = "mirror"\nurl = "sqlite:///{tmp_path}/m.db"\n'
                    f'[sinks.inventory]\nkind = "ansible_inventory"\nfile = "{tmp_path}/out/inventory.json"\n')
    return path, expected


def check(listing: dict[str, Any], graph: str, expected: dict[str, set[int]]) -> None:
    # Nothing else: no group of a deleted host or of a removed relation (Ansible leaves out an empty ungrouped).
    assert set(listing) - {"_meta", "ungrouped"} == GROUPS
    assert set(listing["_meta"]["hostvars"]) == set(expected)
    assert hosts_by_group(listing) == expected
    assert listing["_meta"]["hostvars"]["bk-3"]["ansible_host"] == "10.0.0.3"
    assert listing["_meta"]["hostvars"]["bk-3"]["bk_host_id"] == 3
    parents = graph_parents(graph)
    assert parents == {host: {f"bk_module_{m}" for m in modules} for host, modules in expected.items()}
    assert "@bk_biz_2:" in graph and "|--@bk_set_20:" in graph


def test_ansible_reads_rwatch_inventory_through_a_one_line_wrapper(
        tmp_path: Path, mirror_config: tuple[Path, dict[str, set[int]]]) -> None:
    require(RWATCH.is_file(), f"{RWATCH} is not installed (pip install -e .)")
    config, expected = mirror_config
    # The README's wrapper, with this virtualenv's rwatch.
    wrapper = executable(tmp_path / "rwatch-inventory", f'#!/bin/sh\nexec {RWATCH} inventory --config {config} "$@"\n')
    listing = json.loads(ansible_inventory(wrapper, "--list"))
    check(listing, ansible_inventory(wrapper, "--graph"), expected)
    host = json.loads(ansible_inventory(wrapper, "--host", "bk-3"))
    assert host["ansible_host"] == "10.0.0.3" and host["bk_module_id"] in (22, 31)  # group vars merged in


async def write_file(config_path: Path) -> None:
    """What ``rwatch run`` does with an ansible_inventory sink, once: open (the first projection), close."""
    config: Config = load_config(config_path)
    mirror = make_sink("mirror", config)
    sink = make_sink("inventory", config, {"mirror": mirror})
    await mirror.open()
    await sink.open()
    await sink.close()
    await mirror.close()


def test_ansible_reads_the_sinks_file_through_cat(
        tmp_path: Path, mirror_config: tuple[Path, dict[str, set[int]]]) -> None:
    config_path, expected = mirror_config
    asyncio.run(write_file(config_path))
    file = tmp_path / "out" / "inventory.json"
    wrapper = executable(tmp_path / "inventory-file", f"#!/bin/sh\nexec cat {file}\n")
    listing = json.loads(ansible_inventory(wrapper, "--list"))
    check(listing, ansible_inventory(wrapper, "--graph"), expected)
    # The script JSON is not the yaml plugin's format: given as is, Ansible refuses the file.
    env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1", "ANSIBLE_HOME": str(tmp_path / "ansible")}
    refused = subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(file), "--list"], capture_output=True, text=True,
                             env=env, timeout=120, check=False)
    assert refused.returncode != 0
