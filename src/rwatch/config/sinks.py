"""The [sinks.<name>] tables: one model per sink kind, told apart by ``kind``.

Queue sinks (mirror, webhook, jsonl) take events from queues of their own; projections (prom_sd, zabbix,
ansible_inventory) follow a mirror sink's topology (``source``) and take no queue."""

from __future__ import annotations

import base64
import binascii
import string
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from rwatch.cmdb.protocol import RESOURCES
from rwatch.config.values import Duration, SecretUrl, SecretUrlField, Section


class _SinkBase(Section):
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


class PromJob(Section):
    name: str
    port: int = Field(ge=1, le=65535)
    biz: list[str | int] = Field(default_factory=list)
    set: list[str | int] = Field(default_factory=list)
    module: list[str | int] = Field(default_factory=list)


class ProjectionSinkConfig(_SinkBase):
    """A sink that follows a mirror's topology rather than queues of its own."""

    source: str = Field(default="mirror", description="the mirror sink whose topology is followed")


class PromSdSinkConfig(ProjectionSinkConfig):
    kind: Literal["prom_sd"]
    file: str | None = None
    jobs: list[PromJob] = Field(default_factory=list)


# The fields a Zabbix host's name templates may use; ``ip`` is the first inner IP, ``label`` the host name or IP.
ZABBIX_NAME_FIELDS = ("bk_host_id", "bk_host_name", "bk_host_innerip", "ip", "bk_cloud_id", "label", "tenant")


def template_fields(template: str, known: tuple[str, ...], what: str = "") -> list[str]:
    """The fields a host name template (a ``str.format`` string) names; ValueError saying what is wrong with it
    (prefixed ``what: ``) when it does not parse or names a field outside ``known``."""
    said = f"{what}: " if what else ""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{said}{template!r}: {exc}") from None
    if unknown := set(fields) - set(known):
        raise ValueError(f"{said}{template!r} has unknown fields {sorted(unknown)} (known: {', '.join(known)})")
    return fields


def check_zabbix_names(group_prefix: str, **templates: str) -> None:
    """ValueError naming what is wrong with a group prefix or a host name template (``visible_name=...``)."""
    if not group_prefix or group_prefix != group_prefix.strip() or group_prefix.startswith("/") \
            or group_prefix.endswith("/"):
        raise ValueError(f"group_prefix: {group_prefix!r} must be a non-empty group name without a leading or "
                         "trailing / or space")
    for which, template in templates.items():
        template_fields(template, ZABBIX_NAME_FIELDS, which)


class ZabbixTemplateRule(Section):
    """Link ``templates`` to the hosts that match every pattern given (shell-style, case-insensitive)."""

    templates: list[str] = Field(min_length=1)
    module: str | None = Field(default=None, description="a module name pattern, e.g. 'nginx*'")
    os_type: str | None = Field(default=None, description="'linux', 'windows', ... or CMDB's bk_os_type code")


class ZabbixSinkConfig(ProjectionSinkConfig):
    kind: Literal["zabbix"]
    url: str = Field(description="the API endpoint, e.g. https://zabbix.example.com/api_jsonrpc.php")
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    group_prefix: str = "BK"
    on_delete: Literal["delete", "disable", "move"] = "disable"
    visible_name: str = "{label} (bk-{bk_host_id})"
    technical_name: str = "bk-{bk_host_id}"
    templates: list[ZabbixTemplateRule] = Field(default_factory=list)
    proxies: dict[str, str] = Field(default_factory=dict, description="bk_cloud_id -> proxy name")
    disable_idle: bool = False
    idle_modules: list[str] = Field(default_factory=lambda: ["空闲机", "故障机", "待回收"])
    agent_port: int = Field(default=10050, ge=1, le=65535)
    managed_tag: str = Field(default="rwatch", min_length=1)
    timeout: Duration = Field(default=30.0, gt=0, description="one API call")
    debounce: Duration = Field(default=0.1, ge=0, description="at most one reconcile per this, while changes come")
    full_every: Duration = Field(default=600.0, gt=0, description="a full reconcile (hand edits, missed changes)")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("an http(s) URL of Zabbix's api_jsonrpc.php")
        return value

    @field_validator("proxies")
    @classmethod
    def _cloud_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"{key!r}: keys are bk_cloud_id numbers, e.g. \"0\" = \"proxy-a\"")
            if not value[key].strip():
                raise ValueError(f"{key!r}: an empty proxy name (leave the control area out to monitor it from the "
                                 "server)")
        return value

    @model_validator(mode="after")
    def _auth_and_names(self) -> ZabbixSinkConfig:
        if self.token is not None and not self.token.get_secret_value():
            self.token = None  # token = "" in a file, to be set through the environment: not given
        if self.token is not None and (self.username or self.password):
            raise ValueError("token: give a token, or a username and a password, not both")
        if self.enabled and self.token is None and not (self.username and self.password):
            raise ValueError("token: Zabbix needs a token, or a username and a password")
        check_zabbix_names(self.group_prefix, visible_name=self.visible_name,
                           technical_name=self.technical_name)
        return self


# The fields an inventory host name template may use; ``ip`` is the first inner IP.
ANSIBLE_NAME_FIELDS = ("bk_host_id", "bk_host_name", "bk_host_innerip", "ip", "bk_cloud_id", "tenant")


class AnsibleInventorySinkConfig(ProjectionSinkConfig):
    kind: Literal["ansible_inventory"]
    file: str = Field(description="where the inventory JSON is written, replaced atomically")
    alias_groups: bool = Field(default=False, description="also groups named after biz / set / module names")
    hostvars: list[str] = Field(default_factory=list, description="host fields copied into _meta.hostvars")
    host_name: str = Field(default="bk-{bk_host_id}", description="the inventory name of a host (a template)")
    debounce: Duration = Field(default=1.0, ge=0)

    @field_validator("host_name")
    @classmethod
    def _template(cls, value: str) -> str:
        check_ansible_host_name(value)
        return value

    @field_validator("hostvars")
    @classmethod
    def _fields(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or name != name.strip():
                raise ValueError(f"{name!r}: a host field name, e.g. 'bk_os_type'")
        return value


def check_ansible_host_name(template: str) -> None:
    """ValueError naming what is wrong with an inventory host name template."""
    if not template_fields(template, ANSIBLE_NAME_FIELDS):
        raise ValueError(f"{template!r}: names no field, so every host would have the same name")


class JsonlSinkConfig(_QueueSink):
    kind: Literal["jsonl"]
    path: str = "-"
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    backups: int = Field(default=5, ge=0)


SinkConfig = Annotated[
    MirrorSinkConfig | WebhookSinkConfig | PromSdSinkConfig | JsonlSinkConfig | ZabbixSinkConfig
    | AnsibleInventorySinkConfig,
    Field(discriminator="kind"),
]

# The kind tags, which pydantic puts into an error's location (loading.py takes them out again).
SINK_KINDS = frozenset({"mirror", "webhook", "prom_sd", "jsonl", "zabbix", "ansible_inventory"})
