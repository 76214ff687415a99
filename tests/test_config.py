"""Configuration: defaults, environment overrides, masking, and bad input that exits 2 naming the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rwatch.config import DEFAULT_FIELDS, load_config, mask_url, parse_duration
from rwatch.errors import ConfigError
from tests.entrypoint import RWATCH

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rwatch.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid_and_carries_one_sink_of_each_kind() -> None:
    cfg = load_config(REPO / "config.toml", environ={})
    assert {s.kind for s in cfg.sinks.values()} == {"mirror", "webhook", "prom_sd", "jsonl",
                                                     "ansible_inventory", "zabbix"}
    assert cfg.watch.enabled == ["host", "host_relation", "biz", "set", "module"]
    assert cfg.watch.resources["biz"].interval == 10.0


def test_defaults_give_mandatory_fields_and_always_the_key_fields(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[watch.resources.host]\nfields = ["bk_host_name"]\n'), environ={})
    assert cfg.watch.resources["host"].fields == ["bk_host_name", "bk_host_id"]
    assert cfg.watch.resources["set"].fields == DEFAULT_FIELDS["set"]
    relation = cfg.watch.resources["host_relation"]
    assert relation.fields == [] and relation.enabled  # empty = the whole document
    assert not cfg.watch.resources["process"].enabled


def test_environment_overrides_file_and_parses_values(tmp_path: Path) -> None:
    path = write(tmp_path, "[watch.resources.biz]\ninterval = 5\n")
    cfg = load_config(path, environ={
        "RWATCH_WATCH__RESOURCES__BIZ__INTERVAL": "2m",
        "RWATCH_WATCH__RESOURCES__HOST__EVENT_TYPES": '["delete", "create"]',
        "RWATCH_CMDB__VERIFY_TLS": "false",
        "RWATCH_CMDB__APP_SECRET": "s3cret",
        "OTHER__THING": "ignored",
    })
    assert cfg.watch.resources["biz"].interval == 120.0
    assert cfg.watch.resources["host"].event_types == ["create", "delete"]
    assert cfg.cmdb.verify_tls is False
    assert cfg.cmdb.app_secret.get_secret_value() == "s3cret"


def test_secrets_are_masked_everywhere() -> None:
    cfg = load_config(REPO / "config.toml", environ={
        "RWATCH_CMDB__APP_SECRET": "s3cret-app",
        "RWATCH_BUS__URL": "amqp://rw:s3cret-amqp@mq:5672/vh",
        "RWATCH_STORE__URL": "postgresql://rw:s3cret-pg@db/rwatch",
    })
    text = repr(cfg) + str(cfg.masked()) + str(cfg.model_dump())
    for secret in ("s3cret-app", "s3cret-amqp", "s3cret-pg", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"):
        assert secret not in text
    assert cfg.masked()["bus"]["url"] == "amqp://rw:***@mq:5672/vh"


ZBX = "[sinks.mirror]\nkind = 'mirror'\n[sinks.z]\nkind = 'zabbix'\nurl = 'http://z/api_jsonrpc.php'\n"


@pytest.mark.parametrize(("text", "env", "key", "words"), [
    ("[cmdb]\nbase_ulr = 'http://x'\n", {}, "cmdb.base_ulr", "unknown key"),
    ("[watch.resources.host]\nfields = []\n", {}, "watch.resources.host.fields", "non-empty"),
    ("[watch.resources.hosts]\nenabled = true\n", {}, "watch.resources.hosts", "unknown resource 'hosts'"),
    ("[watch]\nlookback = 'soon'\n", {}, "watch.lookback", "not a duration"),
    ("[cmdb]\ntimeout = 10\n", {}, "cmdb.timeout", "20 s"),
    ("[bus]\nkind = 'kafka'\n", {}, "bus.kind", "'amqp' or 'memory'"),
    ("[sinks.hook]\nkind = 'webhook'\nurl = 'http://x'\n", {}, "sinks.hook.secret", "Field required"),
    ("[sinks.x]\nkind = 'ftp'\n", {}, "sinks.x", "kind"),
    ("[watch.resources.host]\nsub_resource = 'sw'\n", {}, "watch.resources.host.sub_resource", "only"),
    ("[sinks.m]\nkind = 'mirror'\nresources = ['process']\n", {}, "sinks.m.resources", "not enabled"),
    ("[store]\nurl = 'mysql://x'\n", {}, "store.url", "sqlite"),
    ("", {"RWATCH_HTTP__LISTEN": "nowhere"}, "http.listen", "host:port"),
    ("[cmdb\n", {}, None, "not valid TOML"),
    # The old single key, split in two: the error says into what.
    ("[cmdb]\ntenant = '0'\n", {}, "cmdb.tenant", "supplier_account"),
    ("", {"RWATCH_CMDB__TENANT": "default"}, "cmdb.tenant", "tenant_id"),
    ("[cmdb]\ntenant_id = '0'\n", {}, "cmdb.tenant_id", "never \"0\""),
    ("[cmdb]\nrefusal_retry = 0\n", {}, "cmdb.refusal_retry", "greater than 0"),
    # The zabbix sink: credentials, prefix, name templates, proxies, its mirror.
    (ZBX, {}, "sinks.z.token", "a token, or a username and a password"),
    (ZBX + "token = 't'\nusername = 'u'\npassword = 'p'\n", {}, "sinks.z.token", "not both"),
    (ZBX + "token = 't'\ngroup_prefix = 'BK/'\n", {}, "sinks.z.group_prefix", "trailing /"),
    (ZBX + "token = 't'\ntechnical_name = '{fqdn}'\n", {}, "sinks.z.technical_name", "unknown fields ['fqdn']"),
    (ZBX + "token = 't'\nproxies = { west = 'p1' }\n", {}, "sinks.z.proxies", "bk_cloud_id"),
    (ZBX + "token = 't'\non_delete = 'wipe'\n", {}, "sinks.z.on_delete", "'delete', 'disable' or 'move'"),
    (ZBX + "token = 't'\nsource = 'nope'\n", {}, "sinks.z.source", "not a mirror sink"),
    ("[sinks.z]\nkind = 'zabbix'\nurl = 'zabbix.example.com'\ntoken = 't'\n", {}, "sinks.z.url", "http(s) URL"),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, env: dict[str, str], key: str | None,
                                       words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    err = info.value
    assert err.key == key
    assert words in str(err)
    assert err.file == (f"${next(iter(env))}" if env else str(path))


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize("value", ["1x", "", "-5", True])
def test_durations_reject_nonsense(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    assert parse_duration(7) == 7.0
    assert mask_url("amqp://localhost/") == "amqp://localhost/"


@pytest.mark.parametrize(("text", "key"), [
    ("[cmdb]\nbase_ulr = 'http://x'\n", "cmdb.base_ulr"),
    ("[watch.resources.biz]\nfields = []\n", "watch.resources.biz.fields"),
    ("[watch]\nretention = '1m'\nlookback = '5m'\n", "watch"),
    ("[bus]\npublish_window = 0\n", "bus.publish_window"),
    ("[log]\nformat = 'xml'\n", "log.format"),
])
def test_cli_exits_2_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    for command in ("check-config", "run"):
        proc = subprocess.run([RWATCH, command, "--config", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert str(path) in proc.stderr and f"[{key}]" in proc.stderr


def test_check_config_prints_effective_masked_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        [RWATCH, "check-config", "--config", str(REPO / "config.toml")],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "", "RWATCH_CMDB__APP_SECRET": "hunter2", "RWATCH_BUS__URL": "amqp://u:pw9@h/"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "pw9" not in proc.stdout
    assert 'url = "amqp://u:***@h/"' in proc.stdout
    assert "[watch.resources.host_relation]" in proc.stdout


def test_tenant_id_and_supplier_account_are_two_settings(tmp_path: Path) -> None:
    single = load_config(write(tmp_path, "[cmdb]\nsupplier_account = '7'\n"), environ={})
    assert (single.cmdb.tenant, single.cmdb.multi_tenant, single.cmdb.tenant_id) == ("7", False, None)
    multi = load_config(write(tmp_path, "[cmdb]\ntenant_id = 'acme'\n"), environ={})
    # On a multi-tenant CMDB the tenant id files events, cursors and mirror rows; the supplier account stays "0".
    assert (multi.cmdb.tenant, multi.cmdb.multi_tenant, multi.cmdb.supplier_account) == ("acme", True, "0")
    blank = load_config(write(tmp_path, ""), environ={"RWATCH_CMDB__TENANT_ID": ""})
    assert blank.cmdb.tenant_id is None and blank.cmdb.tenant == "0"


def test_a_queue_sinks_retry_bound_and_backoff(tmp_path: Path) -> None:
    from rwatch.sinks.applier import RetryPolicy

    hook = "[sinks.hook]\nkind = 'webhook'\nurl = 'http://h/'\nsecret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'\n"
    cfg = load_config(write(tmp_path, hook), environ={})
    # The defaults: a poison isolated after 10 failed attempts or 2 minutes; today's backoff (0.2 s doubling to 30 s).
    assert RetryPolicy.of(cfg.sinks["hook"]) == RetryPolicy(10, 120.0, 0.2, 30.0)
    tuned = load_config(write(tmp_path, hook + "max_attempts = 3\nretry_timeout = '30s'\nretry_backoff = '10ms'\n"
                                               "retry_backoff_max = '1s'\n"), environ={})
    assert RetryPolicy.of(tuned.sinks["hook"]) == RetryPolicy(3, 30.0, 0.01, 1.0)
    for bad, key in (("max_attempts = 0", "sinks.hook.max_attempts"),
                     ("retry_timeout = '0s'", "sinks.hook.retry_timeout"),
                     ("retry_backoff = '1m'", "sinks.hook.retry_backoff")):
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, hook + bad + "\n"), environ={})
        assert err.value.key == key


def test_environment_values_read_as_toml_and_only_section_key_names_count(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), environ={
        "RWATCH_CMDB__SUPPLIER_ACCOUNT": '"7"',  # a TOML string: text, even when it looks like a number
        "RWATCH_WATCH__RESOURCES__HOST__EVENT_TYPES": "['update']",  # a TOML array, not only JSON
        "RWATCH_CMDB": "ignored: no key",
        "RWATCH_TEST_AMQP_URL": "amqp://ignored",
        "rwatch_cmdb__rate_limit": "3",  # the prefix is upper case
    })
    assert cfg.cmdb.supplier_account == "7"
    assert cfg.watch.resources["host"].event_types == ["update"]
    assert cfg.cmdb.rate_limit == 90.0


@pytest.mark.parametrize(("env", "key", "words"), [
    ({"RWATCH_CMBD__BASE_URL": "http://x"}, "cmbd", "unknown key"),
    ({"RWATCH_CMDB____URL": "http://x"}, "RWATCH_CMDB____URL", "empty part"),
    ({"RWATCH_WATCH__RESOURCES__HOST": "1", "RWATCH_WATCH__RESOURCES__HOST__ENABLED": "true"},
     "watch.resources.host.enabled", "conflicts"),
])
def test_a_bad_variable_is_named(tmp_path: Path, env: dict[str, str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), environ=env)
    assert info.value.key == key and words in str(info.value)
    assert info.value.file == f"${list(env)[-1]}"


def test_a_config_built_directly_reads_no_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rwatch.config import Config

    monkeypatch.chdir(tmp_path)  # no config.toml here: the defaults, under the process environment
    monkeypatch.setenv("RWATCH_CMDB__RATE_LIMIT", "5")
    assert Config().cmdb.rate_limit == 90.0
    assert load_config(None, environ=None).cmdb.rate_limit == 5.0
