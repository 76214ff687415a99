"""The sections of the configuration file: [cmdb], [watch] (with [watch.resources.<name>]), [bus], [store],
[http], [log] and [run]."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from rwatch.cmdb.protocol import (
    EVENT_TYPES,
    FIELDS_IGNORED,
    FIELDS_REQUIRED,
    KEY_FIELDS,
    RESOURCES,
    SCOPE_FIELDS,
    SUB_RESOURCE_ALLOWED,
)
from rwatch.config.values import Duration, SecretUrl, SecretUrlField, Section

# --- [cmdb] ----------------------------------------------------------------------------------------------


class CmdbConfig(Section):
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


class ResourceConfig(Section):
    enabled: bool = False
    interval: Duration = Field(default=0.0, description="pause after each answer; 0 = real time")
    event_types: list[Literal["create", "update", "delete"]] = Field(default_factory=list)
    fields: list[str] = Field(default_factory=list)
    sub_resource: str | None = None

    @field_validator("event_types")
    @classmethod
    def _dedupe_types(cls, value: list[str]) -> list[str]:
        return [t for t in EVENT_TYPES if t in value]


class WatchConfig(Section):
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


class BusConfig(Section):
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


class StoreConfig(Section):
    url: SecretUrlField = SecretUrl("sqlite:///rwatch-state.db")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: SecretUrl) -> SecretUrl:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme.split("+")[0] not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("the store is sqlite:///path or postgresql://user@host/db")
        return value


class HttpConfig(Section):
    listen: str = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        return value


class RunConfig(Section):
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


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value
