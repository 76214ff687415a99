"""The real downstream systems answer as the sinks of issue 14 will need: Zabbix 6.0's API creates and deletes groups
and hosts, Prometheus follows a file_sd file, ansible-inventory runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.downstream.instances import Prometheus, Zabbix, ZabbixError, free_port, require

ANSIBLE_INVENTORY = Path(sys.executable).with_name("ansible-inventory")
# Prometheus' discovery manager hands target updates on at most every 5 s; the file's refresh_interval is 10 s.
TARGETS_WITHIN = 10.0


def test_zabbix_is_6_0(zabbix: Zabbix) -> None:
    assert zabbix.version.startswith("6.0."), zabbix.version
    assert zabbix.call("apiinfo.version") == zabbix.version  # and the fixture's token is not sent with it
    assert zabbix.call("user.checkAuthentication", {"sessionid": zabbix.token})["username"] == "Admin"


def test_zabbix_creates_and_deletes_a_group_and_a_host(zabbix: Zabbix, unique: str) -> None:
    name = f"rwatch-smoke-{unique}"
    groupid = zabbix.call("hostgroup.create", {"name": f"{name}/module"})["groupids"][0]
    try:
        with pytest.raises(ZabbixError) as exists:
            zabbix.call("hostgroup.create", {"name": f"{name}/module"})
        assert "already exists" in exists.value.data

        hostid = zabbix.call(
            "host.create",
            {
                "host": name,
                "name": f"{name} visible",
                "groups": [{"groupid": groupid}],
                "interfaces": [{"type": 1, "main": 1, "useip": 1, "ip": "127.0.0.1", "dns": "", "port": "10050"}],
                "tags": [{"tag": "bk_host_id", "value": "1"}, {"tag": "rwatch"}],
            },
        )["hostids"][0]
        try:
            [host] = zabbix.call(
                "host.get",
                {"hostids": [hostid], "output": ["host", "name"], "selectGroups": ["name"], "selectTags": "extend",
                 "selectInterfaces": ["ip"]},
            )
            assert (host["host"], host["name"]) == (name, f"{name} visible")
            assert [g["name"] for g in host["groups"]] == [f"{name}/module"]
            assert {(t["tag"], t["value"]) for t in host["tags"]} == {("bk_host_id", "1"), ("rwatch", "")}
            assert [i["ip"] for i in host["interfaces"]] == ["127.0.0.1"]
            found = zabbix.call("host.get", {"tags": [{"tag": "bk_host_id", "value": "1", "operator": 1}],
                                             "groupids": [groupid], "output": ["hostid"]})
            assert [h["hostid"] for h in found] == [hostid]
        finally:
            zabbix.call("host.delete", [hostid])
        assert zabbix.call("host.get", {"hostids": [hostid]}) == []
        with pytest.raises(ZabbixError):  # deleting what is gone is an error answer, which the sink must absorb
            zabbix.call("host.delete", [hostid])
    finally:
        zabbix.call("hostgroup.delete", [groupid])
    assert zabbix.call("hostgroup.get", {"filter": {"name": [f"{name}/module"]}}) == []


def test_prometheus_lists_a_file_sd_target(prometheus: Prometheus) -> None:
    assert prometheus.targets() == []
    assert prometheus.file_sd
    sd = prometheus.file_sd / "rwatch.json"
    # A local port nobody listens on: Prometheus scrapes what it lists, and only loopback may be scraped here.
    address = f"127.0.0.1:{free_port()}"
    groups = [{"targets": [address], "labels": {"bk_host_id": "1", "bk_biz_name": "smoke"}}]
    tmp = sd.with_suffix(".tmp")  # written then renamed, as a sink does, so Prometheus never reads half a file
    tmp.write_text(json.dumps(groups))
    tmp.rename(sd)
    written = time.monotonic()
    while not (targets := prometheus.targets()) and time.monotonic() - written < TARGETS_WITHIN:
        time.sleep(0.2)  # nothing to await in another process; its API is the only way to see
    assert len(targets) == 1, f"no target {TARGETS_WITHIN} s after the file was written"
    [target] = targets
    assert target["scrapeUrl"] == f"http://{address}/metrics"
    assert target["labels"]["job"] == "rwatch"
    assert target["labels"] | groups[0]["labels"] == target["labels"]  # the file's labels, as written


def test_ansible_inventory_runs() -> None:
    require(ANSIBLE_INVENTORY.is_file(), f"{ANSIBLE_INVENTORY} is not installed (pip install -e '.[dev]')")
    out = subprocess.run([str(ANSIBLE_INVENTORY), "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.startswith("ansible-inventory [core 2.")
