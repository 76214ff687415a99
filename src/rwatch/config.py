"""Configuration: one TOML file, every key overridable by ``RWATCH_<SECTION>__<KEY>``.

Unknown keys are errors; secrets are ``SecretStr`` (or ``SecretUrl``, which masks only the password) so
they print masked everywhere. ``load_config`` turns every problem into a ``ConfigError`` that names the
file (or environment variable) and the dotted key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from rwatch.cmdb.protocol import (
    EVENT_TYPES,
    FIELDS_IGNORED,
    FIELDS_REQUIRED,
    KEY_FIELDS,
    RESOURCES,
    SCOPE_FIELDS,
    SUB_RESOURCE_ALLOWED,
)
from rwatch.errors import ConfigError

ENV_PREFIX = "RWATCH_"
DEFAULT_CONFIG_PATH = Path("config.toml")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"20s"``, ``"5m"``, ``"3h"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _DURATION.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(f"{value!r} is not a duration (use seconds or e.g. '250ms', '5m', '3h')") from None
    else:
        raise ValueError("a duration is a number of seconds or a string like '5m'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class SecretUrl(SecretStr):
    """A URL that may carry a password: shown with the password masked, the rest left readable."""

    def _display(self) -> str:
        return mask_url(self.get_secret_value())


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _secret_url(value: Any) -> Any:
    return SecretUrl(value) if isinstance(value, str) else value


SecretUrlField = Annotated[SecretUrl, BeforeValidator(_secret_url)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- [cmdb] ----------------------------------------------------------------------------------------------


class CmdbConfig(_Section):
    base_url: str = "http://127.0.0.1:8089"
    api: Literal["apigw", "esb"] = "apigw"
    app_code: str = "rwatch"
    app_secret: SecretStr = SecretStr("")
    username: str = "admin"
    supplier_account: str = Field(default="0", min_length=1,
                                  description="bk_supplier_account: body field, URL segment, supplier header")
    tenant_id: str | None = Field(default=None, description="multi-tenant CMDB: X-Bk-Tenant-Id; unset = single")
    timeout: Duration = Field(default=35.0, description="per request; must exceed the 20 s hold-open")
    verify_tls: bool = True
    rate_limit: float = Field(default=90.0, ge=0, description="requests per second, all resources; 0 = off")
    refusal_retry: Duration = Field(default=120.0, gt=0,
                                    description="pause after a refusal (credentials, grant, tenant, IAM)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tenant" in data:
            raise ValueError(
                "tenant: replaced by two keys: supplier_account (the legacy bk_supplier_account, \"0\") and "
                "tenant_id (the X-Bk-Tenant-Id of a multi-tenant CMDB, e.g. \"default\"; leave it unset for a "
                "single-tenant CMDB)")
        return data

    @field_validator("tenant_id")
    @classmethod
    def _tenant_id(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.strip() == "0":
            raise ValueError("a tenant id is never \"0\" (that is the supplier account, cmdb.supplier_account): "
                             "use the tenant your app belongs to, e.g. \"default\", or leave tenant_id unset "
                             "for a single-tenant CMDB")
        return value.strip()

    @property
    def multi_tenant(self) -> bool:
        """A multi-tenant CMDB (3.15 with tenant mode on): ``tenant_id`` is set."""
        return self.tenant_id is not None

    @property
    def tenant(self) -> str:
        """What rwatch files events, cursors and mirror rows under (the event's ``tenant`` field): the tenant id on
        a multi-tenant CMDB, else the supplier account."""
        return self.tenant_id if self.tenant_id is not None else self.supplier_account

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("timeout")
    @classmethod
    def _above_hold(cls, value: float) -> float:
        if value <= 21:
            raise ValueError("must be above the server's 20 s long-poll hold (use 30 s or more)")
        return value


# --- [watch] ---------------------------------------------------------------------------------------------

# bk_fields is mandatory for host, biz, set and module; these are the attributes most downstream systems use.
DEFAULT_FIELDS: dict[str, list[str]] = {
    "host": [
        "bk_host_id", "bk_host_innerip", "bk_host_innerip_v6", "bk_host_outerip", "bk_cloud_id",
        "bk_host_name", "bk_os_type", "bk_os_name", "bk_agent_id", "operator", "bk_bak_operator",
        "bk_supplier_account",
    ],
    "biz": [
        "bk_biz_id", "bk_biz_name", "bk_biz_maintainer", "bk_biz_productor", "bk_biz_developer",
        "bk_biz_tester", "default", "bk_data_status", "bk_supplier_account",
    ],
    "set": [
        "bk_set_id", "bk_set_name", "bk_biz_id", "bk_parent_id", "set_template_id", "default",
        "bk_set_env", "bk_service_status", "bk_supplier_account",
    ],
    "module": [
        "bk_module_id", "bk_module_name", "bk_set_id", "bk_biz_id", "bk_parent_id", "service_template_id",
        "service_category_id", "set_template_id", "default", "host_apply_enabled", "bk_supplier_account",
    ],
}
# What a topology mirror needs; the rest are opt-in.
DEFAULT_ENABLED = frozenset({"host", "host_relation", "biz", "set", "module"})


class ResourceConfig(_Section):
    enabled: bool = False
    interval: Duration = Field(default=0.0, description="pause after each answer; 0 = real time")
    event_types: list[Literal["create", "update", "delete"]] = Field(default_factory=list)
    fields: list[str] = Field(default_factory=list)
    sub_resource: str | None = None

    @field_validator("event_types")
    @classmethod
    def _dedupe_types(cls, value: list[str]) -> list[str]:
        return [t for t in EVENT_TYPES if t in value]


class WatchConfig(_Section):
    bootstrap: Literal["resync", "now"] = "now"
    lookback: Duration = Field(default=300.0, description="after 1103007, resume this long before the last event "
                               "(always from the second before it at least: 0 replays just that second)")
    retention: Duration = Field(default=3 * 3600.0, description="plan for 3 h (the docs); the code keeps 6 h")
    lease_ttl: Duration = Field(default=10.0, ge=1.0, description="HA lease per resource; renewed every ttl/3")
    resync_every: Duration = Field(default=0.0, ge=0, description="periodic resync of every resource; 0 = off")
    resync_concurrency: int = Field(default=4, ge=1, le=64, description="list requests in flight per resync")
    mass_delete_share: float = Field(default=0.1, gt=0, le=1,
                                     description="a sweep deleting more than this share of its scope is held")
    mass_delete_floor: int = Field(default=20, ge=0, description="a sweep deleting at most this many is never held")
    resources: dict[str, ResourceConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = data.get("resources") or {}
        if not isinstance(given, dict):
            return data
        for name in given:
            if name not in RESOURCES:
                raise ValueError(f"resources.{name}: unknown resource {name!r} (known: {', '.join(RESOURCES)})")
        merged: dict[str, Any] = {}
        for name in RESOURCES:
            table = dict(given.get(name) or {})
            table.setdefault("enabled", name in DEFAULT_ENABLED)
            if name in DEFAULT_FIELDS:
                table.setdefault("fields", list(DEFAULT_FIELDS[name]))
            merged[name] = table
        return {**data, "resources": merged}

    @model_validator(mode="after")
    def _check_resources(self) -> WatchConfig:
        for name, res in self.resources.items():
            if res.sub_resource is not None and name not in SUB_RESOURCE_ALLOWED:
                raise ValueError(f"resources.{name}.sub_resource: only object_instance and mainline_instance "
                                 "accept a sub_resource")
            if name in FIELDS_REQUIRED and not res.fields:
                raise ValueError(f"resources.{name}.fields: CMDB requires a non-empty field list for {name}")
            if name in FIELDS_IGNORED:
                continue
            # The key is built from these; asking for them costs nothing and saves every event.
            if res.fields:
                wanted = (*KEY_FIELDS[name], *SCOPE_FIELDS.get(name, ()))
                res.fields = res.fields + [f for f in wanted if f not in res.fields]
        if self.lookback >= self.retention:
            raise ValueError("lookback must be shorter than retention")
        return self

    @property
    def enabled(self) -> list[str]:
        return [name for name, res in self.resources.items() if res.enabled]


# --- [bus], [store], [http], [log] -----------------------------------------------------------------------


class BusConfig(_Section):
    kind: Literal["amqp", "memory"] = "amqp"
    url: SecretUrlField = SecretUrl("amqp://guest:guest@127.0.0.1:5672/")
    exchange: str = Field(default="cmdb", min_length=1)
    queue_prefix: str = Field(default="rwatch", min_length=1)
    delivery_limit: int = Field(default=5, ge=1)
    publish_window: int = Field(default=256, ge=1, le=65535, description="unconfirmed publishes in flight")
    prefetch: int = Field(default=256, ge=1, le=65535)
    publish_timeout: Duration = Field(default=30.0, gt=0, description="per publish, until the broker confirms")
    publish_only: bool = Field(default=False, description="watchers publish resources no sink here takes: their "
                               "consumers are configured elsewhere and declare their own queues")


class StoreConfig(_Section):
    url: SecretUrlField = SecretUrl("sqlite:///rwatch-state.db")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: SecretUrl) -> SecretUrl:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme.split("+")[0] not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("the store is sqlite:///path or postgresql://user@host/db")
        return value


class HttpConfig(_Section):
    listen: str = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        return value


class RunConfig(_Section):
    shutdown_timeout: Duration = Field(default=8.0, gt=0, description="SIGTERM/SIGINT: stop cleanly within this")

    # How the stop spends ``shutdown_timeout`` (invariant 6): work in hand (publishes awaiting confirms, batches
    # being applied and acknowledged) may finish for half of it, then it is abandoned; every broker close
    # handshake after that is bounded by an eighth of it (at most 2 s), so a broker or sink that answers
    # nothing cannot push the stop past the limit. What was abandoned is replayed after the restart.
    @property
    def stop_grace(self) -> float:
        return self.shutdown_timeout / 2

    @property
    def close_timeout(self) -> float:
        return min(2.0, self.shutdown_timeout / 8)


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


# --- [sinks.<name>] --------------------------------------------------------------------------------------


class _SinkBase(_Section):
    enabled: bool = True


class _QueueSink(_SinkBase):
    """A sink fed by queues of its own: one per resource it takes."""

    resources: list[str] | None = Field(default=None, description="default: every enabled resource")
    batch_max: int = Field(default=500, ge=1, description="events applied together at most")
    batch_wait: Duration = Field(default=0.05,
                                 description="at most how long a batch waits for more, while they keep arriving")
    # The bound on holding a failing batch (issue 12): past it the consumer bisects the batch to find the event
    # that fails alone while the others apply, and dead-letters only that one. A sink that fails for every event
    # is never past it in effect: nothing proves it up, so the batch is held and retried, whatever this says.
    max_attempts: int = Field(default=10, ge=1, description="failed attempts of a batch before it is bisected")
    retry_timeout: Duration = Field(default=120.0, gt=0,
                                    description="or this long after its first failure, whichever comes first")
    retry_backoff: Duration = Field(default=0.2, gt=0, description="first pause before retrying a failed batch")
    retry_backoff_max: Duration = Field(default=30.0, gt=0, description="the pause doubles up to this")

    @field_validator("resources")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if name not in RESOURCES:
                raise ValueError(f"unknown resource {name!r}")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> _QueueSink:
        if self.retry_backoff > self.retry_backoff_max:
            raise ValueError("retry_backoff: must not exceed retry_backoff_max")
        return self


class MirrorSinkConfig(_QueueSink):
    kind: Literal["mirror"]
    url: SecretUrlField = SecretUrl("sqlite:///rwatch-mirror.db")


WEBHOOK_SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The webhook HMAC key: base64-decoded after a ``whsec_`` prefix, else the secret's UTF-8 bytes."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        key = secret.encode()
    else:
        encoded = secret[len(WEBHOOK_SECRET_PREFIX):]
        try:
            # Padding is often left off in the wild; the reference library adds it back too.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from exc
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


class WebhookSinkConfig(_QueueSink):
    kind: Literal["webhook"]
    url: str
    secret: SecretStr

    @field_validator("secret")
    @classmethod
    def _usable_key(cls, value: SecretStr) -> SecretStr:
        signing_key(value.get_secret_value())  # checked at load, so check-config catches it
        return value
    timeout: Duration = 10.0
    concurrency: int = Field(default=8, ge=1)


class PromJob(_Section):
    name: str
    port: int = Field(ge=1, le=65535)
    biz: list[str | int] = Field(default_factory=list)
    set: list[str | int] = Field(default_factory=list)
    module: list[str | int] = Field(default_factory=list)


class PromSdSinkConfig(_SinkBase):
    kind: Literal["prom_sd"]
    file: str | None = None
    source: str = Field(default="mirror", description="the mirror sink whose topology is exported")
    jobs: list[PromJob] = Field(default_factory=list)


class JsonlSinkConfig(_QueueSink):
    kind: Literal["jsonl"]
    path: str = "-"
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    backups: int = Field(default=5, ge=0)


SinkConfig = Annotated[
    MirrorSinkConfig | WebhookSinkConfig | PromSdSinkConfig | JsonlSinkConfig, Field(discriminator="kind")
]


# --- the whole ------------------------------------------------------------------------------------------


class Config(_Section):
    cmdb: CmdbConfig = Field(default_factory=CmdbConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    sinks: dict[str, SinkConfig] = Field(default_factory=dict)
    http: HttpConfig = Field(default_factory=HttpConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    _source: str | None = PrivateAttr(default=None)  # the file (or "<defaults>") load_config read

    @property
    def source(self) -> str | None:
        """Where this configuration came from, for errors that name the file."""
        return self._source

    @model_validator(mode="after")
    def _sinks_cover_resources(self) -> Config:
        if self.bus.publish_only and self.bus.kind == "memory":
            raise ValueError("bus.publish_only: the memory bus delivers only to this process's sinks; publishing "
                             "for consumers configured elsewhere needs bus.kind = 'amqp'")
        enabled = set(self.watch.enabled)
        for name, sink in self.sinks.items():
            if not re.fullmatch(r"[a-z0-9_-]+", name):
                raise ValueError(f"sinks.{name}: a sink name is lower-case letters, digits, '_' or '-'")
            if isinstance(sink, PromSdSinkConfig):
                source = self.sinks.get(sink.source)
                if not isinstance(source, MirrorSinkConfig):
                    raise ValueError(f"sinks.{name}.source: {sink.source!r} is not a mirror sink")
                if sink.enabled and not source.enabled:
                    raise ValueError(f"sinks.{name}.source: the mirror {sink.source!r} is disabled")
                continue
            for res in sink.resources or ():
                if res not in enabled:
                    raise ValueError(f"sinks.{name}.resources: {res!r} is not enabled in [watch.resources]")
        return self

    def check_role(self, role: str) -> None:
        """Refuse (ConfigError naming the key and the file) what would wedge ``rwatch run --role <role>``.

        A watcher saves a cursor only once its events are durable, and an event nobody takes never is: with the
        broker, its publish comes back (``mandatory``, no queue bound) and is retried for ever while the cursor
        stands still; with the memory bus the watcher fails and restarts in a loop. So every resource a watcher
        follows must be taken by an enabled sink of this configuration, unless ``bus.publish_only`` says the
        consumers are configured elsewhere (they declare their queues; /readyz shows ``route:<resource>`` until
        one is bound)."""
        file = self.source
        watching = role in ("watcher", "all")
        if self.bus.kind == "memory" and role != "all":
            raise ConfigError(f"bus.kind = 'memory' runs watchers and sinks in one process; --role {role} needs "
                              "'amqp'", key="bus.kind", file=file)
        if self.bus.kind == "memory" and not self.queue_sinks:
            raise ConfigError("bus.kind = 'memory' needs at least one enabled sink to apply events to",
                              key="sinks", file=file)
        if not watching or self.bus.publish_only:
            return
        taken = {res for sink in self.queue_sinks for res in self.sink_resources(sink)}
        missing = [res for res in self.watch.enabled if res not in taken]
        if not missing:
            return
        if not self.queue_sinks:
            raise ConfigError(
                f"no enabled sink takes the events --role {role} would publish ({', '.join(missing)}): no queue "
                "would receive them, and each publish would be returned and retried for ever. Add a "
                "[sinks.<name>] table, or, when the consumers run elsewhere with their own configuration, set "
                "bus.publish_only = true", key="sinks", file=file)
        takers = "; ".join(f"sinks.{s}.resources = {self.sink_resources(s)}" for s in self.queue_sinks)
        res = missing[0]
        raise ConfigError(
            f"{res!r} is followed but no enabled sink takes it ({takers}): its events would wait for a queue for "
            f"ever. Add it to a sink's resources, set watch.resources.{res}.enabled = false, or, when its consumers "
            "are configured elsewhere, set bus.publish_only = true", key=f"watch.resources.{res}.enabled",
            file=file)

    def sink_resources(self, sink: str) -> list[str]:
        """The resources a queue sink takes: its own list, or every enabled resource."""
        chosen = self.sinks[sink]
        if isinstance(chosen, PromSdSinkConfig):
            return []
        return list(chosen.resources) if chosen.resources is not None else self.watch.enabled

    @property
    def enabled_sinks(self) -> list[str]:
        return [name for name, sink in self.sinks.items() if sink.enabled]

    @property
    def queue_sinks(self) -> list[str]:
        """Enabled sinks fed by queues (every kind but prom_sd, a projection of a mirror)."""
        return [name for name in self.enabled_sinks if not isinstance(self.sinks[name], PromSdSinkConfig)]

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, every secret masked."""
        masked: dict[str, Any] = _mask(self.model_dump(mode="python"))
        return masked


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value._display() if isinstance(value, SecretUrl) else ("**********" if value.get_secret_value() else "")
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


_SINK_KINDS = frozenset({"mirror", "webhook", "prom_sd", "jsonl"})

# --- loading ---------------------------------------------------------------------------------------------


def _env_value(raw: str) -> Any:
    """Parse an environment value as a TOML value when it is one (numbers, booleans, arrays), else text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    tree: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        if any(not p for p in path):
            raise ConfigError(f"malformed variable name (empty part in {name})", file=f"${name}", key=name)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name} conflicts with another variable", file=f"${name}", key=".".join(path))
            node = child
        node[path[-1]] = _env_value(raw)
        origin[path] = name
    return tree, origin


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _error_location(err: Any) -> tuple[str, ...]:
    # Drop pydantic's discriminator tags ("mirror", "function-after[...]") so the key reads as the user wrote it.
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    if loc[:1] == ["sinks"] and len(loc) > 2 and loc[2] in _SINK_KINDS:
        del loc[2]
    return tuple(loc)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (``config.toml`` when none is named and it exists), apply the environment, validate."""
    environ = os.environ if environ is None else environ
    explicit = path is not None
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if file.exists() or explicit:
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("no such file", file=str(file)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", file=str(file)) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None
    source = str(file) if data or explicit else "<defaults>"
    overrides, origin = _env_overrides(environ)
    try:
        config = Config.model_validate(_merge(data, overrides))
        config._source = source
        return config
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _error_location(err)
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        # A model-level check names its key in the message ("resources.host.fields: ..."); prefer that.
        inner, sep, rest = message.partition(": ")
        if sep and re.fullmatch(r"[a-z_][a-z0-9_-]*(\.[a-z0-9_-]+)*", inner):
            loc, message = (*loc, *inner.split(".")), rest
        key = ".".join(loc)
        env_name = next((name for p, name in origin.items() if loc[: len(p)] == p), None)
        raise ConfigError(message, file=f"${env_name}" if env_name else source, key=key) from None
