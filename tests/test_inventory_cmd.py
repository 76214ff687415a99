"""``rwatch inventory``: the dynamic inventory script contract over a real SQLite mirror, and its exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwatch.cli import app
from tests.sinks.test_ansible import fill_mirror

runner = CliRunner()


def config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[sinks.mirror]\nkind = "mirror"\nurl = "sqlite:///{tmp_path}/m.db"\n{extra}')
    return path


@pytest.fixture
async def filled(tmp_path: Path) -> dict[str, set[int]]:
    return await fill_mirror(f"sqlite:///{tmp_path}/m.db")


def test_list_prints_every_live_host_under_its_module(tmp_path: Path, filled: dict[str, set[int]]) -> None:
    result = runner.invoke(app, ["inventory", "--config", str(config(tmp_path)), "--list"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # nothing but JSON on stdout
    assert set(doc["_meta"]["hostvars"]) == set(filled)
    placed: dict[str, set[int]] = {}
    for name, group in doc.items():
        for host in group.get("hosts", []):
            placed.setdefault(host, set()).add(int(name.removeprefix("bk_module_")))
    assert placed == filled
    assert doc["bk_biz_3"]["vars"] == {"bk_biz_id": 3, "bk_biz_name": "blog team"}
    assert not any(name.startswith("module_") for name in doc)  # default options: no alias groups


def test_host_prints_its_vars_and_an_empty_object_for_a_stranger(tmp_path: Path,
                                                                 filled: dict[str, set[int]]) -> None:
    path = str(config(tmp_path))
    result = runner.invoke(app, ["inventory", "--config", path, "--host", "bk-3"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"ansible_host": "10.0.0.3", "bk_host_id": 3, "bk_cloud_id": 0}
    result = runner.invoke(app, ["inventory", "--config", path, "--host", "bk-5"])  # deleted
    assert result.exit_code == 0 and json.loads(result.stdout) == {}


def test_an_inventory_sink_gives_its_options_and_mirror(tmp_path: Path, filled: dict[str, set[int]]) -> None:
    extra = ('[sinks.inv]\nkind = "ansible_inventory"\nfile = "inv.json"\nalias_groups = true\n'
             'hostvars = ["bk_os_type"]\nhost_name = "{bk_host_name}"\n')
    result = runner.invoke(app, ["inventory", "--config", str(config(tmp_path, extra)), "--list"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["_meta"]["hostvars"]["h3"] == {"bk_os_type": "1", "ansible_host": "10.0.0.3", "bk_host_id": 3,
                                              "bk_cloud_id": 0}
    assert doc["module_nginx"] == {"children": ["bk_module_21", "bk_module_31"]}
    assert doc["biz_blog_team"] == {"children": ["bk_biz_3"]}
    # --sink naming the mirror: its default options instead.
    result = runner.invoke(app, ["inventory", "--config", str(config(tmp_path, extra)), "--sink", "mirror",
                                 "--host", "bk-3"])
    assert result.exit_code == 0 and json.loads(result.stdout)["bk_host_id"] == 3


@pytest.mark.parametrize(("args", "extra", "said"), [
    (["--list"], '[sinks.inv]\nkind = "ansible_inventory"\nfile = "x.json"\nhost_name = "{oops}"\n',
     "sinks.inv.host_name"),
    (["--list", "--sink", "nope"], "", "sinks.nope"),
    ([], "", "--list or --host"),
    (["--list", "--host", "x"], "", "--list or --host"),
])
def test_bad_usage_exits_2_naming_the_key(tmp_path: Path, args: list[str], extra: str, said: str) -> None:
    result = runner.invoke(app, ["inventory", "--config", str(config(tmp_path, extra)), *args])
    assert result.exit_code == 2
    assert said in result.stderr and result.stdout == ""


def test_a_mirror_that_cannot_be_read_exits_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inventory", "--config", str(config(tmp_path)), "--list"])
    assert result.exit_code == 1
    assert "m.db does not exist" in result.stderr and result.stdout == ""
    assert not (tmp_path / "m.db").exists()  # not created empty
    (tmp_path / "m.db").write_text("not a database")
    result = runner.invoke(app, ["inventory", "--config", str(config(tmp_path)), "--list"])
    assert result.exit_code == 1 and "cannot read the mirror" in result.stderr and result.stdout == ""
